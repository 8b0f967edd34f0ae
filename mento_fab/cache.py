"""The one place that knows where mento_fab keeps things on the client's disk.

Every cache (validated metadata, deploy digests, …) lives in
``$XDG_CACHE_HOME/mento_fab/<name>`` (``~/.cache/mento_fab/<name>``), holds names,
paths and digests only (never key or token contents), can be turned off with its
own environment switch, and is believed only when the directory is ours and
nobody else can write it. Any problem with a cache is a miss, never an error.

>>> import os, tempfile
>>> os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()
>>> c = Cache("example", switch="MENTO_EXAMPLE_CACHE")
>>> c.write("entry.json", b"{}")
True
>>> c.read("entry.json")
b'{}'
>>> os.environ["MENTO_EXAMPLE_CACHE"] = "0"
>>> Cache("example", switch="MENTO_EXAMPLE_CACHE").read("entry.json") is None
True
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["Cache", "base_dir"]

_OFF = ("0", "", "off", "no", "false")


def base_dir() -> Path:
    """``$XDG_CACHE_HOME/mento_fab`` (default ``~/.cache/mento_fab``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mento_fab"


class Cache:
    """A private directory of small files, written atomically.

    ``switch`` names the environment variable that turns the cache off (``=0``).
    """

    def __init__(self, name: str, *, switch: str) -> None:
        self.name = name
        self.switch = switch

    @property
    def enabled(self) -> bool:
        return os.environ.get(self.switch, "1").strip().lower() not in _OFF

    @property
    def directory(self) -> Path | None:
        """The cache's directory, or None when it is turned off."""
        return base_dir() / self.name if self.enabled else None

    def trusted(self) -> bool:
        """Only a directory of ours that nobody else can write holds entries we believe."""
        where = self.directory
        if where is None:
            return False
        try:
            info = where.stat()
        except OSError:
            return False
        return info.st_uid == os.geteuid() and not info.st_mode & 0o022

    def path(self, entry: str) -> Path | None:
        where = self.directory
        return None if where is None else where / entry

    def read(self, entry: str) -> bytes | None:
        """An entry's bytes, or None (off, missing, untrusted or unreadable)."""
        path = self.path(entry)
        if path is None or not self.trusted():
            return None
        try:
            return path.read_bytes()
        except OSError:
            return None

    def write(self, entry: str, data: bytes) -> bool:
        """Store an entry atomically (mode 0600 in a 0700 directory); False when not stored."""
        path = self.path(entry)
        if path is None:
            return False
        import tempfile  # only writers pay for it (tempfile imports shutil, random)

        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.trusted():
                return False
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            return False
        return True

    def entries(self) -> list[Path]:
        """The entries, oldest first (for pruning)."""
        where = self.directory
        if where is None or not self.trusted():
            return []
        try:
            found = [p for p in where.iterdir() if p.is_file() and not p.name.startswith(".")]
        except OSError:
            return []
        return sorted(found, key=lambda p: p.stat().st_mtime_ns)
