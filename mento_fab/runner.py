"""Run one command on many Connections with a fan-out limit and bounded time and memory.

Every node ends as a :class:`NodeResult` (exit status or error), never as an
exception: one dead node must not hide what happened on the other 31.

Commands go straight to a paramiko session channel and are read with
``select`` on the channel, not through invoke's Runner, whose 10 ms polling
loop and reader/stdin threads dominate the cost of a command on an open
connection (a ``true`` completes in a few milliseconds here).

Nothing outlives its command unless asked: the line sent to the node
(:mod:`mento_fab.remote`) ends the command and everything it started when the
client closes the channel or goes away, so a time-out, a Ctrl-C (:class:`Cancel`)
or a lost client leaves nothing running. Output is kept up to ``max_output`` bytes
per node and stream (:mod:`mento_fab.output`); with ``on_line`` it is handed on
line by line and not kept at all.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fabric
import paramiko

from mento_fab import defaults, remote
from mento_fab.connection import connection_node, describe_error, open_channel
from mento_fab.errors import BadInput, NodeError
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.nodes import nodes_group
from mento_fab.output import Capture, LineSplitter
from mento_fab.remote import check_env, new_run_id, remote_command
from mento_fab.results import NodeResult, RunReport

__all__ = ["Cancel", "LineCallback", "execute", "map_nodes", "run", "run_on_nodes"]

KILL_GRACE = defaults.KILL_GRACE

T = TypeVar("T")
LineCallback = Callable[[str, str, str], None]  # node, "stdout"|"stderr", line


class _Deadline(Exception):
    """The command's own time is up (distinct from connect timeouts, which are errors)."""


class _Cancelled(Exception):
    """The run was cancelled (Ctrl-C) before or while this node's command ran."""


class Cancel:
    """Ends the commands of one run early, over their still open connections.

    :meth:`cancel` sends EOF on the stdin of every command still running, which its
    watchdog on the node (:mod:`mento_fab.remote`) takes as the word to kill it and
    everything it started; commands not started yet are not started.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: set[paramiko.Channel] = set()
        self.cancelled = False

    def track(self, channel: paramiko.Channel) -> bool:
        """Watch ``channel`` until :meth:`untrack`; False when the run is already cancelled."""
        with self._lock:
            if not self.cancelled:
                self._channels.add(channel)
            return not self.cancelled

    def untrack(self, channel: paramiko.Channel) -> None:
        with self._lock:
            self._channels.discard(channel)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            channels = list(self._channels)
        for channel in channels:
            with contextlib.suppress(Exception):  # already closed: its command has ended
                channel.shutdown_write()


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


class _Heartbeat:
    """Writes a newline to every running command's watchdog each ``remote.HEARTBEAT``
    seconds, from one daemon thread, so a node can tell a client that is alive but
    quiet from one that is gone without a word. A command that ends sooner costs a
    dictionary entry, no packet."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[paramiko.Channel, float] = {}
        self._thread: threading.Thread | None = None

    def add(self, channel: paramiko.Channel) -> None:
        with self._cond:
            if not self._due:
                self._cond.notify()
            self._due[channel] = time.monotonic() + remote.HEARTBEAT
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._beat, name="mento-heartbeat", daemon=True
                )
                self._thread.start()

    def discard(self, channel: paramiko.Channel) -> None:
        with self._cond:
            self._due.pop(channel, None)

    def _beat(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    self._cond.wait()
                now = time.monotonic()
                wait = min(self._due.values()) - now
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                due = [channel for channel, at in self._due.items() if at <= now]
                for channel in due:
                    self._due[channel] = now + remote.HEARTBEAT
            for channel in due:
                with contextlib.suppress(Exception):  # ending or gone: its execute sees it
                    channel.send(b"\n")


_heartbeat = _Heartbeat()


def execute(
    conn: fabric.Connection,
    command: str,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    channel: paramiko.Channel | None = None,
    max_output: int = defaults.MAX_OUTPUT,
    run_id: str | None = None,
    cancel: Cancel | None = None,
) -> NodeResult:
    """Run ``command`` on one Connection; every failure ends up in the result.

    Output is kept up to ``max_output`` bytes per stream (the rest is counted in
    ``stdout_dropped``/``stderr_dropped``); with ``on_line`` it goes to the callback
    line by line instead and nothing is kept. ``channel``, from :func:`open_channel`,
    lets a caller that must know whether anything reached the node (a retry must
    never run a command twice) open the session itself; ``execute`` takes it over
    and closes it. Closing it before the command ended kills the command on the node.
    """
    node = connection_node(conn)
    start = time.monotonic()
    result = NodeResult(node=node)
    captures: tuple[Capture, Capture] | None = None
    splitters: tuple[LineSplitter, LineSplitter] | None = None
    if on_line is None:
        captures = (Capture(max_output), Capture(max_output))
        feeds = (captures[0].feed, captures[1].feed)
    else:
        splitters = (
            LineSplitter(lambda text: on_line(node, "stdout", text)),
            LineSplitter(lambda text: on_line(node, "stderr", text)),
        )
        feeds = (splitters[0].feed, splitters[1].feed)
    try:
        line = remote_command(command, env, timeout, run_id=run_id)
        if cancel is not None and cancel.cancelled:
            raise _Cancelled
        if channel is None:
            channel = open_channel(conn)
        if cancel is not None and not cancel.track(channel):
            raise _Cancelled
        transport = channel.get_transport()
        # stdin stays open, with a newline now and then: EOF on it, or a long silence,
        # tells the node's watchdog to kill the command (which reads /dev/null).
        channel.exec_command(line)
        _heartbeat.add(channel)
        deadline = None if timeout is None else time.monotonic() + timeout + KILL_GRACE
        while True:
            while channel.recv_ready():
                feeds[0](channel.recv(65536))
            while channel.recv_stderr_ready():
                feeds[1](channel.recv_stderr(65536))
            drained = not channel.recv_ready() and not channel.recv_stderr_ready()
            if (channel.eof_received or channel.closed) and drained:
                break
            if cancel is not None and cancel.cancelled:
                raise _Cancelled
            _check_alive(transport, deadline)
            select.select([channel], [], [], _slice(deadline))
        # Output is complete; the exit status follows (or the command still runs
        # after closing its output). Wait in slices so a dead node is noticed.
        while not channel.status_event.wait(_slice(deadline)):
            if channel.closed:
                break
            if cancel is not None and cancel.cancelled:
                raise _Cancelled
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
    except _Cancelled:
        result.error = "interrupted (remote command killed)" if channel else "not run: interrupted"
    except Exception as exc:  # one node's failure is data, not an exception
        result.error = describe_error(exc, conn.connect_timeout)
    finally:
        if channel is not None:
            _heartbeat.discard(channel)
            if cancel is not None:
                cancel.untrack(channel)
            channel.close()
        if splitters:
            for splitter in splitters:
                splitter.close()
    if captures:
        result.stdout, result.stdout_dropped = captures[0].text(), captures[0].dropped
        result.stderr, result.stderr_dropped = captures[1].text(), captures[1].dropped
    result.seconds = time.monotonic() - start
    return result


def map_nodes(
    connections: Iterable[fabric.Connection],
    func: Callable[[fabric.Connection], T],
    *,
    fanout: int = defaults.FANOUT,
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
    fanout: int = defaults.FANOUT,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    on_result: Callable[[NodeResult], None] | None = None,
    max_output: int = defaults.MAX_OUTPUT,
) -> RunReport:
    """Run ``command`` on every Connection of ``group`` (opened as needed, left open).

    The command sees ``MENTO_RUN_ID``, the same on every node of this run. An
    exception in the caller's thread (KeyboardInterrupt) kills the commands still
    running before it propagates, and starts no more.
    """
    if timeout is not None and timeout <= 0:
        raise BadInput("timeout must be positive")
    if max_output < 0:
        raise BadInput("the output limit cannot be negative")
    check_env(env)  # bad env names are the caller's error, raised now
    start = time.monotonic()
    run_id = new_run_id()
    cancel = Cancel()

    def one(conn: fabric.Connection) -> NodeResult:
        return execute(
            conn, command, timeout=timeout, env=env, on_line=on_line,
            max_output=max_output, run_id=run_id, cancel=cancel,
        )  # fmt: skip

    def done(node: str, value: NodeResult | BaseException) -> None:
        if on_result is not None and isinstance(value, NodeResult):
            on_result(value)

    nested = getattr(_worker, "active", False)
    pool = None if nested else _shared_pool(fanout)
    try:
        outcome = map_nodes(group, one, fanout=fanout, on_done=done, executor=pool)
    except BaseException:
        cancel.cancel()
        raise
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
    fanout: int = defaults.FANOUT,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    on_result: Callable[[NodeResult], None] | None = None,
    max_output: int = defaults.MAX_OUTPUT,
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
            max_output=max_output,
        )
    finally:
        if own:
            for conn in group:
                conn.close()
