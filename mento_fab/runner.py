"""Run one command on many Connections with a fan-out limit and bounded time.

Every node ends as a :class:`NodeResult` (exit status or error), never as an
exception: one dead node must not hide what happened on the other 31.

Commands go straight to a paramiko session channel and are read with
``select`` on the channel, not through invoke's Runner, whose 10 ms polling
loop and reader/stdin threads dominate the cost of a command on an open
connection (a ``true`` completes in a few milliseconds here).
"""

from __future__ import annotations

import os
import re
import select
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fabric
import paramiko

from mento_fab import defaults
from mento_fab.connection import connection_node, describe_error, ensure_open, open_channel
from mento_fab.errors import BadInput, NodeError
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.nodes import nodes_group
from mento_fab.results import NodeResult, RunReport

__all__ = [
    "DEFAULT_FANOUT",
    "UNREACHABLE_EXIT",
    "NodeError",
    "NodeResult",
    "RunReport",
    "describe_error",
    "ensure_open",
    "execute",
    "map_nodes",
    "open_channel",
    "run",
    "run_on_nodes",
]

DEFAULT_FANOUT = defaults.FANOUT
UNREACHABLE_EXIT = defaults.UNREACHABLE_EXIT
KILL_GRACE = defaults.KILL_GRACE
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

T = TypeVar("T")
LineCallback = Callable[[str, str, str], None]  # node, "stdout"|"stderr", line


def _remote_command(command: str, env: Mapping[str, str] | None, timeout: float | None) -> str:
    """The command line sent to the node's shell; everything variable is quoted."""
    line = command
    if timeout is not None:
        # timeout(1) puts the command in its own process group and kills the whole
        # group, so children die too; -k escalates to SIGKILL for the stubborn.
        line = (
            f"exec timeout -k {KILL_GRACE / 2:g} {timeout:g} "
            f'"${{SHELL:-/bin/sh}}" -c {shlex.quote(command)}'
        )
    if env:
        for name in env:
            if not _ENV_NAME.match(name):
                raise BadInput(f"not a valid environment variable name: {name!r}")
        exports = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
        line = f"export {exports}; {line}"
    return line


class _Deadline(Exception):
    """The command's own time is up (distinct from connect timeouts, which are errors)."""


#: Longest wait between liveness checks while a command runs.
POLL_SLICE = 5.0


def _slice(deadline: float | None) -> float:
    if deadline is None:
        return POLL_SLICE
    return max(0.0, min(POLL_SLICE, deadline - time.monotonic()))


def _check_alive(transport: paramiko.Transport, deadline: float | None) -> None:
    """Raise when the command's time is up or the connection is gone."""
    if deadline is not None and time.monotonic() >= deadline:
        raise _Deadline
    if not transport.is_active():
        raise NodeError("connection lost before the command finished")


class _LineSplitter:
    """Turns chunks into complete lines for live callbacks; keeps the tail until EOF."""

    def __init__(self, node: str, stream: str, callback: LineCallback) -> None:
        self.node, self.stream, self.callback = node, stream, callback
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        *lines, self.tail = (self.tail + chunk).split(b"\n")
        for line in lines:
            self.callback(self.node, self.stream, line.decode("utf-8", "replace"))

    def close(self) -> None:
        if self.tail:
            self.callback(self.node, self.stream, self.tail.decode("utf-8", "replace"))
            self.tail = b""


def execute(
    conn: fabric.Connection,
    command: str,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    channel: paramiko.Channel | None = None,
) -> NodeResult:
    """Run ``command`` on one Connection; every failure ends up in the result.

    ``channel``, from :func:`open_channel`, lets a caller that must know whether
    anything reached the node (a retry must never run a command twice) open the
    session itself; ``execute`` takes it over and closes it.
    """
    node = connection_node(conn)
    start = time.monotonic()
    result = NodeResult(node=node)
    out, err = bytearray(), bytearray()
    splitters = (
        (_LineSplitter(node, "stdout", on_line), _LineSplitter(node, "stderr", on_line))
        if on_line
        else None
    )
    try:
        line = _remote_command(command, env, timeout)
        if channel is None:
            channel = open_channel(conn)
        transport = channel.get_transport()
        channel.exec_command(line)
        channel.shutdown_write()  # no stdin: a command that reads it sees EOF, not a hang
        deadline = None if timeout is None else time.monotonic() + timeout + KILL_GRACE
        while True:
            while channel.recv_ready():
                chunk = channel.recv(65536)
                out += chunk
                if splitters:
                    splitters[0].feed(chunk)
            while channel.recv_stderr_ready():
                chunk = channel.recv_stderr(65536)
                err += chunk
                if splitters:
                    splitters[1].feed(chunk)
            drained = not channel.recv_ready() and not channel.recv_stderr_ready()
            if (channel.eof_received or channel.closed) and drained:
                break
            _check_alive(transport, deadline)
            select.select([channel], [], [], _slice(deadline))
        # Output is complete; the exit status follows (or the command still runs
        # after closing its output). Wait in slices so a dead node is noticed.
        while not channel.status_event.wait(_slice(deadline)):
            if channel.closed:
                break
            _check_alive(transport, deadline)
        status = channel.exit_status if channel.status_event.is_set() else -1
        ran_out = timeout is not None and time.monotonic() - start >= timeout
        if ran_out and status in (124, 137, -1):  # -1: timeout -k's KILL took the shell too
            result.error = f"timed out after {timeout:g} s (remote command killed)"
        elif status == -1 and transport.is_active():
            result.error = "killed by a signal (no exit status)"
        elif status == -1:
            result.error = "connection lost before the command finished"
        else:
            result.exit = status
    except _Deadline:
        result.error = f"timed out after {timeout:g} s"
    except Exception as exc:  # one node's failure is data, not an exception
        result.error = describe_error(exc, conn.connect_timeout)
    finally:
        if channel is not None:
            channel.close()
        if splitters:
            for splitter in splitters:
                splitter.close()
    result.stdout = out.decode("utf-8", "replace")
    result.stderr = err.decode("utf-8", "replace")
    result.seconds = time.monotonic() - start
    return result


def map_nodes(
    connections: Iterable[fabric.Connection],
    func: Callable[[fabric.Connection], T],
    *,
    fanout: int = DEFAULT_FANOUT,
    on_done: Callable[[str, T | BaseException], None] | None = None,
    executor: ThreadPoolExecutor | None = None,
) -> dict[str, T | BaseException]:
    """Call ``func`` on each Connection, at most ``fanout`` at a time.

    The building block for deploy and slurm: returns ``{node: value or exception}``
    in node order; exceptions are returned, not raised. ``executor`` (with at most
    ``fanout`` workers) reuses threads across calls; ``func`` must not wait on it.
    """
    conns = list(connections)
    if fanout < 1:
        raise BadInput("fanout must be at least 1")
    if not conns:
        return {}
    outcome: dict[str, T | BaseException] = {connection_node(c): None for c in conns}  # type: ignore[misc]

    def call(conn: fabric.Connection) -> None:
        node = connection_node(conn)
        was_worker = getattr(_worker, "active", False)
        _worker.active = True
        try:
            try:
                value: T | BaseException = func(conn)
            except Exception as exc:
                value = exc
            outcome[node] = value
            if on_done is not None:
                on_done(node, value)
        finally:
            _worker.active = was_worker

    if len(conns) == 1 or fanout == 1:
        for conn in conns:
            call(conn)
    elif executor is not None:
        list(executor.map(call, conns))
    else:
        with ThreadPoolExecutor(max_workers=min(fanout, len(conns))) as pool:
            list(pool.map(call, conns))
    return outcome


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
#: Set while a thread runs a node's work: a run() started from there (say from an
#: on_result callback) must not queue behind its own caller on the shared pool.
_worker = threading.local()


def _shared_pool(workers: int) -> ThreadPoolExecutor:
    """Worker threads kept across runs: starting and joining 32 threads for every
    command on open connections cost about a sixth of a warm run."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix=f"mento-run-{workers}")
            _POOLS[workers] = pool
        return pool


def run(
    group: Iterable[fabric.Connection],
    command: str,
    *,
    fanout: int = DEFAULT_FANOUT,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    on_result: Callable[[NodeResult], None] | None = None,
) -> RunReport:
    """Run ``command`` on every Connection of ``group`` (opened as needed, left open)."""
    if timeout is not None and timeout <= 0:
        raise BadInput("timeout must be positive")
    _remote_command(command, env, timeout)  # bad env names are the caller's error, raised now
    start = time.monotonic()

    def one(conn: fabric.Connection) -> NodeResult:
        return execute(conn, command, timeout=timeout, env=env, on_line=on_line)

    def done(node: str, value: NodeResult | BaseException) -> None:
        if on_result is not None and isinstance(value, NodeResult):
            on_result(value)

    nested = getattr(_worker, "active", False)
    pool = None if nested else _shared_pool(fanout)
    outcome = map_nodes(group, one, fanout=fanout, on_done=done, executor=pool)
    results = [
        v if isinstance(v, NodeResult) else NodeResult(node=n, error=describe_error(v))
        for n, v in outcome.items()
    ]
    return RunReport(command=command, results=results, seconds=time.monotonic() - start)


def run_on_nodes(
    command: str,
    *,
    group: Iterable[fabric.Connection] | None = None,
    metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
    fanout: int = DEFAULT_FANOUT,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    on_result: Callable[[NodeResult], None] | None = None,
    **group_options: Any,
) -> RunReport:
    """Run ``command`` on the beamtime's reserved nodes and report per node.

    Pass an open ``group`` (from :func:`mento_fab.nodes_group`) to reuse its
    connections across calls; otherwise one is built from ``metadata`` and
    ``group_options`` (``nodes``, ``exclude``, ``root_dir``, ``ssh_config``,
    ``host_keys``, ``connect_timeout``, …) and closed afterwards.
    """
    own = group is None
    if group is None:
        group = nodes_group(metadata, **group_options)
    try:
        return run(
            group,
            command,
            fanout=fanout,
            timeout=timeout,
            env=env,
            on_line=on_line,
            on_result=on_result,
        )
    finally:
        if own:
            for conn in group:
                conn.close()
