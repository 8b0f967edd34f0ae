"""mento_fab.metadata against the original ``mento.metadata`` (desy-mento 0.2.2), side by side.

Every case builds one session tree and calls every public function of both
packages on it (the three that take a root directory, and ``parse_metadata_file``
on the case's file). They must agree (``compat_support.assert_same``) except
where the case lists an intended difference; each of those is a row of the
table in docs/compatibility.md, and the last test checks that the table and
the cases name the same ids.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mento.metadata as original
import pytest
from compat_support import (
    Outcome,
    assert_documented_error,
    assert_same,
    call,
    documented_cases,
)

import mento_fab.metadata as ours
from mento_fab.defaults import MAX_METADATA_BYTES
from mento_fab.errors import MetadataError, MissingFile

ROOT_FUNCTIONS = ("get_active_session_root", "locate_metadata_file", "get_beamtime_metadata")

#: What mento_fab does instead: an exception class, or a check of (theirs, ours).
Expected = type[BaseException] | Callable[[Outcome, Outcome], None]


@dataclass
class Case:
    id: str
    build: Callable[[Maker], tuple[Path, Path | None]]
    #: function name -> what mento_fab does instead of the original
    intended: dict[str, Expected] = field(default_factory=dict)
    needs_root: bool = False


@dataclass
class Maker:
    gpfs: Path
    session_at: Callable[..., Any]
    user_doc: dict[str, Any]
    commissioning_doc: dict[str, Any]
    core_fs: Path | None = None

    def session(
        self, kind: str = "current", mutate: Callable[[dict], Any] | None = None, **kwargs: Any
    ) -> tuple[Path, Path]:
        doc = copy.deepcopy(self.user_doc if kind == "current" else self.commissioning_doc)
        if mutate is not None:
            doc = mutate(doc) or doc
        session = self.session_at(self.gpfs, kind, doc, **kwargs)
        return session.root, session.metadata


CASES: list[Case] = []


def case(case_id: str, *, needs_root: bool = False, **intended: Expected):
    def register(build: Callable[[Maker], tuple[Path, Path | None]]):
        CASES.append(Case(case_id, build, intended, needs_root))
        return build

    return register


def loads_instead(theirs: Outcome, ours: Outcome) -> None:
    """The original refuses (or crashes on) what the spec allows; mento_fab loads it."""
    assert theirs.error is not None and ours.error is None, (theirs, ours)


def refuses(error: type[BaseException]) -> Callable[[Outcome, Outcome], None]:
    def check(theirs: Outcome, ours: Outcome) -> None:
        assert (
            theirs.crashed or theirs.error is None or not isinstance(ours.error, type(theirs.error))
        )
        assert_documented_error(ours, error)

    return check


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation: set (or delete, for ``DELETE``) the value at a dotted key path."""

    def mutate(doc: dict) -> None:
        *parents, last = path.split(".")
        target = doc
        for part in parents:
            target = target[part]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


DELETE = object()


# ---------------------------------------------------------------------------- the active session


@case("root-current")
def _(m: Maker):
    return m.session("current")


@case("root-commissioning")
def _(m: Maker):
    # The spec's commissioning example writes the beamline "P04"; see md-blfs-lower-case.
    return m.session("commissioning", _set("beamline", "p04"))


@case("root-current-wins")
def _(m: Maker):
    m.session("commissioning", _set("beamline", "p04"))
    return m.session("current")


@case("root-missing")
def _(m: Maker):
    return m.gpfs / "no-such-dir", None


@case("root-local-only")
def _(m: Maker):
    (m.gpfs / "local" / "beamtime-metadata-1.json").write_text("{}")
    return m.gpfs, None


@case("root-current-is-a-file")
def _(m: Maker):
    m.session("commissioning", _set("beamline", "p04"))
    (m.gpfs / "current").write_text("not a directory")
    return m.gpfs, None


@case("root-current-without-file")
def _(m: Maker):
    m.session("commissioning", _set("beamline", "p04"))
    (m.gpfs / "current").mkdir()
    return m.gpfs, None


@case("root-no-metadata-file")
def _(m: Maker):
    root, path = m.session("current")
    path.rename(path.with_name("notes.json"))
    return root, None


@case("root-several-files")
def _(m: Maker):
    root, path = m.session("current")
    shutil.copy(path, path.with_name("beamtime-metadata-2.json"))
    return root, None


@case(
    "md-metadata-directory",
    locate_metadata_file=MissingFile,
    get_beamtime_metadata=MissingFile,
)
def _(m: Maker):
    root, path = m.session("current")
    path.unlink()
    path.mkdir()  # a directory that matches *metadata*.json is not a metadata file
    return root, None


@case(
    "md-metadata-directory-beside-the-file",
    locate_metadata_file=loads_instead,
    get_beamtime_metadata=loads_instead,
)
def _(m: Maker):
    root, path = m.session("current")
    path.with_name("old-metadata.json").mkdir()
    return root, path


# ---------------------------------------------------------------------------- core filesystem


@case("root-core-fs-beamtime-dir", needs_root=True)
def _(m: Maker):
    assert m.core_fs is not None
    return m.core_fs, m.core_fs / "beamtime-metadata-11019999.json"


@case("root-core-fs-deeper", needs_root=True)
def _(m: Maker):
    assert m.core_fs is not None
    return m.core_fs / "raw" / "scan_001", m.core_fs / "beamtime-metadata-11019999.json"


@case("root-core-fs-no-id", needs_root=True)
def _(m: Maker):
    assert m.core_fs is not None
    return m.core_fs.parent, None


@case("root-core-fs-current-first", needs_root=True)
def _(m: Maker):
    assert m.core_fs is not None
    deeper = m.core_fs / "raw" / "scan_001"
    (deeper / "current").mkdir()
    return deeper, None


@case(
    "md-core-fs-through-a-symlink",
    needs_root=True,
    get_active_session_root=loads_instead,
    locate_metadata_file=loads_instead,
    get_beamtime_metadata=loads_instead,
)
def _(m: Maker):
    assert m.core_fs is not None
    link = m.gpfs.parent / "my-beamtime"
    link.symlink_to(m.core_fs / "raw")
    return link, None


# ---------------------------------------------------------------------------- whole files


@case("file-user-beamtime")
def _(m: Maker):
    return m.session("current")


@case("file-commissioning")
def _(m: Maker):
    return m.session("commissioning", _set("beamline", "p04"))


def _blfs_lower_case(theirs: Outcome, ours: Outcome) -> None:
    assert theirs.value["online"]["blfs_mountpoint"] == "/beamline/P04"
    assert ours.value["online"]["blfs_mountpoint"] == "/beamline/p04"
    theirs.value["online"]["blfs_mountpoint"] = "/beamline/p04"
    assert ours.value == theirs.value


@case(
    "md-blfs-lower-case",
    parse_metadata_file=_blfs_lower_case,
    get_beamtime_metadata=_blfs_lower_case,
)
def _(m: Maker):
    return m.session("commissioning")  # the spec's example, beamline "P04"


@case("file-beamline-with-a-dot")
def _(m: Maker):
    # PETRA III's P02.1, P21.1, P21.2: the original loads them.
    return m.session("current", _set("beamline", "p21.1"))


@case("file-commissioning-minimal")
def _(m: Maker):
    doc = {k: m.commissioning_doc[k] for k in ("beamline", "corePath", "generated", "id", "tag")}
    return m.session("commissioning", lambda _: copy.deepcopy(doc), files=False)


@case("file-no-blocks")
def _(m: Maker):
    return m.session(
        "current",
        lambda d: {k: v for k, v in d.items() if k not in ("onlineAnalysis", "asapo")},
        files=False,
    )


@case("file-both-ids")
def _(m: Maker):
    return m.session("current", _set("id", "c20210823_000_MAA"))


@case("file-ids-as-numbers")
def _(m: Maker):
    def mutate(doc: dict) -> None:
        doc["beamtimeId"] = 11019999
        doc["onlineAnalysis"]["slurmReservation"] = 11019999

    return m.session("current", mutate)


@case("file-unknown-keys")
def _(m: Maker):
    def mutate(doc: dict) -> None:
        for target in (doc, doc["onlineAnalysis"], doc["asapo"]):
            target["futureKey"] = {"nested": [1, None, "x"]}

    return m.session("current", mutate)


@case("file-relative-path")
def _(m: Maker):
    root, path = m.session("current")
    os.chdir(path.parent.parent)
    return root, Path(os.path.relpath(path))


@case("file-absolute-key-path")
def _(m: Maker):
    root, path = m.session("current")
    key = str(path.parent / "shared" / "id_rsa")
    path.write_text(path.read_text().replace('"shared/id_rsa"', f'"{key}"'))
    return root, path


@case("file-missing")
def _(m: Maker):
    return m.gpfs, m.gpfs / "current" / "beamtime-metadata-1.json"


@case("md-metadata-path-is-a-directory", parse_metadata_file=MetadataError)
def _(m: Maker):
    root, path = m.session("current")
    return root, path.parent


# ---------------------------------------------------------------------------- files named


@case("file-missing-public-key")
def _(m: Maker):
    root, path = m.session("current")
    (path.parent / "shared" / "id_rsa.pub").unlink()
    return root, path


@case("file-no-public-key-entry")
def _(m: Maker):
    return m.session("current", _set("onlineAnalysis.sshPublicKeyPath", DELETE))


@case("file-legacy-asapo-token-missing")
def _(m: Maker):
    def mutate(doc: dict) -> None:
        del doc["asapo"]
        doc["onlineAnalysis"]["asapoBeamtimeTokenPath"] = "shared/no-such-token.txt"

    return m.session("current", mutate)


for _name in ("id_rsa", "asapo-token.txt", "asapo-token-clbt.txt"):

    def _build(m: Maker, name: str = _name):
        root, path = m.session("current")
        (path.parent / "shared" / name).unlink()
        return root, path

    case(f"file-missing-{_name.replace('.', '-').replace('_', '-')}")(_build)


@case("md-key-is-a-directory", parse_metadata_file=MissingFile, get_beamtime_metadata=MissingFile)
def _(m: Maker):
    root, path = m.session("current")
    key = path.parent / "shared" / "id_rsa"
    key.unlink()
    key.mkdir()
    return root, path


@case(
    "md-key-path-not-text", parse_metadata_file=MetadataError, get_beamtime_metadata=MetadataError
)
def _(m: Maker):
    return m.session("current", _set("onlineAnalysis.sshPrivateKeyPath", 5))


@case(
    "md-public-key-path-not-text",
    parse_metadata_file=refuses(MetadataError),
    get_beamtime_metadata=refuses(MetadataError),
)
def _(m: Maker):
    return m.session("current", _set("onlineAnalysis.sshPublicKeyPath", 5))


# ---------------------------------------------------------------------------- required keys

for _path in (
    "beamline",
    "corePath",
    "onlineAnalysis.reservedNodes",
    "onlineAnalysis.slurmPartition",
    "onlineAnalysis.slurmReservation",
    "onlineAnalysis.userAccount",
    "onlineAnalysis.sshPrivateKeyPath",
    "asapo.endpoint",
    "asapo.beamtimeTokenPath",
    "asapo.beamtimeClbtTokenPath",
):
    case(f"file-without-{_path.replace('.', '-').lower()}")(
        lambda m, p=_path: m.session("current", _set(p, DELETE))
    )


@case("file-without-any-id")
def _(m: Maker):
    return m.session("current", _set("beamtimeId", DELETE))


@case("file-empty-online-block")
def _(m: Maker):
    return m.session("current", _set("onlineAnalysis", {}))


# ---------------------------------------------------------------------------- legacy keys


@case("file-legacy-keys-beside-core-path")
def _(m: Maker):
    def mutate(doc: dict) -> None:
        doc["event-start"] = doc.pop("eventStart")
        doc["event-end"] = doc.pop("eventEnd")
        doc["beamline_alias"] = doc.pop("beamlineAlias")
        doc["users"] = {"door-db": ["jdoe"]}

    return m.session("current", mutate)


@case("md-legacy-core-path", parse_metadata_file=loads_instead, get_beamtime_metadata=loads_instead)
def _(m: Maker):
    def mutate(doc: dict) -> None:
        doc["core-path"] = doc.pop("corePath")

    return m.session("current", mutate)


# ---------------------------------------------------------------------------- blocks and "None"


def _absent(theirs: Outcome, ours: Outcome) -> None:
    """The original crashes on a null (or "None") block; mento_fab reads it as absent."""
    assert theirs.crashed and ours.error is None, (theirs, ours)


for _block in ("onlineAnalysis", "asapo"):
    for _value, _label in ((None, "null"), ("None", "none-string")):
        case(
            f"md-{_block.lower()}-{_label}",
            parse_metadata_file=_absent,
            get_beamtime_metadata=_absent,
        )(lambda m, b=_block, v=_value: m.session("current", _set(b, v)))
    case(
        f"md-{_block.lower()}-a-list",
        parse_metadata_file=MetadataError,
        get_beamtime_metadata=MetadataError,
    )(lambda m, b=_block: m.session("current", _set(b, ["x"])))


#: Values the original takes as they are (or as ``str(value)``) and mento_fab refuses.
BAD_VALUES = {
    "md-hostile-node-name": ("onlineAnalysis.reservedNodes", ["max-p3a001", "a;rm -rf /"]),
    "md-nodes-a-string": ("onlineAnalysis.reservedNodes", "max-p3a001"),
    "md-nodes-empty": ("onlineAnalysis.reservedNodes", []),
    "md-hostile-user-account": ("onlineAnalysis.userAccount", "-oProxyCommand=x"),
    "md-user-account-none-string": ("onlineAnalysis.userAccount", "None"),
    "md-beamtime-id-null": ("beamtimeId", None),
    "md-beamtime-id-bool": ("beamtimeId", True),
    "md-core-path-null": ("corePath", None),
    "md-beamline-a-number": ("beamline", 11),
    "md-control-character": ("corePath", "/asap3/x\x1b[2J"),
    "md-core-path-none-string": ("corePath", "None"),
    "md-core-path-empty": ("corePath", ""),
    "md-endpoint-none-string": ("asapo.endpoint", "None"),
    "md-endpoint-empty": ("asapo.endpoint", ""),
    "md-partition-none-string": ("onlineAnalysis.slurmPartition", "None"),
}
for _id, (_path, _value) in BAD_VALUES.items():
    case(
        _id,
        parse_metadata_file=refuses(MetadataError),
        get_beamtime_metadata=refuses(MetadataError),
    )(lambda m, p=_path, v=_value: m.session("current", _set(p, v)))


@case("file-control-characters-in-free-text")
def _(m: Maker):
    def mutate(doc: dict) -> None:
        doc["title"] = "Example\x1b[2J"
        doc["beamlineSetup"] = "line one\nline two\ttabbed"

    return m.session("current", mutate)


@case(
    "md-commissioning-id-without-c",
    parse_metadata_file=refuses(MetadataError),
    get_beamtime_metadata=refuses(MetadataError),
)
def _(m: Maker):
    return m.session("commissioning", lambda d: {**d, "beamline": "p04", "id": "20210823_000"})


# ---------------------------------------------------------------------------- malformed files


def _raw(content: bytes) -> Callable[[Maker], tuple[Path, Path]]:
    def build(m: Maker) -> tuple[Path, Path]:
        root, path = m.session("current")
        path.write_bytes(content)
        return root, path

    return build


case("file-invalid-json")(_raw(b'{"beamline": "p11",'))
case("file-empty")(_raw(b""))
case("file-trailing-garbage")(_raw(b'{"beamline": "p11"} x'))
for _id, _content in {
    "md-not-utf8": b'{"beamline": "p\xff11"}',
    "md-top-level-array": b'[{"beamline": "p11"}]',
    "md-top-level-string": b'"beamline"',
    "md-top-level-null": b"null",
    "md-top-level-number": b"42",
}.items():
    case(
        _id,
        parse_metadata_file=refuses(MetadataError),
        get_beamtime_metadata=refuses(MetadataError),
    )(_raw(_content))


@case("md-utf8-bom", parse_metadata_file=loads_instead, get_beamtime_metadata=loads_instead)
def _(m: Maker):
    root, path = m.session("current")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    return root, path


@case(
    "md-too-large",
    parse_metadata_file=refuses(MetadataError),
    get_beamtime_metadata=refuses(MetadataError),
)
def _(m: Maker):
    root, path = m.session("current")
    raw = path.read_bytes()
    path.write_bytes(raw + b" " * (MAX_METADATA_BYTES + 1 - len(raw)))
    return root, path


# ---------------------------------------------------------------------------- the tests


@pytest.fixture
def core_fs(user_doc: dict[str, Any]) -> Iterator[Path]:
    """A beamtime directory under the real ``/asap3`` (removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("creating /asap3 needs root")
    asap3 = Path("/asap3")
    created = not asap3.exists()
    facility = asap3 / f"mentocompat-{uuid.uuid4().hex[:12]}"
    beamtime = facility / "gpfs" / "p11" / "2024" / "data" / "11019999"
    (beamtime / "raw" / "scan_001").mkdir(parents=True)
    try:
        yield beamtime
    finally:
        shutil.rmtree(facility, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                asap3.rmdir()


@pytest.mark.parametrize("item", CASES, ids=[c.id for c in CASES])
def test_same_as_the_original(
    item: Case, request, gpfs, session_at, user_doc, commissioning_doc, monkeypatch, capsys
):
    monkeypatch.chdir(gpfs.parent)
    maker = Maker(gpfs, session_at, user_doc, commissioning_doc)
    if item.needs_root:
        maker.core_fs = request.getfixturevalue("core_fs")
        name = "beamtime-metadata-11019999.json"
        session_at(maker.core_fs.parent, maker.core_fs.name, copy.deepcopy(user_doc), name=name)
        (maker.core_fs.parent / "local").rmdir()  # session_at writes <root>/local
    root, path = item.build(maker)
    calls = [(name, (root,)) for name in ROOT_FUNCTIONS]
    if path is not None:
        calls.append(("parse_metadata_file", (path,)))
    differences = 0
    for name, args in calls:
        theirs = call(getattr(original, name), *args)
        mine = call(getattr(ours, name), *args)
        expected = item.intended.get(name)
        if expected is None:
            assert_same(theirs, mine)
        elif isinstance(expected, type):
            assert (
                theirs.crashed
                or theirs.error is None
                or not isinstance(mine.error, type(theirs.error))
            ), f"{name}: no difference left ({theirs})"
            assert_documented_error(mine, expected)
            differences += 1
        else:
            expected(theirs, mine)
            differences += 1
    assert differences == len(item.intended)
    assert item.id.startswith("md-") == bool(differences), "md- ids are intended differences"
    capsys.readouterr()  # the original prints; mento_fab never does (test_metadata.py)


def test_every_intended_difference_is_documented():
    intended = {c.id for c in CASES if c.id.startswith("md-")}
    assert documented_cases("md") == intended


def test_the_original_is_the_one_compared():
    from importlib.metadata import version

    assert version("desy-mento") == "0.2.2"
    assert original.__file__ != ours.__file__
