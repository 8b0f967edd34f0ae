"""mento_fab.metadata: the seed's API, the active-session rules and the schemas' rules.

Every session tree is written to a temporary directory (fixtures in ``conftest.py``),
with real key and token files: their contents must never show up anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

import mento_fab.metadata as metadata_module
from mento_fab.defaults import MAX_METADATA_BYTES
from mento_fab.metadata import (
    AsapoInfo,
    BeamtimeMetadata,
    MetadataError,
    OnlineInfo,
    SlurmInfo,
    SSHInfo,
    get_active_session_root,
    get_beamtime_metadata,
    locate_metadata_file,
    parse_metadata_file,
)

# ---------------------------------------------------------------------------- helpers


def _one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text


def _assert_no_secret(text: str, secrets: tuple[str, ...]) -> None:
    for secret in secrets:
        assert secret not in text


def _metadata_error(session, doc: Any) -> MetadataError:
    session.rewrite(doc)
    with pytest.raises(MetadataError) as info:
        parse_metadata_file(session.metadata)
    return info.value


# ---------------------------------------------------------------------------- the seed's API


def _field_spec(cls: type) -> list[tuple[str, Any, Any]]:
    return [(f.name, f.default, f.default_factory) for f in dataclasses.fields(cls)]


def test_module_exposes_the_seed_api():
    assert set(metadata_module.__all__) >= {
        "BeamtimeMetadata",
        "OnlineInfo",
        "SSHInfo",
        "SlurmInfo",
        "AsapoInfo",
        "get_active_session_root",
        "locate_metadata_file",
        "parse_metadata_file",
        "get_beamtime_metadata",
    }
    missing = dataclasses.MISSING
    assert _field_spec(SSHInfo) == [("user", missing, missing), ("key", missing, missing)]
    assert _field_spec(SlurmInfo) == [
        ("partition", missing, missing),
        ("reservation", missing, missing),
    ]
    assert _field_spec(AsapoInfo) == [
        ("endpoint", missing, missing),
        ("token_ro", missing, missing),
        ("token_rw", missing, missing),
    ]
    assert _field_spec(OnlineInfo) == [
        ("ssh", missing, missing),
        ("slurm", missing, missing),
        ("nodes", missing, list),
        ("blfs_mountpoint", None, missing),
    ]
    assert _field_spec(BeamtimeMetadata) == [
        ("beamline", missing, missing),
        ("beamtime", missing, missing),
        ("corefs_path", missing, missing),
        ("tag", missing, missing),
        ("online", None, missing),
        ("asapo", None, missing),
    ]


def test_online_info_defaults_are_not_shared():
    a = OnlineInfo(SSHInfo("u", "/k"), SlurmInfo("p", "r"))
    b = OnlineInfo(SSHInfo("u", "/k"), SlurmInfo("p", "r"))
    a.nodes.append("n1")
    assert b.nodes == []
    assert a.blfs_mountpoint is None
    md = BeamtimeMetadata("p11", "1", "/asap3/x", "current")
    assert md.online is None and md.asapo is None


@pytest.mark.parametrize(
    "func", [get_active_session_root, locate_metadata_file, get_beamtime_metadata]
)
def test_root_dir_defaults_to_gpfs(func):
    parameter = inspect.signature(func).parameters["root_dir"]
    assert parameter.default == "/gpfs"


def test_parse_takes_one_positional_path():
    assert list(inspect.signature(parse_metadata_file).parameters) == ["metadatafile_path"]


def test_metadata_error_is_a_value_error():
    assert issubclass(MetadataError, ValueError)


# ---------------------------------------------------------------------------- whole files


def test_user_beamtime(beamtime, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    md = get_beamtime_metadata(beamtime.root)
    shared = beamtime.dir / "shared"
    assert md == BeamtimeMetadata(
        beamline="p11",
        beamtime="11019999",
        corefs_path="/asap3/petra3/gpfs/p11/2024/data/11019999",
        tag="current",
        online=OnlineInfo(
            ssh=SSHInfo(user="bttest02", key=str(shared / "id_rsa")),
            slurm=SlurmInfo(partition="ponline_p11", reservation="11019999"),
            nodes=["max-p3a001", "max-p3a002", "max-p3a003", "max-p3a004"],
            blfs_mountpoint="/beamline/p11",
        ),
        asapo=AsapoInfo(
            endpoint="asapo-services.example.org:8400",
            token_ro=str(shared / "asapo-token-clbt.txt"),
            token_rw=str(shared / "asapo-token.txt"),
        ),
    )
    assert capsys.readouterr() == ("", "")


def test_commissioning(commissioning, capsys):
    md = get_beamtime_metadata(commissioning.root)
    assert md.tag == "commissioning"
    assert md.beamtime == "c20210823_000_MAA"  # from "id", not from "tag": "MAA"
    assert md.beamline == "P04"
    assert md.online is not None
    assert md.online.blfs_mountpoint == "/beamline/p04"
    assert md.online.nodes == ["max-p3a010", "max-p3a011"]
    assert md.online.ssh.key == str(commissioning.key)
    assert md.asapo is not None and md.asapo.token_rw == str(commissioning.token_rw)
    assert capsys.readouterr() == ("", "")


def test_minimal_commissioning_file_without_blocks(make_session, caplog):
    caplog.set_level(logging.INFO, logger="mento_fab")
    doc = {
        "beamline": "P04",
        "corePath": "/asap3/petra3/gpfs/p04/2021/commissioning/c20210823_000_MAA",
        "generated": "2021-08-23 10:00:00",
        "id": "c20210823_000_MAA",
        "tag": "MAA",
    }
    session = make_session("commissioning", doc, files=False)
    md = get_beamtime_metadata(session.root)
    assert (md.online, md.asapo) == (None, None)
    assert md.tag == "commissioning"
    assert "no onlineAnalysis block" in caplog.text
    assert "no asapo block" in caplog.text


def test_paths_are_absolute_even_for_a_relative_metadata_path(beamtime, monkeypatch):
    monkeypatch.chdir(beamtime.root)
    md = parse_metadata_file(os.path.relpath(beamtime.metadata))
    assert md.online is not None and md.asapo is not None
    for path in (md.online.ssh.key, md.asapo.token_ro, md.asapo.token_rw):
        assert os.path.isabs(path) and os.path.isfile(path)
    assert md.online.ssh.key == str(beamtime.key.resolve())


def test_utf8_bom_is_accepted(beamtime):
    beamtime.rewrite(b"\xef\xbb\xbf" + json.dumps(beamtime.doc).encode())
    assert parse_metadata_file(beamtime.metadata).beamtime == "11019999"


# ---------------------------------------------------------------------------- active session


def test_current_wins_over_commissioning(make_session):
    make_session("commissioning")
    user = make_session("current")
    assert get_active_session_root(user.root) == user.dir
    assert locate_metadata_file(user.root) == str(user.metadata)
    assert get_beamtime_metadata(user.root).tag == "current"


def test_current_without_a_file_does_not_fall_back_to_commissioning(make_session):
    session = make_session("commissioning")
    (session.root / "current").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(session.root / "current"))):
        locate_metadata_file(session.root)


def test_a_file_named_current_is_not_a_session(make_session):
    session = make_session("commissioning")
    (session.root / "current").write_text("not a directory")
    assert get_active_session_root(session.root) == session.dir


def test_neither_session_local_is_never_one(gpfs):
    (gpfs / "local" / "beamtime-metadata-1.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        get_active_session_root(gpfs)
    assert str(gpfs) in str(info.value)
    with pytest.raises(FileNotFoundError):
        get_beamtime_metadata(gpfs)


def test_missing_root_dir(tmp_path):
    root = tmp_path / "no-such-gpfs"
    with pytest.raises(FileNotFoundError, match=re.escape(str(root))):
        get_active_session_root(root)
    with pytest.raises(FileNotFoundError, match=re.escape(str(root))):
        get_beamtime_metadata(root)


def test_session_without_metadata_file(gpfs):
    current = gpfs / "current"
    current.mkdir()
    (current / "notes.json").write_text("{}")  # not *metadata*.json
    (current / "shared").mkdir()
    (current / "shared" / "beamtime-metadata-1.json").write_text("{}")  # not directly inside
    (current / "old-metadata.json.bak").write_text("{}")
    (current / "dir-metadata.json").mkdir()  # a directory is not a file
    with pytest.raises(FileNotFoundError, match=re.escape(str(current))):
        locate_metadata_file(gpfs)


def test_several_metadata_files_are_an_error_naming_them(beamtime):
    other = beamtime.dir / "beamtime-metadata-11010000.json"
    other.write_text(json.dumps(beamtime.doc))
    with pytest.raises(RuntimeError) as info:
        locate_metadata_file(beamtime.root)
    assert beamtime.metadata.name in str(info.value)
    assert other.name in str(info.value)
    with pytest.raises(RuntimeError):
        get_beamtime_metadata(beamtime.root)


def test_locate_returns_a_str_and_session_root_a_path(beamtime):
    assert isinstance(locate_metadata_file(beamtime.root), str)
    assert isinstance(get_active_session_root(str(beamtime.root)), Path)


# ---------------------------------------------------------------------------- core filesystem


@pytest.mark.parametrize(
    ("path", "beamtime_dir"),
    [
        ("/asap3/petra3/gpfs/p11/2024/data/11019999", "/asap3/petra3/gpfs/p11/2024/data/11019999"),
        (
            "/asap3/petra3/gpfs/p11/2024/data/11019999/raw/scan_001",
            "/asap3/petra3/gpfs/p11/2024/data/11019999",
        ),
        (
            "/asap3/petra3/gpfs/p04/2021/commissioning/c20210823_000_MAA/processed",
            "/asap3/petra3/gpfs/p04/2021/commissioning/c20210823_000_MAA",
        ),
        ("/asap3/petra3/gpfs/p11/2024/data", None),  # no id
        ("/asap3/petra3/gpfs/p11/24/data/11019999", None),  # not a 4-digit year
        ("/asap3/petra3/gpfs/p11/2024/shared/11019999", None),  # neither data nor commissioning
        ("/gpfs/current", None),
        ("/home/asap3/petra3/gpfs/p11/2024/data/11019999", None),
    ],
)
def test_core_fs_pattern(path, beamtime_dir):
    match = metadata_module.CORE_FS_BEAMTIME.match(path)
    assert (match.group(1) if match else None) == beamtime_dir


def _core_fs_tree(base: Path, facility: str) -> tuple[Path, Path]:
    beamtime_dir = base / "asap3" / facility / "gpfs" / "p11" / "2024" / "data" / "11019999"
    deeper = beamtime_dir / "raw" / "scan_001"
    deeper.mkdir(parents=True)
    return beamtime_dir, deeper


def test_core_fs_rule_under_a_relocated_asap3(tmp_path, monkeypatch, user_doc):
    """The rule itself, with the pattern's ``/asap3`` moved under a temporary directory."""
    pattern = metadata_module.CORE_FS_BEAMTIME.pattern
    assert pattern.startswith("^(/asap3/")
    monkeypatch.setattr(
        metadata_module,
        "CORE_FS_BEAMTIME",
        re.compile("^(" + re.escape(str(tmp_path)) + pattern[2:]),
    )
    beamtime_dir, deeper = _core_fs_tree(tmp_path, "petra3")
    session = _write_core_fs_session(beamtime_dir, user_doc)
    assert get_active_session_root(deeper) == beamtime_dir
    assert get_active_session_root(beamtime_dir) == beamtime_dir
    assert locate_metadata_file(deeper) == str(session)
    md = get_beamtime_metadata(deeper)
    assert md.online is not None and md.online.ssh.key == str(beamtime_dir / "shared" / "id_rsa")
    # current/ and commissioning/ still come first.
    (deeper / "current").mkdir()
    assert get_active_session_root(deeper) == deeper / "current"
    # Outside a beamtime directory: not found.
    with pytest.raises(FileNotFoundError):
        get_active_session_root(beamtime_dir.parent)


def _write_core_fs_session(beamtime_dir: Path, doc: dict[str, Any]) -> Path:
    shared = beamtime_dir / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    for name in ("id_rsa", "id_rsa.pub", "asapo-token.txt", "asapo-token-clbt.txt"):
        (shared / name).write_text("x\n")
    path = beamtime_dir / "beamtime-metadata-11019999.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="creating /asap3 needs root")
def test_core_fs_rule_on_the_real_asap3_path(user_doc):
    """The unmodified rule on a real ``/asap3/...`` tree, removed again afterwards."""
    asap3 = Path("/asap3")
    created_asap3 = not asap3.exists()
    facility = f"mentotest-{uuid.uuid4().hex[:12]}"
    try:
        beamtime_dir, deeper = _core_fs_tree(Path("/"), facility)
        session = _write_core_fs_session(beamtime_dir, user_doc)
        assert get_active_session_root(deeper) == beamtime_dir
        assert locate_metadata_file(deeper) == str(session)
        assert get_beamtime_metadata(deeper).beamtime == "11019999"
        with pytest.raises(FileNotFoundError):
            get_active_session_root(beamtime_dir.parent)
    finally:
        shutil.rmtree(asap3 / facility, ignore_errors=True)
        if created_asap3:
            with contextlib.suppress(OSError):  # someone else's test may be using it
                asap3.rmdir()
    assert not (asap3 / facility).exists()


# ---------------------------------------------------------------------------- keys


@pytest.mark.parametrize("section", ["", "onlineAnalysis", "asapo"])
def test_unknown_keys_are_ignored_at_every_level(beamtime, section):
    expected = parse_metadata_file(beamtime.metadata)
    doc = copy.deepcopy(beamtime.doc)
    target = doc[section] if section else doc
    target["futureKey"] = {"nested": [1, 2, {"x": None}]}
    target["anotherOne"] = "None"
    beamtime.rewrite(doc)
    assert parse_metadata_file(beamtime.metadata) == expected


@pytest.mark.parametrize(
    "key",
    [
        "applicant",
        "beamlineAlias",
        "beamlineSetup",
        "contact",
        "eventEnd",
        "eventStart",
        "facility",
        "generated",
        "leader",
        "pi",
        "proposalId",
        "proposalType",
        "retentionPeriod",
        "title",
        "unixId",
        "users",
    ],
)
def test_optional_top_level_keys_may_be_missing(beamtime, key):
    doc = copy.deepcopy(beamtime.doc)
    del doc[key]
    beamtime.rewrite(doc)
    assert parse_metadata_file(beamtime.metadata).beamtime == "11019999"


def test_public_key_is_optional(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    del doc["onlineAnalysis"]["sshPublicKeyPath"]
    (beamtime.dir / "shared" / "id_rsa.pub").unlink()
    beamtime.rewrite(doc)
    assert parse_metadata_file(beamtime.metadata).online is not None


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("", "beamline"),
        ("", "corePath"),
        ("onlineAnalysis", "reservedNodes"),
        ("onlineAnalysis", "slurmPartition"),
        ("onlineAnalysis", "slurmReservation"),
        ("onlineAnalysis", "sshPrivateKeyPath"),
        ("onlineAnalysis", "userAccount"),
        ("asapo", "endpoint"),
        ("asapo", "beamtimeTokenPath"),
        ("asapo", "beamtimeClbtTokenPath"),
    ],
)
def test_missing_required_key_names_file_and_key_path(beamtime, section, key, secrets):
    doc = copy.deepcopy(beamtime.doc)
    del (doc[section] if section else doc)[key]
    error = _metadata_error(beamtime, doc)
    key_path = f"{section}.{key}" if section else key
    text = str(error)
    assert str(beamtime.metadata) in text
    assert key_path in text
    assert _one_line(text)
    assert error.path == str(beamtime.metadata)
    messages = error.messages[section] if section else error.messages
    assert key in messages
    _assert_no_secret(text, secrets)


def test_missing_both_ids(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    del doc["beamtimeId"]
    error = _metadata_error(beamtime, doc)
    assert "beamtimeId" in str(error) and "id" in str(error)
    assert "beamtimeId" in error.messages


def test_commissioning_id_must_start_with_c(commissioning):
    doc = copy.deepcopy(commissioning.doc)
    doc["id"] = "20210823_000_MAA"
    error = _metadata_error(commissioning, doc)
    assert "id" in error.messages


def test_several_errors_are_all_reported(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    del doc["corePath"]
    doc["onlineAnalysis"]["reservedNodes"] = ["ok-node", "bad node"]
    del doc["asapo"]["endpoint"]
    error = _metadata_error(beamtime, doc)
    text = str(error)
    assert "corePath" in text
    assert "onlineAnalysis.reservedNodes[1]" in text
    assert "asapo.endpoint" in text
    assert set(error.messages) == {"corePath", "onlineAnalysis", "asapo"}
    assert 1 in error.messages["onlineAnalysis"]["reservedNodes"]


def test_numbers_as_ids_become_strings(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    doc["beamtimeId"] = 11019999
    doc["onlineAnalysis"]["slurmReservation"] = 11019999
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    assert md.beamtime == "11019999" and isinstance(md.beamtime, str)
    assert md.online is not None
    assert md.online.slurm.reservation == "11019999"
    assert isinstance(md.online.slurm.reservation, str)


@pytest.mark.parametrize(
    "value", [True, 1.5, -5, None, [], {}, "", "../etc", "-rf", "a b", "1101\n", "x" * 200]
)
def test_bad_beamtime_ids(beamtime, value):
    doc = copy.deepcopy(beamtime.doc)
    doc["beamtimeId"] = value
    if value is None:
        # null beamtimeId is "no beamtimeId": still an invalid file (no "id" either)
        assert "beamtimeId" in _metadata_error(beamtime, doc).messages
        return
    doc["onlineAnalysis"]["slurmReservation"] = value
    error = _metadata_error(beamtime, doc)
    assert "beamtimeId" in error.messages
    assert "onlineAnalysis.slurmReservation" in str(error)
    assert _one_line(str(error))


def test_null_blocks_are_absent(beamtime, caplog):
    caplog.set_level(logging.INFO, logger="mento_fab")
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"] = None
    doc["asapo"] = None
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    assert md.online is None and md.asapo is None
    assert md.beamtime == "11019999"
    assert "no onlineAnalysis block" in caplog.text and "no asapo block" in caplog.text


def test_absent_blocks(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    del doc["onlineAnalysis"], doc["asapo"]
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    assert md.online is None and md.asapo is None


@pytest.mark.parametrize("block", ["onlineAnalysis", "asapo"])
@pytest.mark.parametrize("value", [[], "x", 3, True])
def test_blocks_of_the_wrong_type(beamtime, block, value):
    doc = copy.deepcopy(beamtime.doc)
    doc[block] = value
    error = _metadata_error(beamtime, doc)
    assert block in error.messages
    assert block in str(error)


def test_none_strings_mean_not_set(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    assert doc["contact"] == "None" and doc["unixId"] == "None"
    doc["onlineAnalysis"]["sshPublicKeyPath"] = "None"
    (beamtime.dir / "shared" / "id_rsa.pub").unlink()
    doc["asapo"] = "None"
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    assert md.asapo is None
    assert md.online is not None and md.online.ssh.user == "bttest02"


@pytest.mark.parametrize(
    "key", ["userAccount", "slurmReservation", "slurmPartition", "sshPrivateKeyPath"]
)
def test_none_string_in_a_required_key_is_an_error(beamtime, key):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"][key] = "None"
    error = _metadata_error(beamtime, doc)
    assert f"onlineAnalysis.{key}" in str(error)


def test_legacy_keys(beamtime, caplog):
    caplog.set_level(logging.INFO, logger="mento_fab")
    doc = copy.deepcopy(beamtime.doc)
    for new, old in [
        ("corePath", "core-path"),
        ("eventStart", "event-start"),
        ("eventEnd", "event-end"),
        ("beamlineAlias", "beamline_alias"),
    ]:
        doc[old] = doc.pop(new)
    doc["users"] = {"door-db": ["jdoe"]}
    del doc["asapo"]
    doc["onlineAnalysis"]["asapoBeamtimeTokenPath"] = "shared/asapo-token.txt"
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    assert md.corefs_path == "/asap3/petra3/gpfs/p11/2024/data/11019999"
    assert md.asapo is None
    assert "asapoBeamtimeTokenPath" in caplog.text


def test_new_key_wins_over_legacy_key(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    doc["core-path"] = "/somewhere/else"
    beamtime.rewrite(doc)
    assert parse_metadata_file(beamtime.metadata).corefs_path == doc["corePath"]


@pytest.mark.parametrize("beamline", ["P11", "p11", "P02_1", "P64", "P02.1", "p21.2"])
def test_blfs_mountpoint_is_lower_case_beamline(beamtime, beamline):
    doc = copy.deepcopy(beamtime.doc)
    doc["beamline"] = beamline
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    assert md.beamline == beamline
    assert md.online is not None
    assert md.online.blfs_mountpoint == f"/beamline/{beamline.lower()}"


@pytest.mark.parametrize(
    "beamline", ["", "../p11", "p11/x", "p 11", "p11\n", "-p11", 11, ".p11", "p21..1", ".."]
)
def test_bad_beamline(beamtime, beamline):
    doc = copy.deepcopy(beamtime.doc)
    doc["beamline"] = beamline
    error = _metadata_error(beamtime, doc)
    assert "beamline" in error.messages


# ---------------------------------------------------------------------------- names


HOSTILE_NODES = [
    "a;rm -rf /",
    "-oProxyCommand=x",
    "user@host",
    "$(x)",
    "`x`",
    "max p3a001",
    " max-p3a001",
    "",
    "a" * 300,
    "max-p3a001\n",
    "max-p3a001\nevil",
    "max-p3a[001-004]",
    "node,other",
    "node:22",
    "../node",
    "max-p3a001.",
    ".max-p3a001",
    "node-",
    "nöde",
    "a\x00b",
    "a\x1b[31mred",
    "host|cat",
    "host>x",
    "*",
]


@pytest.mark.parametrize("node", HOSTILE_NODES)
def test_hostile_node_names_are_rejected(beamtime, node):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"]["reservedNodes"] = ["max-p3a001", node]
    error = _metadata_error(beamtime, doc)
    text = str(error)
    assert "onlineAnalysis.reservedNodes[1]" in text
    assert error.messages["onlineAnalysis"]["reservedNodes"].keys() == {1}
    assert _one_line(text)
    assert len(text) < len(str(beamtime.metadata)) + 200  # a 300-char name is cut short


@pytest.mark.parametrize("nodes", [[], "max-p3a001", [1, 2], [None], {"a": "b"}])
def test_reserved_nodes_must_be_a_non_empty_list_of_names(beamtime, nodes):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"]["reservedNodes"] = nodes
    error = _metadata_error(beamtime, doc)
    assert "onlineAnalysis.reservedNodes" in str(error)


@pytest.mark.parametrize(
    "node", ["max-p3a001", "max-p3a001.desy.de", "cn01", "N1", "a" * 63, "123", "x-y-z"]
)
def test_valid_node_names(beamtime, node):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"]["reservedNodes"] = [node]
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    assert md.online is not None and md.online.nodes == [node]


@pytest.mark.parametrize(
    "user",
    [
        "root;id",
        "-oProxyCommand=x",
        "user@host",
        "$(id)",
        "`id`",
        "bt test",
        "",
        "a" * 33,
        "bttest02\n",
        "../bttest02",
        "bt/test",
        "bt:test",
        "1bttest",
        "bttëst",
        42,
        None,
        ["bttest02"],
    ],
)
def test_hostile_user_account_is_rejected(beamtime, user):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"]["userAccount"] = user
    error = _metadata_error(beamtime, doc)
    assert "onlineAnalysis.userAccount" in str(error)
    assert "userAccount" in error.messages["onlineAnalysis"]
    assert _one_line(str(error))


@pytest.mark.parametrize("user", ["bttest02", "_svc", "a" * 32, "bt.test-01"])
def test_valid_user_accounts(beamtime, user):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"]["userAccount"] = user
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    assert md.online is not None and md.online.ssh.user == user


# ---------------------------------------------------------------------------- files named


@pytest.mark.parametrize(
    ("name", "key_path"),
    [
        ("id_rsa", "onlineAnalysis.sshPrivateKeyPath"),
        ("asapo-token.txt", "asapo.beamtimeTokenPath"),
        ("asapo-token-clbt.txt", "asapo.beamtimeClbtTokenPath"),
    ],
)
def test_missing_key_or_token_file(beamtime, name, key_path, secrets, capsys):
    missing = beamtime.dir / "shared" / name
    missing.unlink()
    with pytest.raises(FileNotFoundError) as info:
        parse_metadata_file(beamtime.metadata)
    text = str(info.value)
    assert str(missing) in text
    assert key_path in text
    assert not isinstance(info.value, MetadataError)
    _assert_no_secret(text, secrets)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("key", "name"),
    [("sshPublicKeyPath", "id_rsa.pub"), ("asapoBeamtimeTokenPath", "legacy-token.txt")],
)
def test_a_file_the_objects_do_not_hold_may_be_missing(beamtime, key, name, caplog, capsys):
    """Issue 9: the public key and the legacy token path are never required to exist."""
    caplog.set_level(logging.DEBUG, logger="mento_fab")
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"][key] = f"shared/{name}"
    (beamtime.dir / "shared" / "id_rsa.pub").unlink()
    beamtime.rewrite(doc)
    for _ in range(2):  # validated, then from the cache
        caplog.clear()
        md = parse_metadata_file(beamtime.metadata)
        assert md.online is not None and md.online.ssh.key == str(beamtime.key)
        missing = [r for r in caplog.records if f"onlineAnalysis.{key}" in r.getMessage()]
        assert [r.levelno for r in missing] == [logging.DEBUG]
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("value", ["", "shared/id\x00rsa.pub", 5, ["a"]])
@pytest.mark.parametrize("key", ["sshPublicKeyPath", "asapoBeamtimeTokenPath"])
def test_the_form_of_an_optional_file_key_is_still_checked(beamtime, key, value):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"][key] = value
    error = _metadata_error(beamtime, doc)
    assert f"onlineAnalysis.{key}" in str(error)
    assert _one_line(str(error))


def test_a_directory_is_not_a_key_file(beamtime):
    beamtime.key.unlink()
    beamtime.key.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(beamtime.key))):
        parse_metadata_file(beamtime.metadata)


@pytest.mark.parametrize("value", ["", "shared/id\x00rsa", "shared/id\nrsa", 5, None, ["a"]])
def test_bad_path_values(beamtime, value):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"]["sshPrivateKeyPath"] = value
    error = _metadata_error(beamtime, doc)
    assert "onlineAnalysis.sshPrivateKeyPath" in str(error)
    assert _one_line(str(error))


def test_missing_metadata_file(tmp_path):
    path = tmp_path / "beamtime-metadata-1.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        parse_metadata_file(path)


# ---------------------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"beamline": "p11",', "invalid JSON"),
        (b"", "invalid JSON"),
        (b"{'beamline': 'p11'}", "invalid JSON"),
        (b'{"beamline": "p11"} trailing', "invalid JSON"),
        (b'{"beamline": "p\xff11"}', "not UTF-8"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b"[]", "array"),
        (b'[{"beamline": "p11"}]', "array"),
        (b'"a string"', "string"),
        (b"42", "int"),
        (b"null", "null"),
        (b"[" * 100_000, "invalid JSON"),
        (b"1" * 10_000, "invalid JSON"),
    ],
)
def test_broken_files_are_metadata_errors(beamtime, content, words, capsys, secrets):
    error = _metadata_error(beamtime, content)
    text = str(error)
    assert text.startswith(str(beamtime.metadata) + ": ")
    assert words in text
    assert _one_line(text)
    assert isinstance(error.messages, dict)
    assert capsys.readouterr() == ("", "")


def test_invalid_json_names_line_and_column(beamtime):
    error = _metadata_error(beamtime, b'{\n  "beamline": "p11"\n  "x": 1\n}')
    assert "line 3" in str(error)


# ---------------------------------------------------------------------------- secrets


def test_secrets_never_appear(beamtime, secrets, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    md = parse_metadata_file(beamtime.metadata)
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"]["userAccount"] = "bad user"
    doc["asapo"]["endpoint"] = ""
    error = _metadata_error(beamtime, doc)
    for text in (repr(md), str(md), str(error), repr(error), json.dumps(error.messages)):
        _assert_no_secret(text, secrets)
    _assert_no_secret(caplog.text, secrets)
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------- hostile text


def _set_path(doc: dict, key_path: str, value: object) -> None:
    target, parts = doc, re.findall(r"[^.\[\]]+", key_path)
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last = parts[-1]
    if last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value


@pytest.mark.parametrize(
    ("key_path", "value"),
    [
        ("corePath", "/asap3/x\x1b]0;pwned\x07"),  # sets the window title
        ("asapo.endpoint", "host:8400\r\nBeamtime  forged"),  # forges a line
        ("onlineAnalysis.slurmPartition", "all\x9b31m"),  # C1 CSI
        ("onlineAnalysis.reservedNodes[0]", "a\x00b"),
    ],
)
def test_control_characters_in_held_values_are_bad_input(beamtime, key_path, value, capsys):
    """Issue 8: escapes in a value the objects hold are refused at load time, naming the key."""
    doc = copy.deepcopy(beamtime.doc)
    _set_path(doc, key_path, value)
    error = _metadata_error(beamtime, doc)
    text = str(error)
    assert f"{key_path}: Control character" in text
    assert _one_line(text) and not re.search(r"[\x00-\x1f\x7f-\x9f]", text)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("key_path", "value"),
    [
        ("title", "Example\x1b[2J\x1b[H"),  # clears the screen
        ("users.doorDb[0]", "jdoe\x9b31m"),  # C1 CSI
        ("leader.email", "a\x00b"),
        ("beamlineSetup", "line one\nline two\ttabbed"),  # multi-line setup text
        ("applicant", {"e\x1b[2Jmail": "x"}),  # a key in free text
    ],
)
def test_control_characters_in_free_text_never_held_are_ignored(beamtime, key_path, value):
    """Free text the objects never hold (nor show) loads, as in the original."""
    doc = copy.deepcopy(beamtime.doc)
    _set_path(doc, key_path, value)
    beamtime.rewrite(doc)
    md = parse_metadata_file(beamtime.metadata)
    for text in (repr(md), str(md), json.dumps(dataclasses.asdict(md))):
        assert not re.search(r"[\x00-\x1f\x7f-\x9f]", text)


def test_a_control_character_in_a_key_is_named_escaped(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"]["e\x1b[2Jmail"] = "x"
    error = _metadata_error(beamtime, doc)
    assert "onlineAnalysis: Control character in a key: 'e\\x1b[2Jmail'" in str(error)
    assert "\x1b" not in str(error)


def test_several_problems_with_a_control_character_are_reported_together(beamtime):
    doc = copy.deepcopy(beamtime.doc)
    doc["asapo"]["endpoint"] = "\x1b[2J"
    del doc["corePath"]
    doc["onlineAnalysis"]["reservedNodes"] = ["ok", "bad\x1bnode"]
    error = _metadata_error(beamtime, doc)
    assert set(error.messages) >= {"asapo", "corePath", "onlineAnalysis"}
    assert len(error.messages["onlineAnalysis"]["reservedNodes"][1]) == 2


# ---------------------------------------------------------------------------- size limit


def test_a_huge_metadata_file_is_refused_without_reading_it(beamtime):
    """Issue 8: a 200 MB file is refused by its size, not read (it used to cost 630 MB)."""
    import tracemalloc

    with beamtime.metadata.open("r+b") as handle:
        handle.truncate(200 * 1024 * 1024)  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(MetadataError) as info:
            parse_metadata_file(beamtime.metadata)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "too large for a metadata file (209715200 bytes" in str(info.value)
    assert str(MAX_METADATA_BYTES) in str(info.value)
    assert peak < 1024 * 1024


def test_a_file_at_the_limit_is_read(beamtime):
    raw = json.dumps(beamtime.doc).encode()
    beamtime.rewrite(raw + b" " * (MAX_METADATA_BYTES - len(raw)))
    assert parse_metadata_file(beamtime.metadata).beamtime == "11019999"
    beamtime.rewrite(raw + b" " * (MAX_METADATA_BYTES - len(raw) + 1))
    with pytest.raises(MetadataError, match="too large"):
        parse_metadata_file(beamtime.metadata)


def test_an_endless_file_is_read_only_up_to_the_limit():
    """A character device (or a pipe) has no size to check first: the read itself is bounded."""
    with pytest.raises(MetadataError, match="too large for a metadata file"):
        parse_metadata_file("/dev/zero")
