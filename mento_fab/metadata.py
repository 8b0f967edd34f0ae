"""Beamtime metadata: the public API of the original ``mento.metadata``.

Code written against ``mento.metadata`` keeps working after changing only the
import. The dataclasses and the four functions keep their names, fields and
defaults; what changed underneath is that the file is validated by the
marshmallow schemas in :mod:`mento_fab.schemas`, every problem is reported as
one :class:`MetadataError` naming the file and the JSON key, and the library
logs instead of printing.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mento_fab.errors import MetadataError

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


@dataclass
class SSHInfo:
    """Contains authentication information for remotely connecting to reserved nodes via SSH."""

    user: str  # Temporary user, only available during beamtime (if reserved)
    key: str  # Absolute path of the private key file; its contents are never read here


@dataclass
class SlurmInfo:
    """Contains details of Slurm resource allocation, including reservation and partition."""

    partition: str
    reservation: str


@dataclass
class AsapoInfo:
    """Contains connection details for ASAPO (token *file paths*, never tokens)."""

    endpoint: str
    token_ro: str
    token_rw: str


@dataclass
class OnlineInfo:
    """Contains SSH, Slurm, temporary beamline filesystem info, names of reserved nodes."""

    ssh: SSHInfo
    slurm: SlurmInfo
    nodes: list = field(default_factory=list)  # Nodes reserved for beamtime duration
    blfs_mountpoint: str | None = None  # Beamline filesystem mounted on reserved nodes


@dataclass
class BeamtimeMetadata:
    """Contains all relevant metadata about current beamtime, and computing resources
    allocated to the beamtime for online processing."""

    beamline: str
    beamtime: str
    corefs_path: str
    tag: str  # 'current' or 'commissioning'
    online: OnlineInfo | None = None
    asapo: AsapoInfo | None = None


def get_active_session_root(root_dir: str | os.PathLike[str] = "/gpfs") -> Path:
    """Return the directory of the active session under ``root_dir``.

    ``current`` (user beamtime) wins over ``commissioning``; on the cluster, a
    ``root_dir`` inside a core-filesystem beamtime directory gives that directory.
    """
    top_dir = Path(root_dir)
    for name in ("current", "commissioning"):
        candidate = top_dir / name
        if candidate.is_dir():
            return candidate
    if not top_dir.exists():
        raise FileNotFoundError(f"{top_dir} not found")
    for absolute in dict.fromkeys((os.path.abspath(top_dir), str(top_dir.resolve()))):
        match = CORE_FS_BEAMTIME.match(absolute)
        if match:
            return Path(match.group(1))
    raise FileNotFoundError(f"No user beamtime or commissioning directory found under {root_dir}")


def locate_metadata_file(root_dir: str | os.PathLike[str] = "/gpfs") -> str:
    """Get the path to the metadata JSON file of the active beamtime or commissioning run.

    IT writes exactly one ``*metadata*.json`` per session: none is "not found",
    several is an error, never a guess.
    """
    session_root = get_active_session_root(root_dir)
    found = sorted(p for p in session_root.glob("*metadata*.json") if p.is_file())
    if not found:
        raise FileNotFoundError(f"Metadata file not found under {session_root}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise RuntimeError(f"Multiple metadata files found under {session_root}: {names}")
    return str(found[0])


def parse_metadata_file(metadatafile_path: str | os.PathLike[str]) -> BeamtimeMetadata:
    """Parse a beamtime metadata file into :class:`BeamtimeMetadata`.

    Raises ``FileNotFoundError`` when the file or a file it names is missing and
    :class:`MetadataError` for anything wrong inside it.
    """
    from mento_fab import metacache

    path = Path(metadatafile_path)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"Metadata file not found: {path}") from None
    except IsADirectoryError:
        raise MetadataError(path, "is a directory, not a metadata file") from None

    cached = metacache.lookup(path, raw)
    if cached is None:
        from mento_fab.schemas import load_document  # marshmallow: only for new content

        md, files = load_document(path, raw)
        metacache.store(path, raw, md, files)
    else:
        md, files = cached
    # After validation: a missing file is FileNotFoundError, not MetadataError.
    for key, file in files:
        try:
            present = os.path.isfile(file)
        except (OSError, ValueError):
            present = False
        if not present:
            raise FileNotFoundError(f"{file} not found (named by {key} in {path})")
    if md.online is None:
        log.info("%s: no onlineAnalysis block: no compute nodes reserved", path)
    if md.asapo is None:
        log.info("%s: no asapo block: no ASAPO stream for this beamtime", path)
    return md


def get_beamtime_metadata(root_dir: str | os.PathLike[str] = "/gpfs") -> BeamtimeMetadata:
    """Convenience function: locate the active session's metadata file and parse it."""
    return parse_metadata_file(locate_metadata_file(root_dir))
