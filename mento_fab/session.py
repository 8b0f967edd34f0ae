"""A beamtime session: the metadata, the file it came from, and the session directory.

This is the one place that decides *which* metadata file applies. The order is
the command line's (README, "Configuration precedence"): an explicit file beats an explicit root
directory; then ``$MENTO_METADATA``, then ``$MENTO_ROOT_DIR``; then the caller's
configuration (the CLI passes its config-file values); then ``/gpfs``. At every
level a file beats a directory.

Operations that need more than the parsed object, such as deploy translating
token paths as the nodes see them, take a :class:`Session` so that no caller has
to derive the session directory by hand.

>>> import json, pathlib, tempfile
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "current").mkdir()
>>> _ = (root / "current" / "beamtime-metadata-1.json").write_text(json.dumps({
...     "beamline": "p11", "beamtimeId": "1", "corePath": "/asap3/p11/1"}))
>>> s = Session.load(root_dir=root)
>>> s.metadata.beamtime, s.root == root / "current"
('1', True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mento_fab import defaults
from mento_fab.errors import NoOnlineAnalysis
from mento_fab.metadata import (
    BeamtimeMetadata,
    OnlineInfo,
    locate_metadata_file,
    parse_metadata_file,
)

__all__ = ["ENVIRONMENT", "Session", "metadata_file"]

#: The environment variables that name the metadata file or the root directory.
ENVIRONMENT = {"metadata": "MENTO_METADATA", "root_dir": "MENTO_ROOT_DIR"}

PathLike = str | os.PathLike[str]


def metadata_file(
    metadata: PathLike | None = None,
    root_dir: PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """The metadata file that applies (see the module docstring for the order).

    Raises ``FileNotFoundError``/``RuntimeError`` as :func:`locate_metadata_file` does.
    """
    environ = os.environ if environ is None else environ
    config = config or {}
    levels = (
        (metadata, root_dir),
        (environ.get(ENVIRONMENT["metadata"]), environ.get(ENVIRONMENT["root_dir"])),
        (config.get("metadata"), config.get("root_dir")),
    )
    for file, directory in levels:
        if file:
            return Path(file)
        if directory:
            return Path(locate_metadata_file(directory))
    return Path(locate_metadata_file(defaults.ROOT_DIR))


@dataclass(frozen=True)
class Session:
    """A parsed metadata file and where it lives."""

    metadata: BeamtimeMetadata
    #: The metadata file (None when the object was built by the caller).
    file: Path | None = None

    @property
    def root(self) -> Path | None:
        """The session directory (``/gpfs/current``): relative paths in the file start here."""
        return self.file.resolve().parent if self.file is not None else None

    @property
    def online(self) -> OnlineInfo:
        """The ``onlineAnalysis`` block, or :class:`NoOnlineAnalysis` when nothing was reserved."""
        if self.metadata.online is None:
            raise NoOnlineAnalysis(self.metadata.beamtime)
        return self.metadata.online

    @classmethod
    def load(
        cls,
        metadata: BeamtimeMetadata | Session | PathLike | None = None,
        root_dir: PathLike | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Session:
        """A session from a Session, an object, a file, or the active session."""
        if isinstance(metadata, Session):
            return metadata
        if isinstance(metadata, BeamtimeMetadata):
            return cls(metadata)
        path = metadata_file(metadata, root_dir, environ=environ, config=config)
        return cls(parse_metadata_file(path), path)
