"""A content-addressed cache of validated metadata files.

Validating means importing marshmallow, about 40 ms of every command (most of it
regexes compiled at import), for a file that changes once per beamtime. The
cache maps the file's exact bytes, its directory and the schema code to the
loaded object: an unchanged file loads without marshmallow, and any change to
the content, the location or the rules misses and is validated again. Only
valid results are stored; they hold names and paths, never key or token
contents. ``MENTO_METADATA_CACHE=0`` turns it off; any problem with the cache
is a miss, never an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from mento_fab.metadata import AsapoInfo, BeamtimeMetadata, OnlineInfo, SlurmInfo, SSHInfo
from mento_fab.names import BEAMLINE_RE, CONTROL_RE, HOSTNAME_RE, IDENTIFIER_RE, USERNAME_RE

__all__ = ["directory", "lookup", "store"]

#: Entries kept; a machine sees a handful of beamtimes, tests see many documents.
MAX_ENTRIES = 64
_SCHEMAS = Path(__file__).with_name("schemas.py")

Files = list[tuple[str, str]]


def directory() -> Path | None:
    """Where entries live (``$XDG_CACHE_HOME/mento_fab/metadata``), or None when off."""
    if os.environ.get("MENTO_METADATA_CACHE", "1") in ("0", "", "off", "no"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mento_fab" / "metadata"


def _trusted(where: Path) -> bool:
    """Only a directory of ours that nobody else can write holds entries we believe."""
    try:
        info = where.stat()
    except OSError:
        return False
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


def _key(path: Path, raw: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(_SCHEMAS.read_bytes())  # new rules, new keys
    digest.update(b"\0" + os.fsencode(path.resolve().parent) + b"\0")
    digest.update(raw)
    return digest.hexdigest()


def _name(value: Any, rule: re.Pattern[str]) -> str:
    """A cached name, held to the schema's rule again (the cache is not trusted blindly)."""
    if not isinstance(value, str) or not rule.match(value):
        raise ValueError("cached name breaks its rule")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str) or not os.path.isabs(value) or CONTROL_RE.search(value):
        raise ValueError("cached path is not absolute")
    return value


def _rebuild(data: dict[str, Any]) -> BeamtimeMetadata:
    online = data.get("online")
    asapo = data.get("asapo")
    if online is not None:
        if not isinstance(online["nodes"], list) or not online["nodes"]:
            raise ValueError("cached nodes are not a list")
        for node in online["nodes"]:
            _name(node, HOSTNAME_RE)
        _name(online["ssh"]["user"], USERNAME_RE)
        _path(online["ssh"]["key"])
        _name(online["slurm"]["partition"], IDENTIFIER_RE)
        _name(online["slurm"]["reservation"], IDENTIFIER_RE)
    if asapo is not None:
        _path(asapo["token_ro"])
        _path(asapo["token_rw"])
    _name(data["beamline"], BEAMLINE_RE)
    _name(data["beamtime"], IDENTIFIER_RE)
    return BeamtimeMetadata(
        beamline=data["beamline"],
        beamtime=data["beamtime"],
        corefs_path=data["corefs_path"],
        tag=data["tag"],
        online=None
        if online is None
        else OnlineInfo(
            ssh=SSHInfo(**online["ssh"]),
            slurm=SlurmInfo(**online["slurm"]),
            nodes=list(online["nodes"]),
            blfs_mountpoint=online["blfs_mountpoint"],
        ),
        asapo=None if asapo is None else AsapoInfo(**asapo),
    )


def lookup(path: Path, raw: bytes) -> tuple[BeamtimeMetadata, Files] | None:
    """The validated object for exactly these bytes at this place, if known."""
    where = directory()
    if where is None or not _trusted(where):
        return None
    try:
        entry = json.loads((where / f"{_key(path, raw)}.json").read_text(encoding="utf-8"))
        files = [(str(key), str(file)) for key, file in entry["files"]]
        return _rebuild(entry["metadata"]), files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store(path: Path, raw: bytes, md: BeamtimeMetadata, files: Files) -> None:
    """Remember a validated result (atomically, readable by the user only)."""
    where = directory()
    if where is None:
        return
    entry = {"metadata": dataclasses.asdict(md), "files": files}
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".entry-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(entry, handle)
        os.replace(tmp, where / f"{_key(path, raw)}.json")
        _prune(where)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def _prune(where: Path) -> None:
    entries = sorted(where.glob("*.json"), key=lambda p: p.stat().st_mtime)
    for old in entries[: max(0, len(entries) - MAX_ENTRIES)]:
        with contextlib.suppress(OSError):
            old.unlink()
