"""``run-on-nodes --via slurm``: one ``srun`` in the reservation instead of SSH per node.

One srun with one task per node; its output is split back into the same
:class:`~mento_fab.results.RunReport` as the SSH path (:func:`mento_fab.runner.run`),
node for node: exit status, stdout, stderr, error. srun only reports the largest
exit status, so each task is wrapped to print a start and an end marker line (a
random token, the node's ``SLURMD_NODENAME``, and ``$?``), which also maps
``--label`` task ids to nodes.

When no task started because Slurm would not allocate the nodes (a reservation
not active, missing or busy, or slurmctld down), every node's ``error`` holds
srun's own lines and its ``message`` says so ("Slurm refused the allocation: …",
"Slurm controller cannot be reached"); :func:`refusal` gives that as one line.

Example (a lab started with ``inv lab.up --slurm`` and its exports)::

    from mento_fab import Session, nodes_group
    from mento_fab.slurm import run_via_slurm

    md = Session.load().metadata
    with nodes_group(md) as group:
        report = run_via_slurm(group, md, "hostname")
    print(report.exit_status, [r.stdout for r in report.results])
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node
from mento_fab.errors import BadInput, ReservationError, SelectionError, SlurmError
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.nodes import fold
from mento_fab.results import NodeResult, RunReport
from mento_fab.runner import LineCallback
from mento_fab.slurm.client import Slurm, default_job_name, pick_submit_node
from mento_fab.slurm.parse import controller_unreachable

__all__ = ["REFUSED", "UNREACHABLE", "LabelSplitter", "refusal", "run_via_slurm", "srun"]

log = logging.getLogger(__name__)

#: A node's ``message`` when Slurm would not allocate the nodes (then ``error`` is srun's words).
REFUSED = "Slurm refused the allocation"
#: A node's ``message`` when srun could not reach slurmctld.
UNREACHABLE = "Slurm controller cannot be reached"
_LABEL = re.compile(r"^\s*(\d+): ?(.*)$", re.S)
#: srun's progress lines, which say nothing about why an allocation failed.
_CHATTER = re.compile(r"^srun: job \d+ (queued and waiting for resources|has been allocated)")


class LabelSplitter:
    """Turns ``srun --label`` lines back into per-task output, exit codes and node names.

    Feed it ``(stream, line)`` pairs; read ``node_of`` (task -> node), ``pieces``
    (task -> stream -> output pieces), ``exits`` (task -> exit status) and
    ``loose`` (lines without a label: srun's own messages).
    """

    def __init__(
        self,
        token: str,
        on_line: LineCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token = token
        self.on_line = on_line
        self.clock = clock
        self.node_of: dict[int, str] = {}
        self.pieces: dict[int, dict[str, list[str]]] = {}
        self.exits: dict[int, int] = {}
        self.ended_at: dict[int, float] = {}
        self.loose: list[str] = []
        self._held: dict[int, list[tuple[str, str]]] = {}
        self._lock = threading.Lock()

    def feed(self, stream: str, line: str) -> None:
        with self._lock:
            match = _LABEL.match(line)
            if match is None:
                self.loose.append(line)
                return
            task, text = int(match.group(1)), match.group(2)
            streams = self.pieces.setdefault(task, {"stdout": [], "stderr": []})
            at = text.find(self.token) if stream == "stdout" else -1
            if at < 0:
                streams[stream].append(text + "\n")
                self._emit(task, stream, text)
                return
            before, marker = text[:at], text[at + len(self.token) :].split()
            if before:  # the command's last line had no newline: it stays without one
                streams[stream].append(before)
                self._emit(task, stream, before)
            if len(marker) >= 2 and marker[0] == "start":
                self.node_of[task] = marker[1]
                for held_stream, held in self._held.pop(task, []):
                    self._emit(task, held_stream, held)
            elif len(marker) >= 3 and marker[0] == "end":
                self.node_of.setdefault(task, marker[1])
                try:
                    self.exits[task] = int(marker[2])
                except ValueError:
                    log.warning("bad end marker from task %d: %r", task, text)
                self.ended_at[task] = self.clock()

    def _emit(self, task: int, stream: str, text: str) -> None:
        if self.on_line is None:
            return
        node = self.node_of.get(task)
        if node is None:  # stderr can overtake the start marker on stdout: hold it
            self._held.setdefault(task, []).append((stream, text))
            return
        try:
            self.on_line(node, stream, text)
        except Exception:
            log.exception("line callback failed")

    def flush(self, fallback: Mapping[int, str]) -> None:
        """Emit lines still held for tasks whose start marker never came."""
        with self._lock:
            for task, held in self._held.items():
                self.node_of.setdefault(task, fallback.get(task, f"task{task}"))
                for stream, text in held:
                    self._emit(task, stream, text)
            self._held.clear()


def srun_argv(
    slurm: Slurm,
    nodes: Sequence[str],
    command: str,
    token: str,
    *,
    timeout: float | None,
    immediate: int,
    job_name: str,
) -> list[str]:
    """The srun argv: one task per node, each wrapped in start and end markers."""
    inner = f'"${{SHELL:-/bin/sh}}" -c {shlex.quote(command)}'
    if timeout is not None:
        inner = f"timeout -k {defaults.KILL_GRACE / 2:g} {timeout:g} {inner}"
    node = '"${SLURMD_NODENAME:-$(hostname -s)}"'
    wrapper = (
        f"printf '%s start %s\\n' {token} {node}; "
        f"{inner} </dev/null; rc=$?; "
        f"printf '%s end %s %s\\n' {token} {node} \"$rc\""
    )
    argv = [
        "srun",
        f"--partition={slurm.info.partition}",
        f"--reservation={slurm.info.reservation}",
        f"--job-name={job_name}",
        f"--nodelist={fold(nodes)}",
        f"--nodes={len(nodes)}",
        f"--ntasks={len(nodes)}",
        "--ntasks-per-node=1",
        f"--immediate={immediate}",
        "--label",
        "--kill-on-bad-exit=0",
    ]
    if timeout is not None:
        argv.append(f"--time={math.ceil(timeout / 60) + 1}")
    return [*argv, "/bin/sh", "-c", wrapper]


def _refused(slurm: Slurm, splitter: LabelSplitter, result: NodeResult) -> tuple[str, str] | None:
    """``(message, srun's lines)`` when srun got no allocation and so started no task."""
    if splitter.node_of or result.error is not None:
        return None
    said = [ln.strip() for ln in splitter.loose if ln.startswith("srun:")]
    if not any("Unable to allocate resources" in ln for ln in said):
        return None
    reasons = "; ".join(ln for ln in said if not _CHATTER.match(ln))
    if controller_unreachable(reasons):
        return UNREACHABLE, reasons
    try:  # the reservation's own record says why, when there is one
        problem = slurm.reservation().problem()
    except ReservationError as exc:
        problem = str(exc)
    except SlurmError:
        problem = None
    return (f"{REFUSED}: {problem}" if problem else REFUSED), reasons


def refusal(report: RunReport) -> str | None:
    """Why a run reached no node because of Slurm (see :data:`REFUSED`), or None.

    Two lines: the message, then the nodes and srun's own words.
    """
    results = report.results
    reasons = {(r.message, r.error) for r in results}
    if not results or len(reasons) != 1 or any(r.exit is not None for r in results):
        return None
    message, error = reasons.pop()
    if message is None or not message.startswith((REFUSED, UNREACHABLE)):
        return None
    return f"{message}\n  {fold(r.node for r in results)}: {error}"


def _failure(result: NodeResult, loose: list[str]) -> str:
    """Why a node has no end marker: srun's own error, else what the run says."""
    errors = [ln.strip() for ln in loose if "error" in ln.lower() and ln.strip()]
    if errors:
        # "srun: error: Unable to allocate resources: ..." is the useful one
        allocation = [e for e in errors if "allocat" in e.lower() or "reservation" in e]
        return (allocation or errors)[0]
    if result.error:
        return f"srun on {result.node}: {result.error}"
    return f"task did not report back (srun exit {result.exit} on {result.node})"


def srun(
    slurm: Slurm,
    nodes: Sequence[str],
    command: str,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    immediate: int = defaults.SRUN_IMMEDIATE,
    job_name: str | None = None,
) -> RunReport:
    """One srun from ``slurm``'s submit node, one task per node; a RunReport like the SSH path's."""
    nodes = list(nodes)
    if not nodes:
        raise SelectionError("no nodes selected")
    if timeout is not None and timeout <= 0:
        raise BadInput("timeout must be positive")
    immediate = max(1, int(immediate))
    token = "MENTO-" + secrets.token_hex(8)
    argv = srun_argv(
        slurm, nodes, command, token, timeout=timeout, immediate=immediate,
        job_name=job_name or default_job_name(slurm.md),
    )  # fmt: skip
    start = time.monotonic()
    splitter = LabelSplitter(token, on_line)
    outer = None if timeout is None else timeout + immediate + 10 * defaults.KILL_GRACE
    log.debug("srun on %s from %s", fold(nodes), slurm.node)
    result = slurm.call(
        argv,
        timeout=outer,
        check=False,
        env=env,
        on_line=lambda _node, stream, line: splitter.feed(stream, line),
    )
    # A partial last line reaches on_line at EOF through execute's splitter close.
    splitter.flush(dict(enumerate(nodes)))
    report = RunReport(command=command, seconds=time.monotonic() - start)
    refused = _refused(slurm, splitter, result)
    if refused is not None:
        message, reasons = refused
        log.info("%s: %s (%s)", slurm.node, message, reasons)
        report.seconds = time.monotonic() - start
        report.results = [
            NodeResult(node, error=reasons, message=message, seconds=report.seconds)
            for node in nodes
        ]
        return report
    by_node = {node: task for task, node in splitter.node_of.items()}
    failure = _failure(result, splitter.loose)
    for node in nodes:
        task = by_node.get(node)
        res = NodeResult(node=node)
        if task is not None:
            streams = splitter.pieces.get(task, {"stdout": [], "stderr": []})
            res.stdout = "".join(streams["stdout"])
            res.stderr = "".join(streams["stderr"])
            res.seconds = splitter.ended_at.get(task, time.monotonic()) - start
        else:
            res.seconds = report.seconds
        status = splitter.exits.get(task) if task is not None else None
        if status is None:
            res.error = failure
        elif timeout is not None and status in (124, 137) and res.seconds >= timeout:
            res.error = f"timed out after {timeout:g} s (remote command killed)"
        else:
            res.exit = status
        report.results.append(res)
    for line in splitter.loose:
        if line.startswith("srun: error"):
            log.warning("%s: %s", slurm.node, line)
    return report


def run_via_slurm(
    group: Iterable[fabric.Connection],
    md: BeamtimeMetadata,
    command: str,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    submit_node: str | None = None,
    immediate: int = defaults.SRUN_IMMEDIATE,
) -> RunReport:
    """``run-on-nodes --via slurm``: the group's nodes as one srun in the reservation.

    The submit node is ``submit_node`` or the first of the group that connects;
    when none does, every node ends with that error (no exception).
    """
    conns = list(group)
    nodes = [connection_node(c) for c in conns]
    start = time.monotonic()
    try:
        conn = pick_submit_node(conns, submit_node)
    except SlurmError as exc:
        results = [NodeResult(node=n, error=str(exc)) for n in nodes]
        return RunReport(command=command, results=results, seconds=time.monotonic() - start)
    report = srun(
        Slurm(conn, md), nodes, command, timeout=timeout, env=env, on_line=on_line,
        immediate=immediate,
    )  # fmt: skip
    report.seconds = time.monotonic() - start
    return report
