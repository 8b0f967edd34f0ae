"""A content-addressed cache of validated metadata files.

Validating means importing marshmallow, about 40 ms of every command (most of it
regexes compiled at import), for a file that changes once per beamtime. The
cache maps the file's exact bytes, its directory and the rules' code to the
validated plain data: an unchanged file loads without marshmallow, and any
change to the content, the location or the rules misses and is validated again.
Entries are rebuilt by the same constructor the schemas use
(:func:`mento_fab.beamtime.from_dict`, which re-checks every name and path), so
an entry is never believed blindly. Only valid results are stored; they hold
names and paths, never key or token contents. Where entries live, whether they
are trusted and the ``MENTO_METADATA_CACHE=0`` switch are :class:`mento_fab.cache.Cache`'s;
any problem with the cache is a miss, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from mento_fab.beamtime import BeamtimeMetadata, from_dict, to_dict
from mento_fab.cache import Cache

__all__ = ["CACHE", "Files", "directory", "lookup", "store"]

#: Entries kept; a machine sees a handful of beamtimes, tests see many documents.
MAX_ENTRIES = 64
#: The code that decides what a valid file is and what it becomes: new rules, new keys.
_RULES = tuple(Path(__file__).with_name(name) for name in ("schemas.py", "beamtime.py", "names.py"))

CACHE = Cache("metadata", switch="MENTO_METADATA_CACHE")

#: ``(key path, absolute path, required)`` as :data:`mento_fab.schemas.Files`.
Files = list[tuple[str, str, bool]]


def directory() -> Path | None:
    """Where entries live (``$XDG_CACHE_HOME/mento_fab/metadata``), or None when off."""
    return CACHE.directory


def _entry(path: Path, raw: bytes) -> str:
    digest = hashlib.sha256()
    for rules in _RULES:
        digest.update(rules.read_bytes())
    digest.update(b"\0" + os.fsencode(path.resolve().parent) + b"\0")
    digest.update(raw)
    return f"{digest.hexdigest()}.json"


def lookup(path: Path, raw: bytes) -> tuple[BeamtimeMetadata, Files] | None:
    """The validated object for exactly these bytes at this place, if known."""
    if not CACHE.enabled:
        return None
    try:
        data = CACHE.read(_entry(path, raw))
        if data is None:
            return None
        entry = json.loads(data)
        files = [(str(key), str(file), bool(required)) for key, file, required in entry["files"]]
        return from_dict(entry["metadata"]), files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store(path: Path, raw: bytes, md: BeamtimeMetadata, files: Files) -> None:
    """Remember a validated result (atomically, readable by the user only)."""
    if not CACHE.enabled:
        return
    with contextlib.suppress(OSError):
        entry = json.dumps({"metadata": to_dict(md), "files": files}).encode()
        if CACHE.write(_entry(path, raw), entry):
            _prune()


def _prune() -> None:
    entries = CACHE.entries()
    for old in entries[: max(0, len(entries) - MAX_ENTRIES)]:
        with contextlib.suppress(OSError):
            old.unlink()
