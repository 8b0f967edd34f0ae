"""Beamtime metadata: the public API of the original ``mento.metadata``.

Code written against ``mento.metadata`` keeps working after changing only the
import. The dataclasses (defined in :mod:`mento_fab.beamtime`) and the four
functions keep their names, fields and defaults; what changed underneath is
that the file is validated by the marshmallow schemas in :mod:`mento_fab.schemas`
(or, for an unchanged file, rebuilt from :mod:`mento_fab.metacache` without
marshmallow), every problem is reported as one :class:`MetadataError` naming the
file and the JSON key, and the library logs instead of printing.
docs/compatibility.md lists every difference from the original and why.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from mento_fab.beamtime import AsapoInfo, BeamtimeMetadata, OnlineInfo, SlurmInfo, SSHInfo
from mento_fab.defaults import MAX_METADATA_BYTES, ROOT_DIR
from mento_fab.errors import MetadataError, MissingFile, SeveralMetadataFiles, Unreadable

__all__ = [
    "AsapoInfo",
    "BeamtimeMetadata",
    "MetadataError",
    "OnlineInfo",
    "SSHInfo",
    "SlurmInfo",
    "get_active_session_root",
    "get_beamtime_metadata",
    "locate_metadata_file",
    "parse_metadata_file",
]

log = logging.getLogger(__name__)

#: A beamtime directory on the core filesystem, as seen from the cluster.
CORE_FS_BEAMTIME = re.compile(
    r"^(/asap3/[^/]+/gpfs/[^/]+/\d{4}/(?:data|commissioning)/[^/]+)(?:/.*)?$"
)


def get_active_session_root(root_dir: str | os.PathLike[str] = ROOT_DIR) -> Path:
    """Return the directory of the active session under ``root_dir``.

    ``current`` (user beamtime) wins over ``commissioning``; on the cluster, a
    ``root_dir`` inside a core-filesystem beamtime directory gives that directory.
    """
    top_dir = Path(root_dir)
    try:
        for name in ("current", "commissioning"):
            candidate = top_dir / name
            if candidate.is_dir():
                return candidate
        if not top_dir.exists():
            raise MissingFile(f"{top_dir} not found")
    except PermissionError:
        raise Unreadable(
            f"{top_dir}: permission denied (cannot look for a session in it)"
        ) from None
    for absolute in dict.fromkeys((os.path.abspath(top_dir), str(top_dir.resolve()))):
        match = CORE_FS_BEAMTIME.match(absolute)
        if match:
            return Path(match.group(1))
    raise MissingFile(f"No user beamtime or commissioning directory found under {root_dir}")


def locate_metadata_file(root_dir: str | os.PathLike[str] = ROOT_DIR) -> str:
    """Get the path to the metadata JSON file of the active beamtime or commissioning run.

    IT writes exactly one ``*metadata*.json`` per session: none is "not found",
    several is an error, never a guess.
    """
    session_root = get_active_session_root(root_dir)
    try:
        os.listdir(session_root)  # glob says "nothing" for a directory it may not read
    except PermissionError:
        raise Unreadable(f"{session_root}: permission denied (cannot list the session)") from None
    except OSError:
        pass  # gone or not a directory: glob finds nothing, "not found" below is right
    found = sorted(p for p in session_root.glob("*metadata*.json") if p.is_file())
    if not found:
        raise MissingFile(f"Metadata file not found under {session_root}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SeveralMetadataFiles(f"Multiple metadata files found under {session_root}: {names}")
    return str(found[0])


def _read(path: Path) -> bytes:
    """The file's bytes, refusing one larger than ``MAX_METADATA_BYTES`` without reading it.

    Opened non-blocking and checked before anything is read: a FIFO (``--metadata
    <fifo>``) would otherwise wait for a writer forever. A device such as
    ``/dev/zero`` has no size to check first: the read itself is bounded.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise MissingFile(f"Metadata file not found: {path}") from None
    except IsADirectoryError:  # a directory opens on Linux; this is for other systems
        raise MetadataError(path, "is a directory, not a metadata file") from None
    except PermissionError:
        raise Unreadable(f"{path}: permission denied (cannot read the metadata file)") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise MetadataError(path, "is a directory, not a metadata file")
        if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            raise MetadataError(path, "is not a regular file (a FIFO or a socket)")
        if info.st_size > MAX_METADATA_BYTES:
            raise MetadataError(path, _too_large(info.st_size))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(MAX_METADATA_BYTES + 1)  # a growing file: bounded too
    except PermissionError:  # some file systems check at read time
        raise Unreadable(f"{path}: permission denied (cannot read the metadata file)") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_METADATA_BYTES:
        raise MetadataError(path, _too_large(None))
    return raw


def _too_large(size: int | None) -> str:
    what = f"{size} bytes" if size is not None else "more than that"
    return f"too large for a metadata file ({what}; the limit is {MAX_METADATA_BYTES} bytes)"


def parse_metadata_file(metadatafile_path: str | os.PathLike[str]) -> BeamtimeMetadata:
    """Parse a beamtime metadata file into :class:`BeamtimeMetadata`.

    Raises ``FileNotFoundError`` when the file or a file the objects hold (the
    key, the token files) is missing and :class:`MetadataError` for anything
    wrong inside it. A file the objects do not hold (the public key, the legacy
    token path) may be missing.
    """
    from mento_fab import metacache  # hashlib, json: paid by the first load, not the import

    path = Path(metadatafile_path)
    raw = _read(path)
    cached = metacache.lookup(path, raw)
    if cached is None:
        from mento_fab.schemas import load_document  # marshmallow: only for new content

        md, files = load_document(path, raw)
        metacache.store(path, raw, md, files)
    else:
        md, files = cached
    # After validation: a missing file is FileNotFoundError, not MetadataError.
    for key, file, required in files:
        try:
            present = os.path.isfile(file)
        except (OSError, ValueError):
            present = False
        if present:
            continue
        if required:
            raise MissingFile(f"{file} not found (named by {key} in {path})")
        log.debug("%s: %s names %s, which is missing (not needed)", path, key, file)
    if md.online is None:
        log.info("%s: no onlineAnalysis block: no compute nodes reserved", path)
    if md.asapo is None:
        log.info("%s: no asapo block: no ASAPO stream for this beamtime", path)
    return md


def get_beamtime_metadata(root_dir: str | os.PathLike[str] = ROOT_DIR) -> BeamtimeMetadata:
    """Convenience function: locate the active session's metadata file and parse it."""
    return parse_metadata_file(locate_metadata_file(root_dir))
