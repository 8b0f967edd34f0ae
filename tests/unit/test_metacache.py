"""The validated-metadata cache: same bytes, same place, same rules -> no marshmallow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mento_fab.schemas
from mento_fab import metacache
from mento_fab.metadata import MetadataError, parse_metadata_file


@pytest.fixture
def session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MENTO_METADATA_CACHE", raising=False)
    current = tmp_path / "gpfs" / "current"
    (current / "shared").mkdir(parents=True)
    (current / "shared" / "id_rsa").write_text("not a real key")
    path = current / "beamtime-metadata-1.json"
    doc = {
        "beamline": "p11",
        "beamtimeId": "1",
        "corePath": "/asap3/petra3/gpfs/p11/2026/data/1",
        "onlineAnalysis": {
            "reservedNodes": ["cn01", "cn02"],
            "slurmPartition": "lab",
            "slurmReservation": "1",
            "userAccount": "bt1",
            "sshPrivateKeyPath": "shared/id_rsa",
        },
    }
    path.write_text(json.dumps(doc))
    return path


def _no_marshmallow(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("validated again")

    monkeypatch.setattr(mento_fab.schemas, "load_document", refuse)


def test_an_unchanged_file_loads_from_the_cache(session: Path, monkeypatch) -> None:
    first = parse_metadata_file(session)
    _no_marshmallow(monkeypatch)
    assert parse_metadata_file(session) == first
    entries = list(metacache.directory().glob("*.json"))
    assert len(entries) == 1 and entries[0].stat().st_mode & 0o077 == 0


def test_changed_content_is_validated_again(session: Path) -> None:
    parse_metadata_file(session)
    doc = json.loads(session.read_text())
    doc["onlineAnalysis"]["reservedNodes"] = ["cn01", "bad;name"]
    session.write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match=r"reservedNodes\[1\]"):
        parse_metadata_file(session)


def test_a_named_file_is_checked_on_every_load(session: Path, monkeypatch) -> None:
    parse_metadata_file(session)
    _no_marshmallow(monkeypatch)
    (session.parent / "shared" / "id_rsa").unlink()
    with pytest.raises(FileNotFoundError, match="sshPrivateKeyPath"):
        parse_metadata_file(session)


def test_the_same_bytes_elsewhere_resolve_their_own_paths(session: Path, tmp_path: Path) -> None:
    first = parse_metadata_file(session)
    other = tmp_path / "elsewhere"
    (other / "shared").mkdir(parents=True)
    (other / "shared" / "id_rsa").write_text("x")
    copy = other / session.name
    copy.write_bytes(session.read_bytes())
    second = parse_metadata_file(copy)
    assert second.online.ssh.key == str(other / "shared" / "id_rsa")
    assert first.online.ssh.key != second.online.ssh.key


def test_a_corrupt_entry_is_a_miss_and_the_cache_can_be_off(session: Path, monkeypatch) -> None:
    parse_metadata_file(session)
    for entry in metacache.directory().glob("*.json"):
        entry.write_text("{not json")
    assert parse_metadata_file(session).beamtime == "1"
    monkeypatch.setenv("MENTO_METADATA_CACHE", "0")
    assert metacache.directory() is None
    _no_marshmallow(monkeypatch)
    with pytest.raises(AssertionError, match="validated again"):
        parse_metadata_file(session)


def test_a_tampered_entry_is_not_believed(session: Path) -> None:
    parse_metadata_file(session)
    (entry,) = metacache.directory().glob("*.json")
    data = json.loads(entry.read_text())
    data["metadata"]["online"]["nodes"] = "cn01"
    data["metadata"]["online"]["ssh"]["user"] = "-oProxyCommand=x"
    entry.write_text(json.dumps(data))
    md = parse_metadata_file(session)  # validated again from the file itself
    assert md.online.nodes == ["cn01", "cn02"] and md.online.ssh.user == "bt1"


def test_a_cache_directory_others_can_write_is_ignored(session: Path, monkeypatch) -> None:
    parse_metadata_file(session)
    metacache.directory().chmod(0o777)
    _no_marshmallow(monkeypatch)
    with pytest.raises(AssertionError, match="validated again"):
        parse_metadata_file(session)


def test_a_cached_load_imports_no_marshmallow_in_a_fresh_process(session: Path) -> None:
    parse_metadata_file(session)
    code = (
        "import sys; from mento_fab.metadata import parse_metadata_file; "
        f"md = parse_metadata_file({str(session)!r}); "
        "print(md.beamtime, sorted(m for m in sys.modules if m.startswith('marshmallow')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["1", "[]"]


def test_the_cache_and_the_schemas_do_not_import_metadata() -> None:
    """One direction: metadata -> (metacache, schemas) -> beamtime; no cycle behind lazy imports."""
    code = (
        "import sys, mento_fab.metacache, mento_fab.schemas; "
        "print('mento_fab.metadata' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "False"


def test_a_tampered_entry_with_a_control_character_is_not_believed(session: Path) -> None:
    parse_metadata_file(session)
    (entry,) = metacache.directory().glob("*.json")
    data = json.loads(entry.read_text())
    data["metadata"]["corefs_path"] = "/asap3/\x1b[2J"
    entry.write_text(json.dumps(data))
    assert parse_metadata_file(session).corefs_path == "/asap3/petra3/gpfs/p11/2026/data/1"
