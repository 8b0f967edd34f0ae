"""Property tests: whatever a metadata file holds, only MetadataError or FileNotFoundError escape.

And whatever loads is safe to use: names match the validators, paths are absolute files.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mento_fab.metadata import BeamtimeMetadata, MetadataError, parse_metadata_file

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Strict re-statements of the rules, so the tests do not just reuse the code under test.
HOST = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]*")

HOSTILE_TEXT = st.sampled_from(
    [
        "None",
        "",
        "a;rm -rf /",
        "-oProxyCommand=x",
        "user@host",
        "$(x)",
        "max-p3a001\n",
        "x" * 300,
        "../../etc/passwd",
        "/etc/passwd",
        "shared/id_rsa",
        "shared",
        "\x00",
        "c20210823_000_MAA",
        "11019999",
    ]
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | HOSTILE_TEXT
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10) | HOSTILE_TEXT, children, max_size=5)
    ),
    max_leaves=25,
)

VALID_DOC: dict[str, Any] = {
    "beamline": "p11",
    "beamtimeId": "11019999",
    "corePath": "/asap3/petra3/gpfs/p11/2024/data/11019999",
    "contact": "None",
    "onlineAnalysis": {
        "reservedNodes": ["max-p3a001", "max-p3a002"],
        "slurmPartition": "ponline_p11",
        "slurmReservation": "11019999",
        "sshPrivateKeyPath": "shared/id_rsa",
        "sshPublicKeyPath": "shared/id_rsa.pub",
        "userAccount": "bttest02",
    },
    "asapo": {
        "beamtimeClbtTokenPath": "shared/asapo-token-clbt.txt",
        "beamtimeTokenPath": "shared/asapo-token.txt",
        "endpoint": "asapo-services.example.org:8400",
    },
}


def _key_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a document: dict keys and list indexes, at every depth."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            paths += _key_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths += _key_paths(child, (*prefix, index))
    return paths


KEY_PATHS = _key_paths(VALID_DOC)
#: A document with the commissioning id instead, so both kinds get mutated.
COMMISSIONING_DOC = {
    **{k: v for k, v in VALID_DOC.items() if k != "beamtimeId"},
    "id": "c20210823_000_MAA",
    "beamline": "P04",
}
DELETE = object()


@st.composite
def mostly_valid_documents(draw: st.DrawFn) -> Any:
    """A valid document with one to three places replaced by random values or removed."""
    doc = copy.deepcopy(draw(st.sampled_from([VALID_DOC, COMMISSIONING_DOC])))
    for _ in range(draw(st.integers(1, 3))):
        paths = _key_paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        replacement = draw(st.just(DELETE) | HOSTILE_TEXT | json_values)
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if replacement is DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = replacement
    return doc


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session directory with the files VALID_DOC names; tests write the metadata file."""
    directory = tmp_path_factory.mktemp("property") / "current"
    shared = directory / "shared"
    shared.mkdir(parents=True)
    for name in ("id_rsa", "id_rsa.pub", "asapo-token.txt", "asapo-token-clbt.txt"):
        (shared / name).write_text("SECRET-CONTENT\n")
    return directory


def _check(path: Path) -> BeamtimeMetadata | None:
    """Parse; only the two documented exceptions may escape. Returns the object, if any."""
    try:
        md = parse_metadata_file(path)
    except MetadataError as exc:
        text = str(exc)
        assert text.startswith(f"{path}: ")
        assert "\n" not in text
        assert isinstance(exc.messages, dict)
        assert "SECRET-CONTENT" not in text
        return None
    except FileNotFoundError as exc:
        assert "SECRET-CONTENT" not in str(exc)
        assert "\n" not in str(exc)
        return None
    _assert_safe(md)
    return md


def _assert_safe(md: BeamtimeMetadata) -> None:
    assert isinstance(md, BeamtimeMetadata)
    assert md.tag in ("current", "commissioning")
    for text in (md.beamline, md.beamtime, md.corefs_path):
        assert isinstance(text, str) and text
    assert SAFE_ID.fullmatch(md.beamtime)
    assert md.beamtime.startswith("c") or md.tag == "current"
    if md.online is not None:
        assert md.online.nodes and all(HOST.fullmatch(n) for n in md.online.nodes)
        assert USER.fullmatch(md.online.ssh.user)
        assert SAFE_ID.fullmatch(md.online.slurm.partition)
        assert SAFE_ID.fullmatch(md.online.slurm.reservation)
        assert os.path.isabs(md.online.ssh.key) and os.path.isfile(md.online.ssh.key)
        assert md.online.blfs_mountpoint == f"/beamline/{md.beamline.lower()}"
    if md.asapo is not None:
        assert isinstance(md.asapo.endpoint, str) and md.asapo.endpoint
        for token in (md.asapo.token_ro, md.asapo.token_rw):
            assert os.path.isabs(token) and os.path.isfile(token)


def _write(session_dir: Path, doc: Any) -> Path:
    path = session_dir / "beamtime-metadata-1.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@SETTINGS
@given(doc=json_values)
def test_arbitrary_json_documents(session_dir, doc):
    _check(_write(session_dir, doc))


@SETTINGS
@given(doc=st.dictionaries(st.sampled_from([*sorted(VALID_DOC), "id"]), json_values))
def test_arbitrary_values_under_the_real_top_level_keys(session_dir, doc):
    _check(_write(session_dir, doc))


@SETTINGS
@given(doc=mostly_valid_documents())
def test_mostly_valid_documents(session_dir, doc):
    md = _check(_write(session_dir, doc))
    if md is not None:
        # What loaded is what the document said.
        assert md.beamline == doc["beamline"]
        online = doc.get("onlineAnalysis")
        if md.online is not None:
            assert md.online.nodes == online["reservedNodes"]


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes(session_dir, raw):
    path = session_dir / "beamtime-metadata-1.json"
    path.write_bytes(raw)
    _check(path)


def test_the_unmutated_documents_load(session_dir):
    for doc in (VALID_DOC, COMMISSIONING_DOC):
        md = _check(_write(session_dir, doc))
        assert md is not None and md.online is not None and md.asapo is not None


KNOWN_KEYS = {
    "beamline",
    "beamtimeId",
    "id",
    "corePath",
    "core-path",
    "onlineAnalysis",
    "asapo",
    "reservedNodes",
    "slurmPartition",
    "slurmReservation",
    "sshPrivateKeyPath",
    "sshPublicKeyPath",
    "asapoBeamtimeTokenPath",
    "userAccount",
    "endpoint",
    "beamtimeTokenPath",
    "beamtimeClbtTokenPath",
}
#: Text without control characters: a control character anywhere is bad input (issue 8),
#: tested on its own below.
plain_text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=20)
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | plain_text,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(plain_text, children, max_size=5)
    ),
    max_leaves=25,
)
unknown_keys = st.dictionaries(
    plain_text.filter(lambda k: k not in KNOWN_KEYS), plain_values, max_size=4
)


@SETTINGS
@given(
    base=st.sampled_from([VALID_DOC, COMMISSIONING_DOC]),
    top=unknown_keys,
    online=unknown_keys,
    asapo=unknown_keys,
)
def test_unknown_keys_anywhere_change_nothing(session_dir, base, top, online, asapo):
    expected = _check(_write(session_dir, base))
    doc = copy.deepcopy(base)
    doc.update(top)
    doc["onlineAnalysis"].update(online)
    doc["asapo"].update(asapo)
    assert _check(_write(session_dir, doc)) == expected


CONTROL_CHARACTERS = st.characters(whitelist_categories=("Cc",))
#: (section, key) pairs of the names below whose values the objects hold.
HELD = {("", "corePath"), ("asapo", "endpoint"), ("onlineAnalysis", "userAccount")}


@SETTINGS
@given(
    base=st.sampled_from([VALID_DOC, COMMISSIONING_DOC]),
    section=st.sampled_from(["", "onlineAnalysis", "asapo"]),
    name=st.sampled_from(["title", "futureKey", "corePath", "endpoint", "userAccount"]),
    before=plain_text,
    control=CONTROL_CHARACTERS,
    after=plain_text,
)
def test_a_control_character_in_a_held_value_is_bad_input_elsewhere_ignored(
    session_dir, base, section, name, before, control, after
):
    doc = copy.deepcopy(base)
    (doc[section] if section else doc)[name] = before + control + after
    path = _write(session_dir, doc)
    if (section, name) not in HELD:  # free text the objects never hold: as the original
        assert _check(path) == _check(_write(session_dir, base))
        return
    with pytest.raises(MetadataError) as info:
        parse_metadata_file(path)
    text = str(info.value)
    assert f"{section}.{name}".lstrip(".") in text
    assert control not in text.removeprefix(str(path))
    _check(path)


@SETTINGS
@given(
    base=st.sampled_from([VALID_DOC, COMMISSIONING_DOC]),
    before=plain_text,
    control=CONTROL_CHARACTERS,
    value=plain_values,
)
def test_a_control_character_in_any_key_is_bad_input(session_dir, base, before, control, value):
    doc = copy.deepcopy(base)
    doc["onlineAnalysis"][before + control] = value
    path = _write(session_dir, doc)
    with pytest.raises(MetadataError) as info:
        parse_metadata_file(path)
    assert "onlineAnalysis: Control character in a key" in str(info.value)
    assert control not in str(info.value).removeprefix(str(path))
