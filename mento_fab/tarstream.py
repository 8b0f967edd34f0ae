"""Tar streams for ``put`` and ``get``: written straight from local files, read safely to disk.

A transfer is one tar stream over an SSH exec channel (``tar -x`` or ``tar -c`` on
the node): far less client CPU in paramiko than SFTP's request/response packets,
and one stream for a whole tree. Nothing is held in memory beyond one chunk.

Writing follows symbolic links (as ``scp`` does), skips directory loops and
special files, and sends exactly the size a file had when it was opened.
Reading refuses members that would land outside the destination (Python's
``data`` filter, which also sees through local symlinks), creates only regular
files and directories (never links or devices), writes each file under a
temporary name and renames it into place when complete, so an interrupted
transfer leaves no half file under a real name, and never replaces an existing
file unless told to.

>>> import io, tempfile, pathlib
>>> src = pathlib.Path(tempfile.mkdtemp()); (src / "a b.txt").write_text("hello")
5
>>> buf = io.BytesIO()
>>> warnings = write_tar(scan(src, "data")[0], buf.write)
>>> _ = buf.seek(0); dest = pathlib.Path(tempfile.mkdtemp())
>>> stats = extract(buf, dest)
>>> (dest / "data" / "a b.txt").read_text(), stats.files, stats.bytes
('hello', 1, 5)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mento_fab.errors import BadPath, LocalExists, UnsafeArchive

__all__ = ["CHUNK", "Entry", "ExtractStats", "UnsafeArchive", "extract", "scan", "write_tar"]

#: Bytes read from a file, or from the stream, at a time.
CHUNK = 1024 * 1024
#: Small pieces (headers, small files) are gathered up to this size before sending.
_GATHER = 256 * 1024
_BLOCK = 512

Send = Callable[[bytes | memoryview], object]
Progress = Callable[[int], object]


@dataclass(frozen=True)
class Entry:
    """One file or directory to send: its name in the stream and where it is read from."""

    name: str
    path: str
    is_dir: bool
    size: int
    mode: int
    mtime: float


def scan(local: str | os.PathLike[str], name: str) -> tuple[list[Entry], list[str]]:
    """Everything under ``local`` as entries named ``name/...``; and what was skipped, why.

    Symbolic links are followed; a link back to a directory being walked (a loop),
    a dangling link and sockets/FIFOs/devices are skipped.
    """
    root = os.fspath(local)
    try:
        info = os.stat(root)
    except FileNotFoundError:
        raise BadPath(f"{root}: no such file or directory") from None
    except OSError as exc:
        raise BadPath(f"{root}: {exc.strerror}") from None
    if stat.S_ISREG(info.st_mode):
        return [Entry(name, root, False, info.st_size, info.st_mode, info.st_mtime)], []
    if not stat.S_ISDIR(info.st_mode):
        raise BadPath(f"{root}: not a file or directory")
    entries: list[Entry] = []
    skipped: list[str] = []

    Seen = frozenset[tuple[int, int]]

    def walk(path: str, arc: str, st: os.stat_result, ancestors: Seen) -> None:
        entries.append(Entry(arc, path, True, 0, st.st_mode, st.st_mtime))
        ancestors = ancestors | {(st.st_dev, st.st_ino)}
        try:
            children = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(f"{path}: {exc.strerror}")
            return
        for child in children:
            try:
                cst = os.stat(child.path)
            except OSError as exc:
                skipped.append(f"{child.path}: {exc.strerror or exc}")  # e.g. a dangling link
                continue
            if stat.S_ISDIR(cst.st_mode):
                if (cst.st_dev, cst.st_ino) in ancestors:
                    skipped.append(f"{child.path}: a link back to a directory above it")
                    continue
                walk(child.path, f"{arc}/{child.name}", cst, ancestors)
            elif stat.S_ISREG(cst.st_mode):
                entries.append(
                    Entry(f"{arc}/{child.name}", child.path, False, cst.st_size, cst.st_mode,
                          cst.st_mtime)
                )  # fmt: skip
            else:
                skipped.append(f"{child.path}: not a regular file")

    walk(root, name, info, frozenset())
    return entries, skipped


def _header(entry: Entry, size: int) -> bytes:
    info = tarfile.TarInfo(entry.name)
    info.type = tarfile.DIRTYPE if entry.is_dir else tarfile.REGTYPE
    info.mode = stat.S_IMODE(entry.mode)
    info.mtime = int(entry.mtime)
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_tar(entries: list[Entry], send: Send, on_bytes: Progress | None = None) -> list[str]:
    """Send a tar stream of ``entries`` through ``send``; returns warnings (files not sent whole).

    Headers and small files are gathered into pieces of up to 256 kB; large files
    go out in 1 MB chunks, read into one reused buffer (``send`` must copy or
    consume the bytes before it returns, as ``Channel.sendall`` does).
    """
    warnings: list[str] = []
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    gathered = bytearray()

    def flush() -> None:
        if gathered:
            send(bytes(gathered))
            gathered.clear()

    for entry in entries:
        if entry.is_dir:
            gathered += _header(entry, 0)
            continue
        try:
            handle = open(entry.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            warnings.append(f"{entry.path}: not sent ({exc.strerror})")
            continue
        with handle:
            size = os.fstat(handle.fileno()).st_size
            gathered += _header(entry, size)
            left = size
            while left:
                n = handle.readinto(view[: min(CHUNK, left)])
                if not n:  # the file shrank while being sent: keep the stream well-formed
                    warnings.append(f"{entry.path}: changed while being sent (zero-filled)")
                    view[: min(CHUNK, left)] = bytes(min(CHUNK, left))
                    n = min(CHUNK, left)
                if n < _GATHER and len(gathered) + n <= _GATHER:
                    gathered += view[:n]
                else:
                    flush()
                    send(view[:n])
                left -= n
                if on_bytes is not None:
                    on_bytes(n)
            gathered += bytes(-size % _BLOCK)
        if len(gathered) >= _GATHER:
            flush()
    gathered += bytes(2 * _BLOCK)  # end of archive
    flush()
    return warnings


@dataclass
class ExtractStats:
    """What a stream put on disk."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    #: Members not written (special files, secrets), one line each.
    skipped: list[str] = field(default_factory=list)


class _Dirs:
    """Directories below ``root`` made on demand; none may be a symlink or a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.known: set[Path] = {root}

    def make(self, path: Path) -> None:
        if path in self.known:
            return
        self.make(path.parent)
        try:
            os.mkdir(path)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():
                raise LocalExists(f"{path} exists and is not a directory") from None
        self.known.add(path)


def _place(part: Path, target: Path, overwrite: bool) -> None:
    """Move a complete temporary file to its name; without ``overwrite``, never replace."""
    if overwrite:
        os.replace(part, target)
        return
    try:
        os.link(part, target)  # fails if the name exists: no window for a race
    except FileExistsError:
        raise LocalExists(f"{target} exists (use --overwrite to replace it)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(target):  # no hard links on this filesystem
            raise LocalExists(f"{target} exists (use --overwrite to replace it)") from None
        os.rename(part, target)
        return
    os.unlink(part)


class _Reader:
    """A forward-only file over ``source.read(n)``: tarfile reads headers through it, and
    a member's data goes from the received chunks straight to disk (no re-buffering)."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.pos = 0
        self.chunk = b""
        self.off = 0

    def _fill(self) -> bool:
        self.chunk = self.source.read(CHUNK)
        self.off = 0
        return bool(self.chunk)

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        parts = []
        need = size if size >= 0 else 1 << 62
        while need > 0:
            if self.off >= len(self.chunk) and not self._fill():
                break
            take = min(need, len(self.chunk) - self.off)
            parts.append(self.chunk[self.off : self.off + take])
            self.off += take
            need -= take
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.pos:
            raise OSError("a tar stream is read forwards only")
        while self.pos < pos and self.read(min(pos - self.pos, CHUNK)):
            pass
        return self.pos

    def copy(self, size: int, write: Callable[[memoryview], object]) -> None:
        """Pass the next ``size`` bytes to ``write`` as they arrive."""
        left = size
        while left:
            if self.off >= len(self.chunk) and not self._fill():
                raise tarfile.ReadError("unexpected end of data")
            take = min(left, len(self.chunk) - self.off)
            write(memoryview(self.chunk)[self.off : self.off + take])
            self.off += take
            self.pos += take
            left -= take


def _write_file(
    reader: _Reader, path: Path, size: int, digest: Any, on_bytes: Progress | None
) -> None:
    """The next ``size`` bytes of the stream into a new file ``path`` (never an existing one)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o600), "wb", buffering=0) as out:

        def write(data: memoryview) -> None:
            rest = data
            while rest:
                rest = rest[out.write(rest) :]
            if digest is not None:
                digest.update(data)
            if on_bytes is not None:
                on_bytes(len(data))

        reader.copy(size, write)


def extract(
    stream: BinaryIO,
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    on_bytes: Progress | None = None,
    refuse: Mapping[int, Mapping[str, str]] | None = None,
) -> ExtractStats:
    """Write the tar stream's files and directories below ``dest`` (created if missing).

    ``refuse`` maps a size to ``{sha256: what}``: a file of that size and content
    (a copy of the beamtime's key, say) is not written and is listed in ``skipped``.
    Raises :class:`UnsafeArchive` for a member that would leave ``dest``.
    """
    root = Path(dest).resolve()
    root.mkdir(parents=True, exist_ok=True)
    dirs = _Dirs(root)
    stats = ExtractStats()
    tag = secrets.token_hex(4)
    reader = _Reader(stream)
    archive = tarfile.open(  # noqa: SIM115 - a stream: nothing to close but the caller's
        fileobj=reader, mode="r:", encoding="utf-8", errors="surrogateescape"
    )
    for member in archive:
        if not (member.isreg() or member.isdir()):  # links, devices, FIFOs: never created
            stats.skipped.append(f"{member.name}: not a regular file")
            continue
        try:
            safe = tarfile.data_filter(member, str(root))
        except tarfile.FilterError as exc:
            raise UnsafeArchive(f"refused {member.name!r} from the node: {exc}") from None
        target = root / os.path.normpath(safe.name)
        if safe.isdir():
            dirs.make(target)
            stats.dirs += 1
            continue
        dirs.make(target.parent)
        wanted = (refuse or {}).get(safe.size)
        digest = hashlib.sha256() if wanted else None
        part = target.parent / f".{target.name}.mento-part-{tag}"
        try:
            _write_file(reader, part, safe.size, digest, on_bytes)
            if digest is not None and wanted and digest.hexdigest() in wanted:
                stats.skipped.append(
                    f"{safe.name}: not written (same content as {wanted[digest.hexdigest()]})"
                )
                os.unlink(part)
                continue
            os.chmod(part, stat.S_IMODE(safe.mode or 0o644))
            os.utime(part, (safe.mtime, safe.mtime))
            _place(part, target, overwrite)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        stats.files += 1
        stats.bytes += safe.size
    return stats
