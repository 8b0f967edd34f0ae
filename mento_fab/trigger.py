"""The trigger API acquisition scripts call: ``Trigger(method).run([...])``.

Same names and arguments as the original ``mento.trigger`` (``TriggerMethod``
with SLURM_REST_API, REMOTE_COMMAND, REMOTE_SBATCH_SCRIPT, LOCAL_BASH_SCRIPT;
``Trigger(trigger_method, beamline_root_dir='/gpfs')``; ``run(arg_list,
destination, job_name, job_time, job_dependency, log_file)``), with what the
original could not give:

- one persistent SSH connection per destination, reused by every call and
  re-opened by itself when it drops (no ``ssh`` process and key exchange per
  trigger: a trigger costs a few milliseconds instead of a new login);
- every call returns a :class:`TriggerHandle` with the outcome (exit status,
  output, job id, error) instead of forgetting it;
- ``arg_list`` is an argv: it reaches the remote shell as ``shlex.join`` of
  its items, so spaces and quotes in arguments survive. A single string
  (``["cmd a 'b c'"]``) is split with ``shlex.split``. Shell syntax needs an
  explicit shell: ``["sh", "-c", "cd /x && ./run.sh"]``;
- ``background=True`` puts the call on a bounded queue served by a worker
  thread, so an acquisition loop never blocks; a failure in the background is
  logged and kept on the handle. A full queue fails the handle at once
  (logged), it never blocks the caller. After a failed connect, calls to that
  node fail at once with the same error for ``connect_backoff`` seconds, so a
  backlog for a dead node drains in moments, not one connect timeout per call;
- a call still running when the script exits or is interrupted is ended on the
  node, with everything it started (:mod:`mento_fab.remote`).

Errors keep the original's types: a missing command or script that is not
executable is a ``RuntimeError`` (:class:`~mento_fab.errors.BadTrigger`), a
missing script a ``FileNotFoundError`` (:class:`~mento_fab.errors.MissingFile`),
both also :class:`~mento_fab.errors.BadInput`; a failed call is a
:class:`~mento_fab.errors.TriggerError` from :meth:`TriggerHandle.check`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mento_fab import defaults
from mento_fab.commands import get_sbatch_command, get_ssh_command  # noqa: F401 (re-exported)
from mento_fab.errors import (
    BadInput,
    BadTrigger,
    MissingFile,
    NodeError,
    SelectionError,
    TriggerError,
    TriggerUnavailable,
)
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.results import NodeResult
from mento_fab.session import Session
from mento_fab.trigger_agent import AgentRoute, connect_failed
from mento_fab.trigger_call import TriggerHandle, TriggerMethod, split_arg_list

if TYPE_CHECKING:
    import fabric

__all__ = ["Trigger", "TriggerError", "TriggerHandle", "TriggerMethod"]

log = logging.getLogger(__name__)

#: Imported on first use: a script whose calls go through the connection agent never
#: needs fabric or paramiko (about 0.25 s of start-up per process).
_LAZY = {
    "nodes_group": "mento_fab.nodes",
    "describe_error": "mento_fab.connection",
    "ensure_open": "mento_fab.connection",
    "open_channel": "mento_fab.connection",
    "execute": "mento_fab.runner",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def _lib(name: str) -> Any:
    """A name of :data:`_LAZY` (or what a test put in its place)."""
    return getattr(sys.modules[__name__], name)


#: Background calls that may wait for the worker before new ones are refused.
DEFAULT_MAX_PENDING = 1000
#: Seconds the interpreter's exit waits for background triggers, over all Triggers:
#: an acquisition script must always be able to exit; what is left is logged.
EXIT_DRAIN_TIMEOUT = 30.0
#: Seconds after a failed connect during which calls to that node fail at once.
CONNECT_BACKOFF = 5.0


_live: weakref.WeakSet[Trigger] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    """Let queued background triggers finish when the script ends, for at most
    :data:`EXIT_DRAIN_TIMEOUT` seconds in all (close() logs what it abandons)."""
    deadline = time.monotonic() + EXIT_DRAIN_TIMEOUT
    for trig in list(_live):
        trig.close(wait=True, timeout=max(0.0, deadline - time.monotonic()))


class Trigger:
    """Collective information needed to trigger an online analysis run, and the means to.

    ``metadata`` (an object or file) wins over ``beamline_root_dir``; the other
    keywords reach :func:`mento_fab.nodes.nodes_group`. ``timeout`` bounds each
    call (None: no limit). ``on_done`` is called with every finished handle.
    ``connect_backoff``: seconds after a failed connect during which calls to that
    node fail at once, each handle with that connect's error.
    """

    def __init__(
        self,
        trigger_method: TriggerMethod | int | str = TriggerMethod.REMOTE_SBATCH_SCRIPT,
        beamline_root_dir: str | os.PathLike[str] = defaults.ROOT_DIR,
        *,
        metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
        ssh_config: str | os.PathLike[str] | None = None,
        known_hosts: str | os.PathLike[str] | None = None,
        host_keys: str = defaults.HOST_KEYS,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        timeout: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        workers: int = 1,
        on_done: Callable[[TriggerHandle], None] | None = None,
        connect_backoff: float = CONNECT_BACKOFF,
    ) -> None:
        try:
            if isinstance(trigger_method, str):
                self.trigger_method = TriggerMethod[trigger_method.upper()]
            else:
                self.trigger_method = TriggerMethod(trigger_method)
        except (KeyError, ValueError):
            raise BadTrigger(f"Trigger method not known: {trigger_method!s}") from None
        session = Session.load(metadata, beamline_root_dir)
        self.bt_info = session.metadata
        if self.trigger_method is not TriggerMethod.LOCAL_BASH_SCRIPT and not self.bt_info.online:
            raise BadTrigger(
                f"beamtime {self.bt_info.beamtime} has no reserved nodes (no onlineAnalysis)"
            )
        if max_pending < 1 or workers < 1:
            raise BadInput("max_pending and workers must be at least 1")
        if connect_backoff < 0:
            raise BadInput("connect_backoff cannot be negative")
        self.timeout = timeout
        self.connect_backoff = connect_backoff
        self.on_done = on_done
        self._group_options: dict[str, Any] = {
            "ssh_config": ssh_config,
            "known_hosts": known_hosts,
            "host_keys": host_keys,
            "connect_timeout": connect_timeout,
        }
        #: Which calls go through this user's connection agent (a metadata file is needed).
        self.via_agent = AgentRoute(session.file, self._group_options)
        self._connections: dict[str, fabric.Connection] = {}
        #: Guards the dicts only; connecting happens under the node's own lock, so a
        #: dead node never holds up triggers to the others, or close().
        self._lock = threading.Lock()
        self._node_locks: dict[str, threading.Lock] = {}
        #: node -> (monotonic time until which calls fail at once, the connect's error)
        self._failed: dict[str, tuple[float, str]] = {}
        self._running: dict[int, TriggerHandle] = {}  # by id(): handles are unhashable
        #: How many times a connection was opened, per node (1 while it never dropped).
        self.connects: dict[str, int] = {}
        self._queue: queue.Queue[tuple[TriggerHandle, Callable[[], None]] | None] = queue.Queue(
            maxsize=max_pending
        )
        self._workers: list[threading.Thread] = []
        self._nworkers = workers
        self._closed = False
        _live.add(self)

    # ------------------------------------------------------------------ public
    def run(
        self,
        arg_list: Sequence[Any] | None = None,
        destination: str | None = None,
        job_name: str | None = None,
        job_time: str | None = None,
        job_dependency: str | None = None,
        log_file: str | None = None,
        *,
        background: bool = False,
        timeout: float | None = None,
    ) -> TriggerHandle:
        """Trigger processing; returns the handle (finished unless ``background``).

        ``destination`` is the node to run on or submit from (default: the first
        reserved node); ``job_*`` and ``log_file`` shape the sbatch call as in the
        original (no ``log_file``: Slurm output goes to /dev/null). Bad input
        raises at once, also for background calls; failures of the call itself
        are on the handle.
        """
        if self._closed:
            raise TriggerError("this Trigger is closed")
        method = self.trigger_method
        if method is TriggerMethod.SLURM_REST_API:
            raise TriggerUnavailable("SLURM REST API not available")
        argv = split_arg_list(arg_list)
        timeout = self.timeout if timeout is None else timeout
        if method is TriggerMethod.LOCAL_BASH_SCRIPT:
            script = argv[0]
            if not os.path.exists(script):
                raise MissingFile(f"File not found: {script}")
            if not os.access(script, os.X_OK):
                raise BadTrigger(f"File not executable: {script}")
            handle = TriggerHandle(method, shlex.join(argv), None, background)
            work: Callable[[], None] = lambda: self._run_local(handle, argv, timeout)  # noqa: E731
        else:
            node = self._destination(destination)
            if method is TriggerMethod.REMOTE_SBATCH_SCRIPT:
                from mento_fab.slurm import sbatch_argv

                argv = sbatch_argv(
                    self.bt_info, argv[0], argv[1:], job_name=job_name,
                    time=job_time or defaults.SLURM_TIME, dependency=job_dependency,
                    output=log_file or os.devnull, error=log_file or os.devnull,
                )  # fmt: skip
            handle = TriggerHandle(method, shlex.join(argv), node, background)
            work = lambda: self._run_remote(handle, node, timeout)  # noqa: E731
        if not background:
            self._call(handle, work)
            return handle
        return self._enqueue(handle, work)

    def pending(self) -> int:
        """Background calls queued and not yet started."""
        return self._queue.qsize()

    def connection(self, destination: str | None = None) -> fabric.Connection:
        """The open Connection to ``destination`` (default: the first reserved node)."""
        return self._connection(self._destination(destination))[0]

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop taking calls, let queued ones finish (``wait``, for at most ``timeout``
        seconds) and close the connections. Queued calls still waiting then end
        on their handles as not run; both they and calls still running are logged."""
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in self._workers:  # after what is queued: queued calls still run
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(queue.Full):
                if wait and left != 0.0:
                    self._queue.put(None, timeout=left)
                else:
                    self._queue.put_nowait(None)
        if wait:
            for worker in self._workers:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                worker.join(left)
            if any(w.is_alive() for w in self._workers):
                self._abandon(timeout)
        with self._lock:
            conns = list(self._connections.values())
            self._connections.clear()
        for conn in conns:
            conn.close()
        _live.discard(self)

    def _abandon(self, timeout: float | None) -> None:
        """End the handles still queued as not run; log them and the ones still running."""
        dropped: list[TriggerHandle] = []
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._queue.get_nowait()
                if item is not None:
                    dropped.append(item[0])
        for _ in self._workers:  # the stop markers went with the queue: put them back
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        for handle in dropped:
            handle.error = f"not run: abandoned when the Trigger closed after {timeout:g} s"
            handle._done.set()
        with self._lock:
            running = [h.command for h in self._running.values()]
        log.warning(
            "trigger closed after %g s: %d queued call(s) not run%s, %d still running%s",
            timeout or 0.0,
            len(dropped),
            f" ({'; '.join(h.command for h in dropped[:5])})" if dropped else "",
            len(running),
            f" ({'; '.join(running[:5])})" if running else "",
        )

    def __enter__(self) -> Trigger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- internals
    def _destination(self, destination: str | None) -> str:
        """The node to use; one outside the reservation is the caller's error, raised now."""
        reserved = [str(n) for n in self.bt_info.online.nodes]  # type: ignore[union-attr]
        node = destination or reserved[0]
        if node not in reserved:
            raise SelectionError(f"destination {node} is not one of the reserved nodes")
        return node

    def _unopened(self, node: str) -> fabric.Connection:
        """The node's Connection object, made if need be, not opened here."""
        with self._lock:
            conn = self._connections.get(node)
            if conn is None:
                (conn,) = _lib("nodes_group")(self.bt_info, nodes=node, **self._group_options)
                self._connections[node] = conn
        return conn

    def _connection(self, node: str) -> tuple[fabric.Connection, bool]:
        """The node's open Connection, and whether this call opened it.

        A failed connect raises :class:`NodeError` with its reason, and so does every
        call to that node for :attr:`connect_backoff` seconds after it, at once.
        """
        with self._lock:
            node_lock = self._node_locks.setdefault(node, threading.Lock())
        with node_lock:  # one connect per node at a time; other nodes go on
            conn = self._unopened(node)
            if conn.is_connected:
                return conn, False
            until, error = self._failed.get(node, (0.0, ""))
            if time.monotonic() < until:
                raise NodeError(
                    f"{error} (not tried again within {self.connect_backoff:g} s "
                    "of a failed connect)"
                )
            try:
                _lib("ensure_open")(conn)
            except Exception as exc:
                error = _lib("describe_error")(exc, self._group_options["connect_timeout"])
                self._failed[node] = (time.monotonic() + self.connect_backoff, error)
                raise NodeError(error) from None
            self._failed.pop(node, None)
            with self._lock:
                if self._connections.get(node) is not conn:  # close() ran meanwhile
                    conn.close()
                    raise TriggerError("this Trigger is closed")
                self.connects[node] = self.connects.get(node, 0) + 1
                again = self.connects[node] > 1
            if again:
                log.info("reconnected to %s", node)
            return conn, True

    def _execute(self, node: str, line: str, timeout: float | None) -> NodeResult:
        """One command over the node's connection.

        The session channel is opened first: if that fails on a connection that
        was already open, nothing was sent, so the connection is re-opened once.
        Once the exec request is sent there is no retry: the node may have run the
        command (an sbatch would then submit twice). While this user's connection
        agent runs, the call goes through it and its kept connection instead.
        """
        result = self._via_agent(node, line, timeout)
        if result is not None:
            return result
        describe_error = _lib("describe_error")
        connect_timeout = self._group_options["connect_timeout"]
        for attempt in (1, 2):
            try:
                conn, fresh = self._connection(node)
            except Exception as exc:  # a failed connect is not retried: it already waited
                return NodeResult(node=node, error=describe_error(exc, connect_timeout))
            try:
                channel = _lib("open_channel")(conn)
                break
            except Exception as exc:
                error = describe_error(exc, connect_timeout)
                if fresh or attempt == 2:
                    return NodeResult(node=node, error=error)
                log.info("connection to %s was dead (%s); reconnecting", node, error)
                with contextlib.suppress(Exception):
                    self._drop(node)
        # sent from here on: never retried
        return _lib("execute")(conn, line, timeout=timeout, channel=channel)

    def _via_agent(self, node: str, line: str, timeout: float | None) -> NodeResult | None:
        """The call through the agent, or None (not taken, or the node is in its connect
        back-off, which the direct path answers at once)."""
        if time.monotonic() < self._failed.get(node, (0.0, ""))[0]:
            return None
        result = self.via_agent.run(node, line, timeout)
        if result is not None and result.exit is None and connect_failed(result.error):
            self._failed[node] = (time.monotonic() + self.connect_backoff, str(result.error))
        elif result is not None:
            self._failed.pop(node, None)
        return result

    def _drop(self, node: str) -> None:
        """Close a node's connection that proved dead, so the next use re-opens it."""
        with self._lock:
            conn = self._connections.get(node)
        if conn is not None:
            conn.close()

    def _run_remote(self, handle: TriggerHandle, node: str, timeout: float | None) -> None:
        start = time.monotonic()
        result = self._execute(node, handle.command, timeout)
        handle._fill(result)
        handle.seconds = time.monotonic() - start
        if handle.method is TriggerMethod.REMOTE_SBATCH_SCRIPT and result.ok:
            from mento_fab.slurm import Job, Slurm, parse_job_id

            try:
                handle.job_id = parse_job_id(result.stdout)
                # Slurm opens the connection when the job is first asked about.
                handle.job = Job(handle.job_id, Slurm(self._unopened(node), self.bt_info))
            except Exception as exc:
                handle.error = str(exc)
        elif handle.method is TriggerMethod.REMOTE_SBATCH_SCRIPT and result.exit:
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            handle.error = lines[-1].strip() if lines else f"sbatch exit {result.exit}"

    def _run_local(self, handle: TriggerHandle, argv: list[str], timeout: float | None) -> None:
        start = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            handle.error = f"timed out after {timeout:g} s"
        except OSError as exc:
            handle.error = f"could not start {argv[0]}: {exc.strerror or exc}"
        else:
            handle.exit_status = proc.returncode
            handle.stdout = proc.stdout.decode("utf-8", "replace")
            handle.stderr = proc.stderr.decode("utf-8", "replace")
        handle.seconds = time.monotonic() - start

    def _call(self, handle: TriggerHandle, work: Callable[[], None]) -> None:
        """Run one call to its end; nothing escapes, everything lands on the handle."""
        with self._lock:
            self._running[id(handle)] = handle
        try:
            work()
        except Exception as exc:  # a bug or an odd failure must still end on the handle
            log.exception("trigger failed unexpectedly: %s", handle.command)
            handle.error = handle.error or f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._running.pop(id(handle), None)
        handle._done.set()
        if not handle.ok:
            level = logging.ERROR if handle.background else logging.WARNING
            log.log(level, "trigger failed: %s", handle.describe())
        else:
            log.debug("trigger done: %s", handle.describe())
        if self.on_done is not None:
            try:
                self.on_done(handle)
            except Exception:
                log.exception("on_done callback failed")

    def _enqueue(self, handle: TriggerHandle, work: Callable[[], None]) -> TriggerHandle:
        try:
            self._queue.put_nowait((handle, work))
        except queue.Full:
            handle.error = f"not run: {self._queue.maxsize} background triggers already pending"
            handle._done.set()
            log.error("trigger dropped: %s", handle.describe())
            return handle
        self._start_workers()
        return handle

    def _start_workers(self) -> None:
        with self._lock:
            self._workers = [w for w in self._workers if w.is_alive()]
            while len(self._workers) < self._nworkers:
                worker = threading.Thread(
                    target=self._serve, name=f"mento-trigger-{len(self._workers)}", daemon=True
                )
                worker.start()
                self._workers.append(worker)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._call(*item)
