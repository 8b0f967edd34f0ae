"""``start``, ``ps``, ``logs`` and ``stop`` for workers on a group of nodes.

Each operation is one round over the group's open connections (``start`` checks
first, so a duplicate is refused before anything starts) and returns a result
object; nothing here prints. A node that cannot be reached is an error in the
report, never an exception; bad input (a bad name, a running worker for
``start``, a worker no node knows) raises a :class:`~mento_fab.errors.BadInput`.

>>> from mento_fab import nodes_group                       # doctest: +SKIP
>>> from mento_fab.workers import WorkerSpec, start, ps, stop
>>> group = nodes_group()                                   # doctest: +SKIP
>>> start(group, WorkerSpec("consumer", "python3 consume.py", restart="on-failure"))
>>> ps(group, "consumer").exit_status                       # 0: running everywhere
>>> stop(group, "consumer", grace=5)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node, describe_error
from mento_fab.errors import UnknownWorker, WorkerRunning
from mento_fab.nodes import fold
from mento_fab.results import NodeResult, RunReport
from mento_fab.runner import map_nodes
from mento_fab.workers import remote, shell
from mento_fab.workers.report import WorkersReport
from mento_fab.workers.spec import ACTIVE, WorkerRow, WorkerSpec, check_name, parse_listing

__all__ = ["follow", "logs", "ps", "start", "stop"]

#: Seconds a listing (``ps``) may take on a node.
LIST_TIMEOUT = 30.0
#: Exit status of the node side for "already running" (start) / "no such worker" (stop, logs).
_ELSEWHERE = 3


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(fanout: int) -> ThreadPoolExecutor:
    """Threads kept across calls (starting 32 threads per ``ps`` cost a quarter of it)."""
    with _POOLS_LOCK:
        if fanout not in _POOLS:
            _POOLS[fanout] = ThreadPoolExecutor(fanout, thread_name_prefix="mento-workers")
        return _POOLS[fanout]


def _gather(
    group: Iterable[fabric.Connection],
    one: Callable[[fabric.Connection], NodeResult],
    fanout: int,
) -> list[NodeResult]:
    outcome = map_nodes(group, one, fanout=fanout, executor=_pool(fanout))
    return [
        v if isinstance(v, NodeResult) else NodeResult(node=n, error=describe_error(v))
        for n, v in outcome.items()
    ]


def _json(result: NodeResult) -> dict[str, Any]:
    """The node side's one JSON line (an empty dict when it printed none)."""
    for line in reversed(result.stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {}


def _complaint(result: NodeResult) -> str:
    """Why the node side failed, in one line (its error, else its last stderr line)."""
    lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {result.exit}"


def _listings(
    group: Iterable[fabric.Connection], name: str | None, fanout: int, base: str
) -> tuple[list[NodeResult], list[WorkerRow]]:
    command = shell.listing(base, name)
    results = _gather(group, lambda c: remote.call(c, command, timeout=LIST_TIMEOUT), fanout)
    rows: list[WorkerRow] = []
    for result in results:
        if result.ok:
            rows += parse_listing(result.node, result.stdout).rows
            result.stdout = ""
        elif result.error is None:
            result.message = _complaint(result)
    return results, rows


def ps(
    group: Iterable[fabric.Connection],
    name: str | None = None,
    *,
    fanout: int = defaults.FANOUT,
    base: str = defaults.WORKERS_DIR,
) -> WorkersReport:
    """Every instance of ``name`` (or of every worker) on the group's nodes.

    Raises :class:`UnknownWorker` when ``name`` is given and no node that answered
    has a record of it (and every node answered).
    """
    if name is not None:
        check_name(name)
    start_time = time.monotonic()
    results, rows = _listings(group, name, fanout, base)
    run = RunReport("ps", results, time.monotonic() - start_time)
    if name is not None and not rows and not run.unreachable and run.results:
        raise UnknownWorker(f"no worker named {name} on {fold(r.node for r in results)}")
    return WorkersReport("ps", run, rows, name)


def start(
    group: Iterable[fabric.Connection],
    spec: WorkerSpec,
    *,
    fanout: int = defaults.FANOUT,
    base: str = defaults.WORKERS_DIR,
) -> WorkersReport:
    """Start ``spec`` on every node of the group, detached (see :mod:`.launcher`).

    Unless ``spec.replace``, raises :class:`WorkerRunning` (nothing started) when the
    worker is running on any node already.
    """
    conns = list(group)
    start_time = time.monotonic()
    if not spec.replace:
        refuse_running(conns, spec.name, fanout, base)
    command = shell.python(remote.BOOTSTRAP)
    data = remote.payload(json.dumps(spec.node_spec("start", base)))
    timeout = spec.grace + 60 + 2 * spec.per_node

    def one(conn: fabric.Connection) -> NodeResult:
        return remote.call(conn, command, data, timeout=timeout)

    results = _gather(conns, one, fanout)
    rows: list[WorkerRow] = []
    for result in results:
        rows += _started(result, spec)
    run = RunReport(f"start {spec.name}", results, time.monotonic() - start_time)
    return WorkersReport("start", run, rows, spec.name)


def refuse_running(
    conns: list[fabric.Connection], name: str, fanout: int, base: str
) -> list[NodeResult]:
    """Raise :class:`WorkerRunning` if ``name`` runs on any of ``conns``; the listings."""
    results, rows = _listings(conns, name, fanout, base)
    active = [r for r in rows if r.state in ACTIVE]
    if active:
        nodes = fold(sorted({r.node for r in active}))
        raise WorkerRunning(
            f"worker {name} is already running on {nodes}: stop it first, or start with --replace"
        )
    return results


def _started(result: NodeResult, spec: WorkerSpec) -> list[WorkerRow]:
    """Rows for one node's launcher output; the node's message says what happened."""
    out = _json(result)
    result.stdout = ""
    if result.error is not None:
        return []
    if result.exit == _ELSEWHERE:
        result.message = f"already running (instances {out.get('running')}); not replaced"
        return []
    if "error" in out and "started" not in out:
        result.message = out["error"]
        result.exit = result.exit or 1
        return []
    if not out:
        result.message = _complaint(result)
        result.exit = result.exit or 1
        return []
    rows = []
    problems = []
    now = time.time()
    for entry in out.get("started", []):
        row = WorkerRow(
            node=result.node,
            name=spec.name,
            index=int(entry.get("index", 0)),
            state="running" if entry.get("pid") else "exited",
            pid=entry.get("pid"),
            started=now if entry.get("pid") else None,
            supervisor=entry.get("supervisor"),
            command=spec.command,
            message=entry.get("error"),
        )
        if row.message:
            problems.append(f"[{row.index}] {row.message}")
        rows.append(row)
    replaced = out.get("replaced") or []
    words = [f"started {sum(r.running for r in rows)}"]
    if replaced:
        words.append(f"replaced {len(replaced)}")
    result.message = ", ".join(words) + ("; " + "; ".join(problems) if problems else "")
    return rows


def logs(
    group: Iterable[fabric.Connection],
    name: str,
    *,
    lines: int = defaults.WORKER_LOG_LINES,
    fanout: int = defaults.FANOUT,
    base: str = defaults.WORKERS_DIR,
) -> RunReport:
    """The last ``lines`` lines of the worker's log on every node, as ``stdout`` per node.

    A node without the worker has exit 0 and says so in ``message``; when no node that
    answered has it, :class:`UnknownWorker` is raised.
    """
    command = shell.logs(name, max(1, int(lines)), base)
    start_time = time.monotonic()
    results = _gather(group, lambda c: remote.call(c, command, timeout=LIST_TIMEOUT), fanout)
    _unknown_here(results, name)
    return RunReport(f"logs {name}", results, time.monotonic() - start_time)


def _unknown_here(results: list[NodeResult], name: str) -> None:
    missing = [r for r in results if r.error is None and r.exit == _ELSEWHERE]
    if results and len(missing) == len(results):
        raise UnknownWorker(f"no worker named {name} on {fold(r.node for r in results)}")
    for result in missing:
        result.exit = 0
        result.message = f"no worker {name} on this node"


def follow(
    group: Iterable[fabric.Connection],
    name: str,
    on_line: Callable[[str, str], None],
    *,
    lines: int = defaults.WORKER_LOG_LINES,
    until: Callable[[], bool] | None = None,
    fanout: int = defaults.FANOUT,
    base: str = defaults.WORKERS_DIR,
) -> RunReport:
    """``on_line(node, line)`` for the worker's log lines, live, until ``until()`` is true,
    every node's log has gone away, or the caller is interrupted (Ctrl-C).

    Memory stays bounded (a partial line per node). However it ends, every remote
    ``tail`` is ended (see :func:`.shell.follow`).
    """
    command = shell.follow(name, max(0, int(lines)), base)
    ended: dict[str, NodeResult] = {}
    follower = remote.Follower(on_line, lambda node, res: ended.__setitem__(node, res))
    conns = list(group)
    start_time = time.monotonic()

    def open_one(conn: fabric.Connection) -> NodeResult:
        return follower.open(conn, command) or NodeResult(connection_node(conn))

    try:
        for result in _gather(conns, open_one, fanout):
            if result.error is not None:
                ended[result.node] = result
        while follower.poll(0.5):
            if until is not None and until():
                break
    finally:
        follower.close()
    nodes = [connection_node(c) for c in conns]
    results = [ended.get(node) or NodeResult(node, exit=0) for node in nodes]
    _unknown_here(results, name)
    return RunReport(f"logs --follow {name}", results, time.monotonic() - start_time)


def stop(
    group: Iterable[fabric.Connection],
    name: str | None = None,
    *,
    grace: float = defaults.WORKER_GRACE,
    fanout: int = defaults.FANOUT,
    base: str = defaults.WORKERS_DIR,
    metadata: Any = None,
) -> WorkersReport:
    """Stop ``name`` (or every worker, ``name=None``) on the group's nodes.

    SIGTERM to each worker's process group, SIGKILL after ``grace`` seconds; a stopped
    worker stays stopped (fine to stop again). Workers started ``--via slurm`` also
    have their job cancelled if it is still there (needs ``metadata``).
    """
    if name is not None:
        check_name(name)
    conns = list(group)
    start_time = time.monotonic()
    command = shell.python(remote.BOOTSTRAP)
    spec = {"op": "stop", "dir": base, "name": name, "grace": float(grace)}
    data = remote.payload(json.dumps(spec))
    results = _gather(conns, lambda c: remote.call(c, command, data, timeout=grace + 60), fanout)
    rows: list[WorkerRow] = []
    for result in results:
        out = _json(result)
        result.stdout = ""
        if result.error is None and result.exit not in (0, _ELSEWHERE):
            result.message = out.get("error") or _complaint(result)
        for entry in out.get("stopped", []):
            rows.append(_stopped_row(result.node, entry))
        if result.exit == 0:
            result.message = _stop_message(out.get("stopped", []))
    if name is not None:
        _unknown_here(results, name)
    report = WorkersReport("stop", RunReport(f"stop {name or '--all'}", results), rows, name)
    jobs = sorted({r.job for r in rows if r.kind == "slurm" and r.job})
    if jobs and metadata is not None:
        from mento_fab.workers.jobs import cancel_jobs

        report.notes += cancel_jobs(conns, metadata, jobs)
    report.run.seconds = time.monotonic() - start_time
    return report


def _stopped_row(node: str, entry: dict[str, Any]) -> WorkerRow:
    return WorkerRow(
        node=node,
        name=str(entry.get("name")),
        index=int(entry.get("index") or 0),
        state=str(entry.get("state") or "stopped"),
        exit=entry.get("exit"),
        kind=str(entry.get("kind") or "ssh"),
        job=entry.get("job"),
        message=f"was {entry.get('was')}" if entry.get("was") else None,
    )


def _stop_message(entries: list[dict[str, Any]]) -> str:
    was_running = sum(1 for e in entries if e.get("was") in (*ACTIVE, "lost"))
    if not entries:
        return "no workers"
    if not was_running:
        return f"{len(entries)} already stopped or ended"
    return f"stopped {was_running}"
