"""``start``, ``ps``, ``logs``, ``stop`` and ``top``: workers on every node, and a live view.

Thin wrappers over :mod:`mento_fab.workers`: options in, a table or JSON out.
``ps`` exits 0 when every selected worker is running, 1 when one is not, 255 when
a node could not be reached; the others follow the exit rule of ``run-on-nodes``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from invoke import Context, Exit

from mento_fab import defaults
from mento_fab.cli import console
from mento_fab.cli.options import (
    NODES,
    Options,
    is_tty,
    mento_task,
    number,
    print_json,
    whole,
)
from mento_fab.errors import BadInput

__all__ = ["logs", "ps", "start", "stop", "top"]

#: ``top --once``: seconds a node may take beyond the connect timeout to answer.
ONCE_SLACK = 10.0

_NAME = "the worker's name (letters, digits, '_', '.', '-')"
START_HELP = {
    "name": _NAME,
    "command": "the shell command the worker runs (in your login shell, on every node)",
    "per_node": "instances per node (each gets MENTO_WORKER_INDEX=0..N-1; default 1)",
    "restart": f"no (default), on-failure or always (as systemd's Restart=); "
    f"back-off {defaults.WORKER_RESTART_DELAY:g} s doubling up to "
    f"{defaults.WORKER_RESTART_DELAY_MAX:g} s",
    "max_restarts": f"restarts in a row before giving up (default {defaults.WORKER_MAX_RESTARTS}; "
    "a run of a minute resets the count)",
    "cwd": "working directory on the nodes (default: the target's current release with "
    "--target, else the home directory)",
    "env": "NAME=VALUE for the worker (repeatable); sent on the supervisor's stdin, "
    "never on a command line",
    "target": "a deploy target (e.g. ~/mento_fab/<beamtime id>): run in its current release, "
    "with .mento/beamtime.env in the environment",
    "replace": "stop a running worker of that name first (otherwise: refused, exit 2)",
    "grace": f"with --replace: seconds between SIGTERM and SIGKILL (default "
    f"{defaults.WORKER_GRACE:g})",
    "via": "ssh (default: detached on each node) or slurm (one job in the reservation)",
    "submit_node": "with --via slurm: node to run sbatch on (default: first reachable)",
}


def _env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInput(f"--env takes NAME=VALUE, not {item!r}")
        env[key] = value
    return env


def _notes(report: Any) -> None:
    """Per-node problems and words, then the report's notes, on stderr."""
    for result in report.run.results:
        if not result.ok:
            why = result.error or result.message or f"exit {result.exit}"
            print(f"{result.node}: {why}", file=sys.stderr)
    for note in getattr(report, "notes", []):
        print(note, file=sys.stderr)


def _render(report: Any, json: bool, title: str) -> None:
    if json:
        print_json(report.as_json())
    else:
        if report.workers:
            console.print_table(title, list(report.COLUMNS), report.rows())
        _notes(report)
        s = report.summary()
        states = ", ".join(f"{n} {state}" for state, n in s["states"].items()) or "no workers"
        count = s["nodes"]
        unreachable = f", {s['unreachable']} unreachable" if s["unreachable"] else ""
        print(f"{count} node{'s' if count != 1 else ''}: {states}{unreachable}", file=sys.stderr)
    if report.exit_status:
        raise Exit(code=report.exit_status)


@mento_task(shared=NODES, help=START_HELP, iterable=["env"])
def start(
    c: Context,
    opts: Options,
    name: str,
    command: str,
    per_node: int = 1,
    restart: str = defaults.WORKER_RESTART,
    max_restarts: str | None = None,
    cwd: str | None = None,
    env: list[str] | None = None,
    target: str | None = None,
    replace: bool = False,
    grace: str | None = None,
    via: str = "ssh",
    submit_node: str | None = None,
):
    """Start COMMAND as worker NAME on every selected node, detached (it outlives you)."""
    from mento_fab.workers import WorkerSpec
    from mento_fab.workers import start as start_workers

    if via not in ("ssh", "slurm"):
        raise BadInput(f"--via must be ssh or slurm, not {via!r}")
    spec = WorkerSpec(
        name,
        command,
        per_node=whole("--per-node", per_node),
        restart=restart,
        max_restarts=(
            defaults.WORKER_MAX_RESTARTS
            if max_restarts is None
            else whole("--max-restarts", max_restarts)
        ),
        cwd=cwd,
        env=_env(env),
        target=target,
        replace=replace,
        grace=defaults.WORKER_GRACE if grace is None else number("--grace", grace),
    )
    session = opts.session()
    with opts.group(session) as grp:
        if via == "slurm":
            from mento_fab.workers.slurm import start_via_slurm

            report = start_via_slurm(
                grp, spec, session.metadata, submit_node=submit_node, fanout=opts.fanout
            )
        else:
            report = start_workers(grp, spec, fanout=opts.fanout)
    _render(report, opts.json, f"start {spec.name}")


@mento_task(shared=NODES, help={"name": "only this worker (default: every worker)"})
def ps(c: Context, opts: Options, name: str | None = None):
    """Workers on the nodes: state, pid, uptime, restarts, last exit, CPU %, memory."""
    from mento_fab.workers import ps as list_workers

    session = opts.session()
    with opts.group(session) as grp:
        report = list_workers(grp, name, fanout=opts.fanout)
    if not report.workers and not opts.json:
        print("no workers", file=sys.stderr)
    _render(report, opts.json, "workers")


ps.optional_positional = ("name",)


@mento_task(
    shared=NODES,
    help={
        "name": _NAME,
        "lines": f"lines per node and instance (default {defaults.WORKER_LOG_LINES})",
        "follow": "print new lines live as 'node: line' until Ctrl-C",
    },
)
def logs(
    c: Context,
    opts: Options,
    name: str,
    lines: int = defaults.WORKER_LOG_LINES,
    follow: bool = False,
):
    """The worker's log from every node (the last lines, or live with --follow)."""
    from mento_fab.workers import follow as follow_logs
    from mento_fab.workers import logs as read_logs

    count = whole("--lines", lines)
    session = opts.session()
    if follow:
        lock = threading.Lock()

        def on_line(node: str, line: str) -> None:
            with lock:
                print(f"{node}: {line}", flush=True)

        with opts.group(session) as grp:
            try:
                report = follow_logs(grp, name, on_line, lines=count, fanout=opts.fanout)
            except KeyboardInterrupt:
                return  # Ctrl-C is how --follow ends; the nodes' tails are gone
        for result in report.results:
            if not result.ok or result.message:
                why = result.error or result.message or "ended"
                print(f"{result.node}: {why}", file=sys.stderr)
        if report.exit_status:
            raise Exit(code=report.exit_status)
        return
    with opts.group(session) as grp:
        report = read_logs(grp, name, lines=count, fanout=opts.fanout)
    if opts.json:
        print_json(report.as_json())
    else:
        console.print_gathered(report)
        for result in report.results:
            if result.message or result.error or result.exit:
                why = result.error or result.message or f"exit {result.exit}"
                print(f"{result.node}: {why}", file=sys.stderr)
    if report.exit_status:
        raise Exit(code=report.exit_status)


@mento_task(
    shared=NODES,
    help={
        "name": _NAME,
        "all": "stop every worker on the selected nodes",
        "grace": f"seconds between SIGTERM and SIGKILL (default {defaults.WORKER_GRACE:g})",
    },
)
def stop(
    c: Context,
    opts: Options,
    name: str | None = None,
    all: bool = False,
    grace: str | None = None,
):
    """Stop worker NAME (or --all): SIGTERM to its process group, SIGKILL after --grace."""
    from mento_fab.workers import stop as stop_workers

    if bool(name) == bool(all):
        raise BadInput("stop takes a worker NAME or --all (one of them)")
    seconds = defaults.WORKER_GRACE if grace is None else number("--grace", grace)
    session = opts.session()
    with opts.group(session) as grp:
        report = stop_workers(
            grp, name, grace=seconds, fanout=opts.fanout, metadata=session.metadata
        )
    _render(report, opts.json, f"stop {name or '--all'}")


stop.optional_positional = ("name",)


@mento_task(
    shared=NODES,
    help={
        "once": "print one snapshot and exit",
        "interval": f"seconds between refreshes (default {defaults.TOP_INTERVAL:g})",
        "target": "the deploy target whose free space to show (default ~/mento_fab/<beamtime id>)",
    },
)
def top(
    c: Context,
    opts: Options,
    once: bool = False,
    interval: str | None = None,
    target: str | None = None,
):
    """A live view of the nodes: load, CPU, memory, GPUs, disk, workers; reservation end."""
    from mento_fab.cli import topview
    from mento_fab.workers.top import Top

    every = defaults.TOP_INTERVAL if interval is None else number("--interval", interval)
    session = opts.session()
    md = session.metadata
    target = target or opts.setting("deploy_target") or f"~/mento_fab/{md.beamtime}"
    live = not once and not opts.json and is_tty(sys.stdout)
    with opts.group(session) as grp, Top(grp, metadata=md, target=target, fanout=opts.fanout) as t:
        if live:
            topview.live(t, every, f"{md.beamline} {md.beamtime}")
            return
        snapshot = t.refresh(timeout=opts.connect_timeout + ONCE_SLACK, once=True)
        if opts.json:
            print_json(snapshot.as_json())
        else:
            topview.print_snapshot(snapshot, f"{md.beamline} {md.beamtime}")
    if snapshot.exit_status:
        raise Exit(code=snapshot.exit_status)
