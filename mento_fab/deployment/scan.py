"""A source tree as a release: which files, their content hash, and the archives to send.

The content hash (sorted paths, types, modes and contents) names a release, so an
unchanged tree is recognised without sending anything. Archives are plain tars
built on demand: the full one, or a delta holding only what a node's current
release lacks (the rest is hard-linked there, see :mod:`.remote`).

Ignore rules: :data:`DEFAULT_EXCLUDES`, then ``.mentoignore`` (gitignore syntax),
then the caller's patterns; directories holding a ``pyvenv.cfg`` are virtual
environments and never shipped.

>>> import pathlib, tempfile
>>> src = pathlib.Path(tempfile.mkdtemp())
>>> _ = (src / "analysis.py").write_text("print('hi')\\n")
>>> release = build_release(src)
>>> [e.path for e in release.files], len(release.content_hash)
(['analysis.py'], 64)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pathspec

from mento_fab.deployment.digests import DigestCache
from mento_fab.errors import BadInput, UnsafeSourceError

if TYPE_CHECKING:
    from mento_fab.deployment.secrets import SecretScan

__all__ = [
    "DEFAULT_EXCLUDES",
    "DIR",
    "FILE",
    "IGNORE_FILE",
    "LINK",
    "META_DIR",
    "VENV_DIR",
    "Entry",
    "Release",
    "build_release",
    "ignore_spec",
    "is_meta",
]

log = logging.getLogger(__name__)

#: Never shipped: VCS data, byte code, our own metadata directory. Virtual
#: environments are also recognised by their ``pyvenv.cfg``.
DEFAULT_EXCLUDES = (".git/", ".hg/", ".svn/", "__pycache__/", ".venv/", ".mento/")
IGNORE_FILE = ".mentoignore"
#: Generated files of a release (beamtime files, manifest, content hash, ready mark).
META_DIR = ".mento"
VENV_DIR = ".venv"
#: Entry kinds: directory, regular file, symbolic link.
DIR, FILE, LINK = "d", "f", "l"


def is_meta(path: str) -> bool:
    """True for ``.mento`` and anything below it (generated, never from the source)."""
    return path == META_DIR or path.startswith(META_DIR + "/")


@dataclass(frozen=True)
class Entry:
    """One path of a release: type, permission bits and content digest (or link target)."""

    path: str  # relative, POSIX, as str (surrogate-escaped when not UTF-8)
    kind: str  # DIR, FILE or LINK
    mode: int
    digest: str = ""  # sha256 of a file, target of a link, "" for a directory
    size: int = 0
    mtime: float = 0.0
    source: str | None = None  # local file to read; None for generated files
    data: bytes | None = dataclasses.field(default=None, repr=False)  # generated content

    def key(self) -> tuple[str, str, int, str]:
        """What must be equal for a file to be reused from an earlier release."""
        return (self.path, self.kind, self.mode, self.digest)


@dataclass
class Release:
    """A release built from a source tree: its entries, content hash and archives.

    Only the hash is computed eagerly (what a no-op needs); archives are built on
    demand, the full one at most once, deltas once per base release.
    """

    source: Path
    entries: list[Entry]
    content_hash: str
    created: str  # UTC time stamp, part of the name
    install: bool = False
    #: The secret scan this release passed (None: not checked for secrets).
    checked: str | None = None
    _archives: dict[str, bytes] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return f"{self.created}-{self.content_hash[:16]}"

    @property
    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == FILE]

    @property
    def user_files(self) -> list[Entry]:
        """Files from the source tree (without the generated ``.mento/`` ones)."""
        return [e for e in self.files if not is_meta(e.path)]

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def manifest(self) -> bytes:
        """The JSON manifest stored in the release; a later deploy diffs against it."""
        doc = {
            "hash": self.content_hash,
            "entries": [[e.path, e.kind, e.mode, e.digest] for e in self.entries],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def archive(self, base: list[list[Any]] | None = None) -> tuple[bytes, list[str]]:
        """A tar archive of what a node with release ``base`` (a manifest) lacks.

        Returns ``(archive, reused)``: ``reused`` are regular files the node hard-links
        from its current release instead of receiving them. ``base=None``: everything.
        """
        old: set[tuple[str, str, int, str]] = set()
        if base is not None:
            old = {(str(p), str(k), int(m), str(d)) for p, k, m, d in base}
        reused = [
            e.path
            for e in self.entries
            if e.kind == FILE and e.key() in old and not is_meta(e.path)
        ]
        cache_key = hashlib.sha256("\0".join(reused).encode("utf-8", "surrogateescape")).hexdigest()
        with self._lock:
            if cache_key not in self._archives:
                skip = set(reused)
                self._archives[cache_key] = self._tar(
                    [e for e in self.entries if e.path not in skip]
                )
            return self._archives[cache_key], reused

    def dropped(self, base: list[list[Any]]) -> list[str]:
        """Paths of a hard-linked copy of release ``base`` that this release replaces or lacks.

        Removed before the delta archive is unpacked, so a changed file is never
        written through a hard link into the base release.
        """
        new = {e.key() for e in self.entries}
        dirs = {e.path for e in self.entries if e.kind == DIR}
        drop = []
        for path, kind, mode, digest in base:
            path = str(path)
            if is_meta(path):
                continue  # the whole meta directory is replaced
            if kind == DIR:
                if path not in dirs:
                    drop.append(path)
            elif kind != FILE or (path, kind, int(mode), str(digest)) not in new:
                drop.append(path)  # links are always re-created from the archive
        return drop

    def _tar(self, entries: Sequence[Entry]) -> bytes:
        buffer = io.BytesIO()
        extra = [
            Entry(
                f"{META_DIR}/content-hash", FILE, 0o644, data=(self.content_hash + "\n").encode()
            ),
            Entry(f"{META_DIR}/manifest.json", FILE, 0o644, data=self.manifest()),
        ]
        with tarfile.open(
            fileobj=buffer,
            mode="w",
            format=tarfile.GNU_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            for entry in [*entries, *extra]:
                info = tarfile.TarInfo(entry.path)
                info.mode = entry.mode
                info.mtime = int(entry.mtime or time.time())
                info.uname = info.gname = ""
                if entry.kind == DIR:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == LINK:
                    info.type = tarfile.SYMTYPE
                    info.linkname = entry.digest
                    tar.addfile(info)
                elif entry.data is not None:
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
                else:
                    assert entry.source is not None
                    with open(entry.source, "rb") as handle:
                        info.size = os.fstat(handle.fileno()).st_size
                        tar.addfile(info, handle)
        return buffer.getvalue()


def ignore_spec(source: Path, excludes: Iterable[str]) -> pathspec.PathSpec:
    """The defaults, ``.mentoignore`` and ``excludes``, in that order (later lines win)."""
    lines = list(DEFAULT_EXCLUDES)
    ignore_file = source / IGNORE_FILE
    if ignore_file.is_file():
        lines += ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
    lines += list(excludes)
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _link_target(root: Path, path: Path, rel: str) -> str:
    """The symlink's target if it stays inside the tree (absolute ones made relative)."""
    target = os.readlink(path)
    parent = os.path.dirname(os.path.join(str(root), rel))
    resolved = os.path.normpath(os.path.join(parent, target))
    if os.path.commonpath([str(root), resolved]) != str(root):
        raise UnsafeSourceError(
            f"{root / rel}: symlink points outside the source tree ({target}); "
            "copy what it points to into the tree or exclude it"
        )
    if os.path.isabs(target):
        target = os.path.relpath(resolved, parent)
    return target


def _walk(root: Path, spec: pathspec.PathSpec, digests: DigestCache) -> list[Entry]:
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        kept_dirs = []
        for name in sorted(dirnames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = Path(dirpath, name)
            if full.is_symlink():  # os.walk lists links to directories as dirnames
                filenames.append(name)
                continue
            if spec.match_file(rel + "/") or (full / "pyvenv.cfg").is_file():
                log.debug("excluded directory %s", rel)
                continue
            kept_dirs.append(name)
            st = full.lstat()
            entries.append(Entry(rel, DIR, stat.S_IMODE(st.st_mode), mtime=st.st_mtime))
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = Path(dirpath, name)
            if spec.match_file(rel):
                log.debug("excluded file %s", rel)
                continue
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry(rel, LINK, 0o777, _link_target(root, full, rel)))
            elif stat.S_ISREG(st.st_mode):
                digest, size = digests.digest(rel, str(full), st)
                entries.append(Entry(rel, FILE, mode, digest, size, st.st_mtime, source=str(full)))
            else:
                log.warning("skipping %s: not a regular file, directory or symlink", rel)
    return entries


def build_release(
    source: str | os.PathLike[str],
    excludes: Iterable[str] = (),
    *,
    extra_files: dict[str, bytes] | None = None,
    install: bool = False,
    secrets: SecretScan | None = None,
) -> Release:
    """Scan ``source`` into a :class:`Release` (hash now, archives later).

    ``excludes`` are gitignore patterns added to the defaults and ``.mentoignore``.
    ``extra_files`` (``.mento/...`` paths) are generated files shipped with mode 0600,
    part of the hash. Symlinks are kept as links when they stay inside the tree and
    refused otherwise; sockets, FIFOs and devices are skipped.
    ``secrets`` (:class:`~mento_fab.deployment.secrets.SecretScan`) refuses a tree
    that holds a key or token; only a tree checked that way has its digests remembered.
    """
    root = Path(source).expanduser()
    if not root.is_dir():
        raise BadInput(f"source is not a directory: {root}")
    root = root.resolve()
    spec = ignore_spec(root, excludes)
    digests = DigestCache(root)
    entries = _walk(root, spec, digests)
    if secrets is not None:
        secrets.check(entries, digests)  # raises before anything is remembered
        digests.save()
    for rel, data in sorted((extra_files or {}).items()):
        if not is_meta(rel):
            raise BadInput(f"generated files must live under {META_DIR}/: {rel}")
        if not any(e.path == META_DIR for e in entries):
            entries.append(Entry(META_DIR, DIR, 0o700))
        entries.append(
            Entry(rel, FILE, 0o600, hashlib.sha256(data).hexdigest(), len(data), data=data)
        )
    entries.sort(key=lambda e: e.path.encode("utf-8", "surrogateescape"))
    digest = hashlib.sha256(b"mento-release-1\n")
    if install:
        digest.update(b"install\n")
    for e in entries:
        digest.update(
            f"{e.path}\0{e.kind}\0{e.mode:o}\0{e.digest}\n".encode("utf-8", "surrogateescape")
        )
    now = time.time()  # milliseconds: names sort by time even for quick redeploys
    created = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    checked = secrets.identity if secrets is not None else None
    return Release(root, entries, digest.hexdigest(), created, install, checked)
