"""What the client and the agent share: the private directory, names, and the messages.

Standard library only (the thin client imports it). Messages are JSON objects
framed by a 4-byte length; the request carries the client's stdin, stdout and
stderr as file descriptors (``SCM_RIGHTS``), so the agent writes straight to the
client's terminal or pipe and ``isatty``/terminal size are the real ones.

The directory is ``$MENTO_AGENT_DIR``, else ``$XDG_RUNTIME_DIR/mento_fab``, else
``/tmp/mento_fab-<uid>``; it must be a real directory owned by the user and closed
to everybody else (0700), and both ends check the other's uid with ``SO_PEERCRED``.

>>> a, b = socket.socketpair()
>>> send(a, {"op": "status"}); recv(b)[0]
{'op': 'status'}
>>> peer_uid(a) == os.getuid()
True
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mento_fab.errors import AgentError

__all__ = [
    "PROTOCOL",
    "Names",
    "agent_dir",
    "fingerprint",
    "identity",
    "peer_uid",
    "private_dir_problem",
    "recv",
    "send",
]

#: Bumped whenever a message changes meaning; an agent refuses other versions.
PROTOCOL = 2  # 2: a call starts on the client's "go" after the agent's "ready"
#: The largest message accepted (argv and environment of one call).
MAX_MESSAGE = 8 * 1024 * 1024
_HEADER = struct.Struct(">I")
_PACKAGE = Path(__file__).resolve().parent.parent


def agent_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The directory of this user's agents (not created here)."""
    environ = os.environ if environ is None else environ
    if environ.get("MENTO_AGENT_DIR"):
        return Path(environ["MENTO_AGENT_DIR"])
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and private_dir_problem(Path(runtime)) is None:
        return Path(runtime) / "mento_fab"
    return Path(f"/tmp/mento_fab-{os.getuid()}")


def private_dir_problem(path: Path, *, create: bool = False) -> str | None:
    """Why ``path`` is not a directory only this user can enter (None when it is)."""
    if create:
        try:
            path.mkdir(mode=0o700, parents=False)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"cannot create {path}: {exc.strerror or exc}"
    try:
        info = path.lstat()
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory"
    if info.st_uid != os.getuid():
        return f"{path} is owned by uid {info.st_uid}, not by you (uid {os.getuid()})"
    if info.st_mode & 0o077:
        return f"{path} is open to others (mode {stat.S_IMODE(info.st_mode):04o}, needs 0700)"
    return None


def identity() -> str:
    """Which installation an agent runs: interpreter, package directory and version.

    Agents of different installations (two checkouts, an upgrade) live side by side
    under different names instead of serving each other's calls.
    """
    from mento_fab import __version__

    text = "\0".join((os.path.realpath(sys.executable), str(_PACKAGE), __version__))
    return _checksum(text.encode())[:12]


def fingerprint() -> str:
    """The state of the package's source files (name, size, mtime): an edit is noticed."""
    entries = []
    stack = [_PACKAGE]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                        stack.append(Path(entry.path))
                    elif entry.name.endswith(".py"):
                        info = entry.stat()
                        entries.append(f"{entry.path}\0{info.st_size}\0{info.st_mtime_ns}")
        except OSError:
            continue
    return _checksum("\n".join(sorted(entries)).encode())


def _checksum(data: bytes) -> str:
    """16 hex digits telling inputs apart (not a secret's digest: zlib, not hashlib).

    ``hashlib`` loads OpenSSL, about 10 ms of every thin client's start; these names
    only tell one installation or one state of the code from another.
    """
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


class Names:
    """The files of one agent in the directory: socket, pid file, log and start lock."""

    def __init__(self, directory: Path, ident: str | None = None) -> None:
        self.dir = directory
        self.ident = ident or identity()
        self.socket = directory / f"agent-{self.ident}.sock"
        self.pid = directory / f"agent-{self.ident}.pid"
        self.log = directory / f"agent-{self.ident}.log"
        self.lock = directory / f"agent-{self.ident}.lock"

    @classmethod
    def all_in(cls, directory: Path) -> list[Names]:
        """Every agent that left a socket in ``directory`` (any installation)."""
        try:
            found = sorted(p.name for p in directory.glob("agent-*.sock"))
        except OSError:
            return []
        return [cls(directory, name[len("agent-") : -len(".sock")]) for name in found]


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a UNIX socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def send(sock: socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """One framed JSON message, with ``fds`` passed along (SCM_RIGHTS) if given."""
    body = json.dumps(message, separators=(",", ":")).encode()
    data = _HEADER.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise EOFError("connection closed in the middle of a message")
        chunks += chunk
    return bytes(chunks)


def recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """The next message and any file descriptors that came with it.

    Raises ``EOFError`` when the other end closed before a message began, and
    :class:`AgentError` for anything that is not a message of ours.
    """
    fds: list[int] = []
    header = b""
    while len(header) < _HEADER.size:
        if max_fds and not header:
            # socket.recv_fds drops its flags argument: recvmsg itself, so that the
            # descriptors arrive close-on-exec (never inherited by the agent's children).
            chunk, ancdata, flags, _ = sock.recvmsg(
                _HEADER.size, socket.CMSG_SPACE(max_fds * 4), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(data) - len(data) % 4
                    fds += struct.unpack(f"{usable // 4}i", data[:usable])
            if flags & socket.MSG_CTRUNC:
                _close(fds)
                raise AgentError("too many file descriptors in a message")
        else:
            chunk = sock.recv(_HEADER.size - len(header))
        if not chunk:
            _close(fds)
            if header:
                raise EOFError("connection closed in the middle of a message")
            raise EOFError("connection closed")
        header += chunk
    (size,) = _HEADER.unpack(header)
    try:
        if size > MAX_MESSAGE:
            raise AgentError(f"message of {size} bytes is too large")
        try:
            message = json.loads(_recv_exactly(sock, size))
        except ValueError:
            raise AgentError("not a message of the mento-fab agent") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise AgentError("not a message of the mento-fab agent")
    except BaseException:
        _close(fds)
        raise
    return message, fds


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
