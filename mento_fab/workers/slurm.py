"""``start --via slurm``: the worker as one Slurm job in the beamtime's reservation.

One batch job with ``--ntasks-per-node`` tasks on each selected node; each task
runs the same supervisor as the SSH kind, in the foreground (``op: slurm`` in
:mod:`.launcher`), so ``ps``, ``logs`` and ``stop`` read the same records on the
nodes. Slurm is the parent: the job ends with the reservation (its time limit is
the time left in it) or with ``scancel``.

The batch script goes to ``sbatch`` on its stdin, and the supervisor (with the
worker's environment) reaches the tasks in an environment variable that srun
passes on: no ``--env`` value is in any argv or in a file written by us. (Slurm
keeps the batch script in its spool, readable by root and the job's owner.)
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import shlex
import time
from collections.abc import Iterable

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node
from mento_fab.errors import SlurmError, WorkerError
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.nodes import fold
from mento_fab.results import NodeResult, RunReport
from mento_fab.runner import map_nodes
from mento_fab.slurm import Slurm
from mento_fab.workers import remote, shell
from mento_fab.workers.ops import refuse_running, stop
from mento_fab.workers.report import WorkersReport
from mento_fab.workers.spec import WorkerRow, WorkerSpec, parse_listing

__all__ = ["batch_script", "start_via_slurm"]

#: Seconds ``start --via slurm`` waits for every task to report its worker running.
START_WAIT = 60.0
#: The tasks' bootstrap: the supervisor comes in $MENTO_WORKER_PAYLOAD (base64).
_BOOTSTRAP = (
    "import os, base64; exec(compile(base64.b64decode(os.environ['MENTO_WORKER_PAYLOAD']), "
    "'mento-worker', 'exec'))"
)


def batch_script(spec: WorkerSpec, base: str = defaults.WORKERS_DIR) -> str:
    """The sbatch script: the payload in the environment, then one srun of all tasks."""
    data = remote.payload(json.dumps(spec.node_spec("slurm", base)))
    task = shell.python(_BOOTSTRAP)
    return (
        "#!/bin/sh\n"
        f"MENTO_WORKER_PAYLOAD={base64.b64encode(data).decode()}\n"
        "export MENTO_WORKER_PAYLOAD\n"
        f"exec srun --kill-on-bad-exit=0 --ntasks-per-node={spec.per_node} "
        f"/bin/sh -c {shlex.quote(task)}\n"
    )


def _time_limit(slurm: Slurm) -> str | None:
    """Minutes left in the reservation (sbatch ``--time``), or None when it has no end."""
    try:
        end = slurm.reservation().end
    except SlurmError:
        return None
    if end is None:
        return None
    left = (end - datetime.datetime.now()).total_seconds()
    if left > 365 * 86400:  # "UNLIMITED": leave it to the partition
        return None
    return str(max(1, math.ceil(left / 60)))


def _submit_conn(
    conns: list[fabric.Connection], reached: set[str], submit_node: str | None
) -> fabric.Connection:
    for conn in conns:
        node = connection_node(conn)
        if (submit_node is None and node in reached) or node == submit_node:
            return conn
    raise WorkerError(f"submit node {submit_node or '(any)'} is not reachable")


def start_via_slurm(
    group: Iterable[fabric.Connection],
    spec: WorkerSpec,
    metadata: BeamtimeMetadata,
    *,
    submit_node: str | None = None,
    fanout: int = defaults.FANOUT,
    base: str = defaults.WORKERS_DIR,
    wait: float = START_WAIT,
) -> WorkersReport:
    """Submit the worker as one job on the group's reachable nodes; wait until it runs.

    A node the job has not reached after ``wait`` seconds (pending, say) is reported
    with the job's state; the job stays queued and ``stop`` removes it.
    """
    conns = list(group)
    start_time = time.monotonic()
    if spec.replace:
        stop(conns, spec.name, grace=spec.grace, fanout=fanout, base=base, metadata=metadata)
    listings = refuse_running(conns, spec.name, fanout, base)
    reached = {r.node for r in listings if r.ok}
    nodes = [connection_node(c) for c in conns if connection_node(c) in reached]
    if not nodes:
        run = RunReport(f"start {spec.name}", listings, time.monotonic() - start_time)
        return WorkersReport("start", run, [], spec.name)
    slurm = Slurm(_submit_conn(conns, reached, submit_node), metadata)
    info = slurm.info
    argv = [
        "sbatch", "--parsable", f"--partition={info.partition}",
        f"--reservation={info.reservation}", f"--job-name=mento-worker-{spec.name}",
        f"--nodelist={fold(nodes)}", f"--nodes={len(nodes)}",
        f"--ntasks-per-node={spec.per_node}", "--output=/dev/null",
    ]  # fmt: skip
    limit = _time_limit(slurm)
    if limit:
        argv.append(f"--time={limit}")
    result = remote.call(slurm.conn, shlex.join(argv), batch_script(spec, base).encode())
    job = result.stdout.strip().split(";")[0].strip()
    if not result.ok or not job.isdigit():
        why = result.error or result.stderr.strip() or result.stdout.strip()
        raise WorkerError(f"sbatch failed on {slurm.node}: {why}")
    _record_pending(conns, nodes, spec, job, fanout, base)
    results, rows = _wait_running(conns, nodes, spec, job, fanout, base, wait)
    for listing in listings:
        if not listing.ok:
            results[listing.node] = listing
    run = RunReport(
        f"start {spec.name} --via slurm",
        [results[connection_node(c)] for c in conns],
        time.monotonic() - start_time,
    )
    report = WorkersReport("start", run, rows, spec.name, notes=[f"slurm job {job}"])
    if any(connection_node(c) in nodes and not results[connection_node(c)].ok for c in conns):
        report.notes.append(_job_state(slurm, job))
    return report


def _record_pending(
    conns: list[fabric.Connection],
    nodes: list[str],
    spec: WorkerSpec,
    job: str,
    fanout: int,
    base: str,
) -> None:
    """``pending`` records on the nodes until the job's tasks replace them (see launcher)."""
    command = shell.python(remote.BOOTSTRAP)
    data = remote.payload(json.dumps({**spec.node_spec("pending", base), "job": job, "env": {}}))
    chosen = [c for c in conns if connection_node(c) in nodes]
    map_nodes(chosen, lambda c: remote.call(c, command, data, timeout=60), fanout=fanout)


def _wait_running(
    conns: list[fabric.Connection],
    nodes: list[str],
    spec: WorkerSpec,
    job: str,
    fanout: int,
    base: str,
    wait: float,
) -> tuple[dict[str, NodeResult], list[WorkerRow]]:
    """Poll the nodes until every task recorded its worker for ``job``."""
    chosen = [c for c in conns if connection_node(c) in nodes]
    command = shell.listing(base, spec.name)
    deadline = time.monotonic() + wait
    while True:
        outcome = map_nodes(chosen, lambda c: remote.call(c, command, timeout=30), fanout=fanout)
        rows: dict[str, list[WorkerRow]] = {}
        for node, value in outcome.items():
            if isinstance(value, NodeResult) and value.ok:
                found = parse_listing(node, value.stdout).rows
                rows[node] = [r for r in found if r.job == job and r.state != "pending"]
        done = all(len(rows.get(n, [])) >= spec.per_node for n in nodes)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    results: dict[str, NodeResult] = {}
    all_rows: list[WorkerRow] = []
    for node in nodes:
        mine = rows.get(node, [])
        all_rows += mine
        running = sum(r.running for r in mine)
        if len(mine) >= spec.per_node:
            results[node] = NodeResult(node, exit=0, message=f"started {running} in job {job}")
        else:
            results[node] = NodeResult(
                node, exit=1, message=f"job {job} not running here after {wait:g} s"
            )
    return results, all_rows


def _job_state(slurm: Slurm, job: str) -> str:
    try:
        for info in slurm.jobs():
            if info.id == job:
                return f"slurm job {job}: {info.state} {info.reason}".strip()
    except SlurmError as exc:
        return f"slurm job {job}: {exc}"
    return f"slurm job {job}: not in the queue"
