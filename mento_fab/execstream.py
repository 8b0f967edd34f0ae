"""One command on a node as a byte stream: stdout read like a file, data sent to its stdin.

``put`` and ``get`` move whole trees through one exec channel each; this is the
channel's side of it. Every wait is cut into slices that check the connection, so a
node that vanishes ends the stream with :class:`~mento_fab.errors.NodeError` once
keepalives give up on it; stderr is drained all along (a command that writes a
lot of it must not stall the stream) and kept up to a limit.
"""

from __future__ import annotations

import contextlib
import select
import time

import fabric

from mento_fab.connection import ensure_open
from mento_fab.errors import EndedEarly, NodeError

__all__ = ["COMMAND_TIMEOUT", "EndedEarly", "ExecStream", "run_bytes"]

#: Seconds for a small command (a probe, a listing).
COMMAND_TIMEOUT = 60.0
#: Seconds between liveness checks while waiting on a channel.
POLL_SLICE = 5.0
#: Stderr kept per stream (a tar that complains about every file can say a lot).
MAX_STDERR = 64 * 1024


class ExecStream:
    """One exec channel: stdout read as a file (``read``), stderr kept on the side.

    Waits in slices and raises :class:`NodeError` when the connection is gone, so a
    node that vanishes ends the transfer once keepalives give up on it.
    """

    def __init__(self, conn: fabric.Connection, command: str, *, window: int | None = None):
        transport = ensure_open(conn)
        self.channel = transport.open_session(window_size=window, timeout=conn.connect_timeout)
        self.transport = transport
        self.stderr = bytearray()
        try:
            self._poll = select.poll()
            self._poll.register(self.channel.fileno(), select.POLLIN)
            self.channel.exec_command(command)
        except BaseException:
            self.channel.close()
            raise

    def _drain_stderr(self) -> None:
        while self.channel.recv_stderr_ready():
            data = self.channel.recv_stderr(65536)
            if len(self.stderr) < MAX_STDERR:
                self.stderr += data[: MAX_STDERR - len(self.stderr)]

    def read(self, size: int = -1) -> bytes:
        channel = self.channel
        while True:
            self._drain_stderr()
            if channel.recv_ready():
                return channel.recv(size if size > 0 else 1 << 20)
            if channel.eof_received or channel.closed:
                return b""
            if not self.transport.is_active():
                raise NodeError("connection lost during the transfer")
            self._poll.poll(POLL_SLICE * 1000)

    def send(self, data: bytes | memoryview) -> None:
        try:
            self.channel.sendall(data)
        except OSError:
            if not self.transport.is_active():
                raise NodeError("connection lost during the transfer") from None
            raise EndedEarly from None  # the remote command quit: its status says why
        self._drain_stderr()

    def finish(self) -> int:
        """Read to the end, wait for the exit status; the status (NodeError if lost)."""
        while self.read(1 << 20):
            pass
        channel = self.channel
        while not channel.status_event.wait(POLL_SLICE):
            if not self.transport.is_active():
                break
        self._drain_stderr()
        channel.close()
        if channel.exit_status == -1 or not channel.status_event.is_set():
            if not self.transport.is_active():
                raise NodeError("connection lost during the transfer")
            raise NodeError("the command on the node ended without an exit status")
        return int(channel.exit_status)

    def close(self) -> None:
        """Close the channel; a connection that is gone already is fine."""
        with contextlib.suppress(Exception):
            self.channel.close()

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


def run_bytes(conn: fabric.Connection, command: str) -> tuple[int, bytes, str]:
    """A small command whose stdout is bytes (names may not be UTF-8)."""
    stream = ExecStream(conn, command)
    out = bytearray()
    deadline = time.monotonic() + COMMAND_TIMEOUT
    try:
        while chunk := stream.read(1 << 20):
            out += chunk
            if time.monotonic() > deadline:
                raise NodeError(f"no answer within {COMMAND_TIMEOUT:g} s")
        return stream.finish(), bytes(out), stream.stderr_text
    finally:
        stream.close()
