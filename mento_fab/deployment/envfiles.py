"""The beamtime's facts for code on the nodes: ``.mento/beamtime.env`` and ``beamtime.json``.

Every release carries them, so analysis code finds its beamtime, reservation and
ASAPO endpoint without the metadata file. Token *contents* are never read: the
files name token files as the nodes see them (:func:`node_path`), which is why
they need the session directory and therefore take a :class:`~mento_fab.session.Session`.

>>> node_path("/gpfs/current/shared/t.txt", "/gpfs/current", "/beamline/p11")
'/beamline/p11/shared/t.txt'
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import PurePosixPath

from mento_fab.deployment.scan import META_DIR
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.session import Session

__all__ = ["beamtime_files", "default_target", "node_path"]


def node_path(path: str, session_root: str | os.PathLike[str] | None, blfs: str | None) -> str:
    """Where a session file (a token file) is seen on the nodes.

    Decision: the beamline filesystem's session directory (the directory of the
    metadata file) is what the nodes see at ``blfs_mountpoint``, so
    ``<session root>/shared/asapo-token.txt`` becomes
    ``<blfs_mountpoint>/shared/asapo-token.txt``. Paths outside the session root
    (e.g. on the core filesystem, already visible on the cluster) stay as they are.
    """
    if not session_root or not blfs:
        return path
    root = os.path.abspath(session_root)
    absolute = os.path.abspath(path)
    if os.path.commonpath([root, absolute]) != root:
        return path
    rel = os.path.relpath(absolute, root)
    return str(PurePosixPath(blfs) / rel) if rel != "." else blfs


def beamtime_files(
    session: Session | BeamtimeMetadata | str | os.PathLike[str],
) -> dict[str, bytes]:
    """``.mento/beamtime.env`` and ``.mento/beamtime.json`` for a release: no secrets.

    Token values are file paths as the nodes see them; their contents are never
    read. A bare :class:`BeamtimeMetadata` knows no session directory: its token
    paths are written as they are.
    """
    session = Session.load(session)
    md, session_root = session.metadata, session.root
    online, asapo = md.online, md.asapo
    blfs = online.blfs_mountpoint if online else None
    values: dict[str, str | None] = {
        "beamline": md.beamline,
        "beamtime": md.beamtime,
        "tag": md.tag,
        "core_path": md.corefs_path,
        "blfs_mountpoint": blfs,
        "partition": online.slurm.partition if online else None,
        "reservation": online.slurm.reservation if online else None,
        "asapo_endpoint": asapo.endpoint if asapo else None,
        "asapo_token_ro_file": node_path(asapo.token_ro, session_root, blfs) if asapo else None,
        "asapo_token_rw_file": node_path(asapo.token_rw, session_root, blfs) if asapo else None,
    }
    env_lines = ["# written by mento_fab deploy: source it; token values are file paths"]
    for key, value in values.items():
        env_lines.append(f"MENTO_{key.upper()}={shlex.quote(value or '')}")
    return {
        f"{META_DIR}/beamtime.env": ("\n".join(env_lines) + "\n").encode(),
        f"{META_DIR}/beamtime.json": (json.dumps(values, indent=2) + "\n").encode(),
    }


def default_target(md: BeamtimeMetadata) -> str:
    """``~/mento_fab/<beamtime id>`` in the temporary account's home."""
    return f"~/mento_fab/{md.beamtime}"
