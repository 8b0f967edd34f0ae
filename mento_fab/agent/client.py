"""Talking to this user's agent from any process: connect, ask, follow a call to its end.

Standard library only and never prints: the thin command-line client
(:mod:`mento_fab.cli.client`, which adds starting an agent and its messages) and
the library's :class:`~mento_fab.trigger.Trigger` (which never starts one) both
use it. A call is the ``run`` operation: an argv for the agent's invoke Program
with three file descriptors that become its stdin, stdout and stderr::

    sock = connect(wire.Names(wire.agent_dir()))
    reply = submit(sock, run_request(["mento-fab", "info"], "info", streams), (0, 1, 2))
    if reply["op"] == "accepted":
        status = wait_exit(sock)   # AgentLost if the agent goes away first
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Mapping, Sequence
from typing import Any

from mento_fab import defaults
from mento_fab.agent import wire
from mento_fab.errors import AgentError, AgentLost

__all__ = [
    "OFF",
    "connect",
    "current_umask",
    "disabled",
    "interrupt",
    "run_request",
    "stream_facts",
    "submit",
    "wait_exit",
]

#: Values of ``MENTO_AGENT`` that turn the agent off.
OFF = ("0", "no", "off", "false")


def disabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``MENTO_AGENT`` turns the agent off."""
    environ = os.environ if environ is None else environ
    return environ.get("MENTO_AGENT", "1").strip().lower() in OFF


def connect(names: wire.Names, timeout: float = 5.0) -> socket.socket:
    """A connection to the agent behind ``names.socket``, checked to be this user's.

    Raises ``FileNotFoundError``/``ConnectionRefusedError`` when no agent listens
    (a connection that succeeds means a live process accepted it), and
    :class:`AgentError` when the socket or its process belongs to somebody else.
    """
    info = os.lstat(names.socket)
    if not stat.S_ISSOCK(info.st_mode):
        raise AgentError(f"{names.socket} is not a socket")
    if info.st_uid != os.getuid():
        raise AgentError(f"{names.socket} is owned by uid {info.st_uid}, not by you")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(names.socket))
        uid = wire.peer_uid(sock)
        if uid != os.getuid():
            raise AgentError(f"the process behind {names.socket} runs as uid {uid}, not as you")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def stream_facts(streams: Sequence[Any]) -> dict[str, Any] | None:
    """How Python set up ``streams`` (stdin, stdout, stderr: encoding, buffering), which
    the agent must copy; None when one of them, or its descriptor, is closed."""
    facts: dict[str, Any] = {}
    for fd, (name, stream) in enumerate(zip(("stdin", "stdout", "stderr"), streams, strict=True)):
        try:
            os.fstat(fd)
        except OSError:
            return None
        if stream is None:
            return None
        facts[name] = {
            "encoding": stream.encoding,
            "errors": stream.errors,
            "line_buffering": bool(getattr(stream, "line_buffering", False)),
            "write_through": bool(getattr(stream, "write_through", False)),
        }
    return facts


def run_request(
    argv: Sequence[str],
    task: str | None,
    streams: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``run`` message for ``argv`` (``argv[0]`` is the program's name).

    The call runs with ``env`` (default: ours), our working directory and umask.
    Raises :class:`AgentError` when the working directory is gone.
    """
    try:
        cwd = os.getcwd()
    except OSError:
        raise AgentError("the working directory is gone") from None
    umask = current_umask()
    return {
        "op": "run",
        "protocol": wire.PROTOCOL,
        "fingerprint": wire.fingerprint(),
        "argv": list(argv),
        "task": task,
        "env": dict(os.environ if env is None else env),
        "cwd": cwd,
        "umask": umask,
        "streams": dict(streams),
    }


def submit(
    sock: socket.socket,
    request: Mapping[str, Any],
    fds: Sequence[int],
    timeout: float = defaults.AGENT_ANSWER_TIMEOUT,
) -> dict[str, Any]:
    """Send ``request`` with ``fds`` (stdin, stdout, stderr) and return the agent's answer:
    ``accepted`` (the call now runs there), or ``busy``/``stale`` with a ``reason``.

    The agent first says ``ready`` and runs the call only on our ``go``; so when no
    answer comes within ``timeout`` (a stopped or wedged agent), nothing ran there and
    the caller may run the call itself. Raises ``OSError`` (``TimeoutError``
    included)/``EOFError``/:class:`AgentError` when no answer came.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        wire.send(sock, request, fds=fds)
        reply, extra = wire.recv(sock)
    finally:
        sock.settimeout(previous)
    for fd in extra:
        with contextlib.suppress(OSError):
            os.close(fd)
    if reply.get("op") == "ready":
        wire.send(sock, {"op": "go"})
        return {**reply, "op": "accepted"}
    return reply


def interrupt(sock: socket.socket) -> bool:
    """Ctrl-C for the accepted call on ``sock``; False when the agent is gone already."""
    try:
        wire.send(sock, {"op": "interrupt"})
    except OSError:
        return False
    return True


def wait_exit(sock: socket.socket, pid: Any = None) -> int:
    """The exit status of the accepted call on ``sock``, once the agent sends it.

    Raises :class:`AgentLost` when the agent goes away first (the call ended with
    it: the agent's connections closed, and the nodes' watchdogs end the command).
    """
    while True:
        try:
            message, _ = wire.recv(sock)
        except (OSError, EOFError, AgentError):
            raise AgentLost(
                f"the connection agent (pid {pid}) was lost before the command finished"
            ) from None
        if message["op"] == "exit":
            return int(message.get("status", 1))


def current_umask() -> int:
    """This process's umask, read without setting it.

    ``os.umask`` can only be read by setting it: between the two calls another thread
    of the caller (a Trigger's background workers) would read 077 and put that back
    for good, and the script's files would end up private.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # no /proc: the only other way
    os.umask(umask)
    return umask
