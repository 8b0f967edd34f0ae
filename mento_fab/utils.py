"""Path helpers for trigger scripts: the original ``mento.utils`` functions.

A file written at the beamline is seen at ``/gpfs/current/raw/...``; on the
cluster the same file is ``<corePath>/raw/...`` on the core filesystem, and on a
reserved node the beamline filesystem is also mounted at ``/beamline/<beamline>``.
These functions map one to the other by splitting the path at a directory both
sides share, with the original's names, parameters, defaults, results and
exception types (docs/compatibility.md). One addition: ``remote_dir`` may be
left out, and then comes from the active beamtime's metadata (``corefs_path``,
``blfs_mountpoint``; the file is found as :class:`mento_fab.session.Session`
finds it: ``$MENTO_METADATA``, ``$MENTO_ROOT_DIR``, ``/gpfs``)::

    from mento_fab.utils import get_path_core, get_path_mountpoint, prepare_results_filename

    data = "/gpfs/current/raw/scan_042/img_0001.h5"
    get_path_core(data)       # <corePath>/raw/scan_042/img_0001.h5
    results = prepare_results_filename(data)
    # /gpfs/current/processed/onlineanalysis/scan_042/img_0001_results.h5 (directory created)
    get_path_mountpoint(results)  # /beamline/p11/current/processed/onlineanalysis/scan_042/...

>>> get_path_core("/gpfs/current/raw/scan_1/a.h5", "/asap3/petra3/gpfs/p11/2024/data/1")
'/asap3/petra3/gpfs/p11/2024/data/1/raw/scan_1/a.h5'
>>> get_path_mountpoint("/gpfs/current/processed/a_results.h5", "/beamline/p11")
'/beamline/p11/current/processed/a_results.h5'
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from mento_fab.beamtime import BeamtimeMetadata
from mento_fab.errors import NoOnlineAnalysis, UnmappablePath

__all__ = ["get_path_core", "get_path_mountpoint", "make_writable_dir", "prepare_results_filename"]

PathLike = str | os.PathLike[str]

#: Where results go when the caller names no other root: as the original.
RESULTS_ROOT = "processed/onlineanalysis"
#: The part appended to a data file's stem to name its results file.
RESULTS_SUFFIX = "_results"


class _Default(str):
    """A default the caller did not give: equal to the original's, but recognisable."""


#: ``get_path_mountpoint``'s ``split_at`` left out: the original's ``"current"``, or the
#: active session's directory when ``remote_dir`` is left out too (a commissioning run).
_SESSION_DIR = _Default("current")


def _from(path: PathLike, directory: str, target: str) -> tuple[str, ...]:
    """The parts of ``path`` from the first ``directory`` on (UnmappablePath without one)."""
    parts = PurePath(path).parts
    if directory not in parts:
        raise UnmappablePath(f"cannot map {path} to {target}: no {directory!r} directory in it")
    return parts[parts.index(directory) :]


def get_path_core(
    local_path: PathLike, remote_dir: PathLike | None = None, split_at: str = "raw"
) -> str:
    """The path on the core filesystem of a file seen at the beamline.

    ``remote_dir`` is the beamtime's directory there (default: the active
    beamtime's ``corefs_path``); ``local_path`` is split at its first
    ``split_at`` directory. Raises ``FileNotFoundError`` (:class:`UnmappablePath`)
    when ``local_path`` has no such directory.
    """
    if remote_dir is None:
        remote_dir = _active().corefs_path
    return str(Path(remote_dir, *_from(local_path, split_at, str(remote_dir))))


def get_path_mountpoint(
    local_path: PathLike, remote_dir: PathLike | None = None, split_at: str = _SESSION_DIR
) -> str:
    """The path on a reserved node, under the beamline filesystem's mount, of a results file.

    The original's rule: ``<remote_dir>/<split_at>/processed/...``, with
    ``local_path`` split at its first ``processed`` directory (``split_at`` names
    the session directory: ``current`` or ``commissioning``). ``remote_dir``
    defaults to the active beamtime's ``blfs_mountpoint``
    (:class:`~mento_fab.errors.NoOnlineAnalysis` when no nodes were reserved), and
    then ``split_at`` defaults to the active session's directory too.
    """
    if remote_dir is None:
        md = _active()
        if md.online is None or md.online.blfs_mountpoint is None:
            raise NoOnlineAnalysis(md.beamtime, "compute nodes (which mount the beamline)")
        remote_dir = md.online.blfs_mountpoint
        if split_at is _SESSION_DIR:
            split_at = md.tag  # "current" or "commissioning"
    root = Path(remote_dir, split_at)
    return str(Path(root, *_from(local_path, "processed", str(root))))


def make_writable_dir(dir_name: PathLike) -> None:
    """Create ``dir_name`` (and its parents) and make it readable and writable by everyone.

    Mode 0777 on purpose, as the original: the directory is created by the
    acquisition process (the beamline's account, often with a restrictive umask
    inherited from the control system), and the analysis writes into it from the
    reserved nodes as the *temporary beamtime account*, which shares neither the
    owner nor a group with it. Only the leaf gets the explicit mode; parents
    follow the umask.
    """
    directory = Path(dir_name)
    directory.mkdir(mode=0o777, parents=True, exist_ok=True)
    directory.chmod(0o777)  # mkdir's mode is masked by the umask


def prepare_results_filename(
    data_file_path: PathLike, data_root: str | None = None, results_root: str | None = None
) -> str:
    """The results file's path for a data file, after creating its directory.

    The directory mirrors the data file's: its first ``data_root`` directory
    (default ``raw``) is replaced by ``results_root`` (default
    ``processed/onlineanalysis``); the directory is created by
    :func:`make_writable_dir`. The file is named ``<stem>_results<suffix>`` and
    not created. Raises ``FileNotFoundError`` (:class:`UnmappablePath`) when the
    data file's directory has no ``data_root`` part.
    """
    data_file = PurePath(data_file_path)
    data_root = data_root or "raw"
    parts = data_file.parent.parts
    if data_root not in parts:
        raise UnmappablePath(f"no {data_root!r} directory in the path of {data_file_path}")
    cut = parts.index(data_root)
    results_dir = Path(*parts[:cut], results_root or RESULTS_ROOT, *parts[cut + 1 :])
    make_writable_dir(results_dir)
    return str(results_dir / f"{data_file.stem}{RESULTS_SUFFIX}{data_file.suffix}")


def _active() -> BeamtimeMetadata:
    """The active beamtime, read again on every call (the facility may rewrite the file)."""
    from mento_fab.session import Session  # loaded only when remote_dir is left out

    return Session.load().metadata
