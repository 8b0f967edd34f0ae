"""``submit``, ``jobs``, ``cancel`` and ``reservation``: Slurm in the beamtime's reservation.

invoke takes one value per positional argument, so the job script's arguments
go in one shell-quoted string (``mento-fab submit job.sh --args "a 'b c'"``)
and job ids to cancel with a repeatable option (``mento-fab cancel --job 12 --job 13``,
or ``--job 12,13``; invoke positional arguments are always required, which
would rule out ``cancel --all``).
"""

from __future__ import annotations

import re
import shlex
import sys
from typing import Any

from invoke import Context, Exit

from mento_fab import defaults
from mento_fab.cli import console
from mento_fab.cli.options import SLURM, Options, mento_task, print_json
from mento_fab.defaults import BAD_INPUT_EXIT, UNREACHABLE_EXIT
from mento_fab.errors import BadInput

__all__ = ["cancel", "jobs", "reservation", "submit"]

#: A job that ended without an exit code (forgotten by slurmctld, connection lost).
LOST_EXIT = UNREACHABLE_EXIT


def _open(c: Context, opts: Options) -> Any:
    """A Slurm client on the submit node, from task options."""
    from mento_fab.slurm import Slurm

    session = opts.session()
    grp = opts.group(session)
    return Slurm.from_group(grp, session.metadata, submit_node=opts.submit_node)


@mento_task(
    shared=SLURM,
    help={
        "script": "job script: a local file is uploaded first, otherwise a path on the node",
        "args": "arguments for the script, as one shell-quoted string: --args \"a 'b c'\"",
        "job_name": "job name (default mento_<beamline>_<beamtime>)",
        "time": f"time limit (default {defaults.SLURM_TIME}, one day)",
        "dependency": "sbatch --dependency, e.g. afterok:123",
        "output": "file for the job's output on the nodes (default Slurm's slurm-%j.out)",
        "nodes": "how many nodes the job asks for (sbatch --nodes)",
        "wait": "follow the job to its end and exit with its exit code",
    },
)
def submit(
    c: Context,
    opts: Options,
    script: str,
    args: str | None = None,
    job_name: str | None = None,
    time: str | None = None,
    dependency: str | None = None,
    output: str | None = None,
    nodes: str | None = None,
    wait: bool = False,
):
    """Submit SCRIPT to the beamtime's reservation with sbatch; prints the job id."""
    script_args = shlex.split(args) if args else []
    json = opts.json
    with _open(c, opts) as slurm:
        job = slurm.submit(
            script, script_args, job_name=job_name, time=time or defaults.SLURM_TIME,
            dependency=dependency, output=output, nodes=nodes,
        )  # fmt: skip
        if not json:
            print(job.id, flush=True)
        if not wait:
            if json:
                print_json({"job_id": job.id, "name": job.name, "submit_node": slurm.node})
            return

        def show(info: Any) -> None:
            if not json:
                print(f"job {info.id}: {info.state}", file=sys.stderr, flush=True)

        info = job.wait(on_state=show)
    status = info.exit_code if info.exit_code is not None else LOST_EXIT
    if json:
        print_json({**info.as_dict(), "job_id": job.id, "submit_node": slurm.node})
    elif info.exit_code is None:
        print(f"job {job.id}: exit code lost (slurmctld forgot the job)", file=sys.stderr)
    if status:
        raise Exit(code=status)


@mento_task(shared=SLURM)
def jobs(
    c: Context,
    opts: Options,
):
    """List this account's jobs in the beamtime's reservation."""
    from mento_fab.nodes import fold

    json = opts.json
    with _open(c, opts) as slurm:
        found = slurm.jobs()
    if json:
        print_json(
            {
                "reservation": slurm.info.reservation,
                "submit_node": slurm.node,
                "jobs": [j.as_dict() for j in found],
            }
        )
        return
    rows = [
        [j.id, j.name, j.state, fold(j.nodes) if j.nodes else f"({j.reason or 'none'})", j.elapsed]
        for j in found
    ]
    console.print_table(
        f"reservation {slurm.info.reservation}: {len(found)} job{'s' if len(found) != 1 else ''}",
        ["id", "name", "state", "nodes", "elapsed"],
        rows,
    )


@mento_task(
    shared=SLURM,
    help={
        "job": "job id to cancel (repeatable; also comma-separated: --job 12,13)",
        "all": "cancel all of this account's jobs in the reservation",
    },
    iterable=["job"],
)
def cancel(
    c: Context,
    opts: Options,
    job: list[str] | None = None,
    all: bool = False,
):
    """Cancel jobs by id, or --all of this account's jobs in the reservation.

    A job id Slurm does not know is an error (exit 1); one that had already
    ended is reported as such.
    """
    ids = [j for item in job or [] for j in re.split(r"[\s,]+", item) if j]
    if not ids and not all:
        raise BadInput("name the job ids to cancel, or use --all")
    json = opts.json
    with _open(c, opts) as slurm:
        cancelled = slurm.cancel(ids, all=all)
    ended = [j for j in dict.fromkeys(ids) if j not in cancelled]
    if json:
        print_json({"cancelled": cancelled, "ended": ended, "submit_node": slurm.node})
        return
    if cancelled:
        print(f"cancelled {', '.join(cancelled)}")
    if ended:
        print(f"already ended: {', '.join(ended)}", file=sys.stderr)
    if not cancelled and not ended:
        print("no jobs to cancel", file=sys.stderr)


@mento_task(shared=SLURM)
def reservation(
    c: Context,
    opts: Options,
):
    """Show the beamtime's reservation: state, start, end, nodes (vs. the metadata's)."""
    from mento_fab.nodes import fold

    json = opts.json
    with _open(c, opts) as slurm:
        res = slurm.reservation()
    reserved = list(slurm.md.online.nodes)
    only_metadata, only_slurm = res.compare(reserved)
    problem = res.problem()
    if json:
        print_json(
            {
                "reservation": res.as_dict(),
                "metadata_nodes": reserved,
                "only_in_metadata": only_metadata,
                "only_in_reservation": only_slurm,
                "problem": problem,
            }
        )
    else:
        rows = [
            ("Reservation", res.name),
            ("State", res.state),
            ("Start", f"{res.start:%Y-%m-%d %H:%M:%S}" if res.start else "-"),
            ("End", f"{res.end:%Y-%m-%d %H:%M:%S}" if res.end else "-"),
            ("Nodes", f"{fold(res.nodes)} ({len(res.nodes)})" if res.nodes else "-"),
            ("Partition", res.partition or "-"),
            ("Users", ",".join(res.users) or "-"),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key.ljust(width)}  {value}")
        if only_metadata:
            print(f"not in the reservation but in the metadata: {fold(only_metadata)}")
        if only_slurm:
            print(f"in the reservation but not in the metadata: {fold(only_slurm)}")
        if not (only_metadata or only_slurm):
            print("nodes match the metadata")
    if problem:
        raise Exit(f"mento-fab: {problem}", code=BAD_INPUT_EXIT)
