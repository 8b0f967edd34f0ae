"""Talking to nodes for the workers: a command fed on stdin, and live log lines.

:func:`call` runs a command on its own channel, feeds it ``stdin`` (the
supervisor's source and the worker's environment, which must not appear in any
argv) and closes it. Unlike :func:`mento_fab.runner.execute` it adds no watchdog:
the supervisors ``start`` launches must outlive the channel, and the listings of
``ps`` and ``top`` are a few built-ins that end by themselves.

:class:`Follower` reads many long-running commands in one thread with
``select()`` and bounded buffers; closing it sends EOF to every remote command,
which is how ``logs --follow`` ends its ``tail`` processes on the nodes.
"""

from __future__ import annotations

import contextlib
import re
import select
import time
from collections.abc import Callable
from functools import cache
from importlib import resources

import fabric
import paramiko

from mento_fab import defaults
from mento_fab.connection import connection_node, describe_error, open_channel
from mento_fab.results import NodeResult

__all__ = ["Follower", "call", "payload"]

#: Longest line a follower hands on; longer ones are cut (bounded memory per node).
MAX_LINE = 64 * 1024
_DROP = re.compile(r"^from mento_fab\.workers\.supervisor import \(.*?^\)\n", re.M | re.S)
#: The node's python3 runs what it reads on stdin.
BOOTSTRAP = "import sys; exec(compile(sys.stdin.read(), 'mento-worker', 'exec'))"


@cache
def _source() -> str:
    package = resources.files("mento_fab.workers")
    supervisor = package.joinpath("supervisor.py").read_text(encoding="utf-8")
    launcher = package.joinpath("launcher.py").read_text(encoding="utf-8")
    launcher, dropped = _DROP.subn("", launcher)
    if dropped != 1:  # pragma: no cover - a broken edit of launcher.py
        raise RuntimeError("launcher.py: the supervisor import block was not found")
    return supervisor + "\n" + launcher


def payload(spec_json: str) -> bytes:
    """The script a node's python3 runs: supervisor + launcher + ``main(spec)``."""
    return (_source() + f"\nsys.exit(main({spec_json!r}))\n").encode("utf-8")


def call(
    conn: fabric.Connection,
    command: str,
    stdin: bytes = b"",
    *,
    timeout: float | None = None,
    max_output: int = defaults.MAX_OUTPUT,
) -> NodeResult:
    """Run ``command`` with ``stdin`` on one node; every failure ends up in the result."""
    result = NodeResult(node=connection_node(conn))
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    out, err = bytearray(), bytearray()
    channel = None
    try:
        channel = open_channel(conn)
        channel.exec_command(command)
        if stdin:
            channel.sendall(stdin)
            channel.shutdown_write()  # the node's python3 reads to EOF
        while True:
            while channel.recv_ready():
                _keep(out, channel.recv(65536), max_output, result, "stdout")
            while channel.recv_stderr_ready():
                _keep(err, channel.recv_stderr(65536), max_output, result, "stderr")
            drained = not channel.recv_ready() and not channel.recv_stderr_ready()
            if (channel.eof_received or channel.closed) and drained:
                break
            _alive(channel, deadline, timeout)
            select.select([channel], [], [], _left(deadline))
        # The output is complete; the exit status follows (a closed channel's pipe
        # stays readable, so waiting in select() here would spin).
        while not channel.status_event.wait(_left(deadline)):
            if channel.closed:
                break
            _alive(channel, deadline, timeout)
        if channel.status_event.is_set():
            result.exit = channel.exit_status
        else:
            result.error = "connection lost before the command finished"
    except _TimedOut as exc:
        result.error = str(exc)
    except Exception as exc:  # one node's failure is data
        result.error = describe_error(exc, conn.connect_timeout)
    finally:
        if channel is not None:
            channel.close()
    result.stdout = out.decode("utf-8", "replace")
    result.stderr = err.decode("utf-8", "replace")
    result.seconds = time.monotonic() - start
    return result


class _TimedOut(Exception):
    """The command's time is up, or its connection went."""


def _left(deadline: float | None) -> float:
    return 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))


def _alive(channel: paramiko.Channel, deadline: float | None, timeout: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _TimedOut(f"timed out after {timeout:g} s")
    if not channel.get_transport().is_active():
        raise _TimedOut("connection lost before the command finished")


def _keep(buf: bytearray, chunk: bytes, limit: int, result: NodeResult, stream: str) -> None:
    room = max(0, limit - len(buf))
    buf += chunk[:room]
    if len(chunk) > room:
        dropped = f"{stream}_dropped"
        setattr(result, dropped, getattr(result, dropped) + len(chunk) - room)


class Follower:
    """Live lines from one long-running command per node, read in the caller's thread.

    ``on_line(node, line)`` gets each complete line (cut at :data:`MAX_LINE`);
    ``on_end(node, result)`` once per node when its command ends or its
    connection goes. :meth:`close` sends EOF to every command still running.
    """

    def __init__(
        self,
        on_line: Callable[[str, str], None],
        on_end: Callable[[str, NodeResult], None] | None = None,
    ) -> None:
        self.on_line, self.on_end = on_line, on_end
        self.channels: dict[str, paramiko.Channel] = {}
        self._tails: dict[str, bytes] = {}
        self._errors: dict[str, bytes] = {}

    def open(self, conn: fabric.Connection, command: str) -> NodeResult | None:
        """Start ``command`` on ``conn``; a NodeResult (with the error) if that failed."""
        node = connection_node(conn)
        try:
            channel = open_channel(conn)
            channel.exec_command(command)
        except Exception as exc:
            return NodeResult(node=node, error=describe_error(exc, conn.connect_timeout))
        self.channels[node] = channel
        self._tails[node] = b""
        self._errors[node] = b""
        return None

    def _lines(self, node: str, chunk: bytes) -> None:
        data = self._tails[node] + chunk
        *lines, tail = data.split(b"\n")
        while len(tail) > MAX_LINE:
            lines.append(tail[:MAX_LINE])
            tail = tail[MAX_LINE:]
        self._tails[node] = tail
        for line in lines:
            self.on_line(node, line.decode("utf-8", "replace"))

    def _end(self, node: str) -> None:
        channel = self.channels.pop(node)
        tail = self._tails.pop(node)
        if tail:
            self.on_line(node, tail.decode("utf-8", "replace"))
        result = NodeResult(node=node, stderr=self._errors.pop(node).decode("utf-8", "replace"))
        if channel.exit_status_ready():
            result.exit = channel.recv_exit_status()
        elif not channel.get_transport().is_active():
            result.error = "connection lost"
        channel.close()
        if self.on_end is not None:
            self.on_end(node, result)

    def poll(self, timeout: float = 0.5) -> bool:
        """Hand on what arrived within ``timeout`` seconds; False once every command ended."""
        if not self.channels:
            return False
        ready = select.select(list(self.channels.values()), [], [], timeout)[0]
        for node, channel in list(self.channels.items()):
            if channel in ready or not channel.get_transport().is_active():
                while channel.recv_ready():
                    self._lines(node, channel.recv(65536))
                while channel.recv_stderr_ready():
                    err = self._errors[node] + channel.recv_stderr(65536)
                    self._errors[node] = err[-MAX_LINE:]
                gone = not channel.get_transport().is_active()
                if channel.eof_received or channel.closed or gone:
                    self._end(node)
        return bool(self.channels)

    def close(self) -> None:
        """EOF to every command still running (they end themselves), then close."""
        for channel in self.channels.values():
            with contextlib.suppress(Exception):  # the connection may already be gone
                channel.shutdown_write()
        # give sshd a moment to pass the EOF on before the channel goes
        deadline = time.monotonic() + 2.0
        for channel in self.channels.values():
            while not channel.closed and not channel.exit_status_ready():
                if time.monotonic() > deadline or not channel.get_transport().is_active():
                    break
                channel.status_event.wait(0.05)
            channel.close()
        self.channels.clear()
