"""Content digests of source files, and the cache that spares hashing unchanged ones.

A redeploy of a large tree should hash only what changed. Like rsync's quick
check, a file whose (size, mtime, ctime, inode) is unchanged is taken to have
its remembered digest; ctime cannot be set back by any tool, so a file rewritten
with its old mtime is still seen. The digests live in one entry per source tree
of :class:`mento_fab.cache.Cache` (``$XDG_CACHE_HOME/mento_fab/digests``), which
decides where, whether (``MENTO_DIGEST_CACHE=0``) and when to believe it.

>>> import os, tempfile
>>> os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()
>>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
>>> _ = open(path, "w").write("hello\\n")
>>> file_digest(path)[1]
6
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mento_fab.cache import Cache

__all__ = ["CACHE", "RACY_NS", "DigestCache", "file_digest"]

log = logging.getLogger(__name__)

#: Where the digests live, and the switch that turns remembering them off.
CACHE = Cache("digests", switch="MENTO_DIGEST_CACHE")
#: A file whose mtime or ctime is this recent may still change within the same
#: clock tick: its digest is used but not remembered (git's "racy" rule).
RACY_NS = 2_000_000_000
_READ = 1 << 20


def file_digest(path: str) -> tuple[str, int]:
    """``(sha256 hex digest, size in bytes)`` of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class DigestCache:
    """The remembered digests of one source tree.

    Per relative path: ``[size, mtime_ns, ctime_ns, inode, digest, clean]`` where
    ``clean`` names the secret scan the file passed (``""``: none). Only a tree
    that passed a secret scan is saved, so no digest of a key or token is kept.
    """

    def __init__(self, root: Path) -> None:
        self.entry = hashlib.sha256(os.fsencode(root)).hexdigest()[:32] + ".json"
        self.known: dict[str, list[Any]] = {}
        self.seen: dict[str, list[Any]] = {}
        self._clean: dict[str, str] = {}
        raw = CACHE.read(self.entry)
        if raw is not None:
            try:
                known = json.loads(raw)
            except ValueError:
                known = None
            self.known = known if isinstance(known, dict) else {}

    def digest(self, rel: str, full: str, st: os.stat_result) -> tuple[str, int]:
        """The digest of ``full`` (relative path ``rel``), remembered or computed now."""
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        old = self.known.get(rel)
        if (
            isinstance(old, list)
            and len(old) == 6
            and old[:4] == key
            and isinstance(old[4], str)
            and isinstance(old[5], str)
        ):
            digest, size = old[4], st.st_size
            self._clean[rel] = old[5]
        else:
            digest, size = file_digest(full)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS and size == st.st_size:
            self.seen[rel] = [*key, digest, ""]
        return digest, size

    def clean(self, rel: str, scan: str) -> bool:
        """True when ``rel`` is unchanged since it passed secret scan ``scan``."""
        return bool(scan) and self._clean.get(rel) == scan

    def mark_clean(self, rel: str, scan: str) -> None:
        """Remember that ``rel`` (as seen in this scan) passed secret scan ``scan``."""
        if rel in self.seen:
            self.seen[rel][5] = scan

    def save(self) -> None:
        """Remember this scan's digests (a failure to write is a miss next time)."""
        if self.seen == self.known:
            return
        if not CACHE.write(self.entry, json.dumps(self.seen).encode()):
            log.debug("digest cache not saved")
