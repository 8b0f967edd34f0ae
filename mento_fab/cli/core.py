"""``info``, ``check`` and ``run-on-nodes``: read the beamtime, test it, use it."""

from __future__ import annotations

import dataclasses
import re
import sys

from invoke import Context, Exit

from mento_fab import defaults
from mento_fab.cli import console
from mento_fab.cli.options import COMMON, NODES, Options, mento_task, number, print_json
from mento_fab.errors import BadInput

__all__ = ["check", "info", "run_on_nodes"]


@mento_task(shared=COMMON)
def info(c: Context, opts: Options):
    """Show the active beamtime: ids, paths, reserved nodes, Slurm, ASAPO (token paths only)."""
    from mento_fab.names import printable
    from mento_fab.nodes import fold

    session = opts.session()
    md, path, json = session.metadata, str(session.file), opts.json
    online, asapo = md.online, md.asapo
    if json:
        data = {"metadata_file": path, **dataclasses.asdict(md)}
        if online is not None:
            data["online"]["nodeset"] = fold(online.nodes)
        print_json(data)
        return
    rows = [
        ("Beamline", md.beamline),
        ("Beamtime", md.beamtime),
        ("Session", md.tag),
        ("Core path", md.corefs_path),
        ("Metadata", path),
    ]
    if online is None:
        rows.append(("Nodes", "none reserved (no onlineAnalysis block)"))
    else:
        rows += [
            ("Nodes", f"{fold(online.nodes)} ({len(set(online.nodes))})"),
            ("Partition", online.slurm.partition),
            ("Reservation", online.slurm.reservation),
            ("User", online.ssh.user),
            ("SSH key", online.ssh.key),
            ("Beamline FS", online.blfs_mountpoint or ""),
        ]
    if asapo is None:
        rows.append(("ASAPO", "no stream (no asapo block)"))
    else:
        rows += [
            ("ASAPO", asapo.endpoint),
            ("Token rw", asapo.token_rw),
            ("Token ro", asapo.token_ro),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        # Values are free of control characters (checked at load); the paths of the
        # session directory and the file are not, and a terminal must not run them.
        print(f"{key.ljust(width)}  {printable(value)}")


@mento_task(shared=NODES)
def check(c: Context, opts: Options):
    """Is the beamtime ready? Key file, and per node: login, round trip, home, beamline FS."""
    from mento_fab.check import check_beamtime

    session = opts.session()
    md, path = session.metadata, str(session.file)
    fan = opts.fanout
    with opts.group(session) as grp, console.Progress(len(grp), "checking"):
        result = check_beamtime(md, grp, metadata_file=path, fanout=fan)
    if opts.json:
        print_json(result.as_dict())
    else:
        print(f"metadata  {path}: valid")
        print(f"ssh key   {result.key_problem or result.key + ': ok'}")
        rows = []
        for n in result.nodes:
            state = "ready" if n.ready else "NOT READY"
            notes = n.error or n.message or ""
            rows.append([
                n.node,
                state,
                "yes" if n.login else "no",
                f"{n.rtt * 1000:.1f} ms" if n.rtt is not None else "-",
                {True: "yes", False: "no", None: "-"}[n.home_writable],
                {True: "yes", False: "no", None: "-"}[n.blfs_mounted],
                notes,
            ])  # fmt: skip
        console.print_table(
            f"{md.beamline} {md.beamtime}: nodes",
            ["node", "state", "login", "rtt", "home", result.blfs_mountpoint, "notes"],
            rows,
        )
        ready = sum(n.ready for n in result.nodes)
        verdict = "READY" if result.ready else "NOT READY"
        print(f"{verdict}: {ready}/{len(result.nodes)} nodes ready")
    if result.exit_status:
        raise Exit(code=result.exit_status)


@mento_task(
    shared=NODES,
    help={
        "command": "the shell command to run on every node",
        "stream": "print lines live, prefixed by node, instead of gathered output",
        "timeout": "seconds after which the command is killed on the node",
        "env": "NAME=VALUE for the command (repeatable); shows in the node's process list, "
        "so pass a token's file path, never the token",
        "via": "ssh (default) or slurm (one srun in the reservation)",
        "submit_node": "with --via slurm: node to run srun on (default: first reachable)",
        "max_output": "bytes of stdout and of stderr kept per node (K, M, G suffixes; default "
        f"{defaults.MAX_OUTPUT // 2**20}M); the rest is counted and reported, not kept",
    },
    iterable=["env"],
)
def run_on_nodes(
    c: Context,
    opts: Options,
    command: str,
    timeout: float | None = None,
    env: list[str] | None = None,
    stream: bool = False,
    via: str = "ssh",
    submit_node: str | None = None,
    max_output: str | None = None,
):
    """Run COMMAND on every reserved node; identical outputs are shown once per node set."""
    from mento_fab.runner import run

    environment = {}
    for item in env or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise BadInput(f"--env takes NAME=VALUE, not {item!r}")
        environment[name] = value
    if via not in ("ssh", "slurm"):
        raise BadInput(f"--via must be ssh or slurm, not {via!r}")
    if timeout is not None:
        timeout = number("--timeout", timeout)
    limit = defaults.MAX_OUTPUT if max_output is None else byte_count("--max-output", max_output)
    json = opts.json
    fanout = opts.fanout
    session = opts.session()
    md = session.metadata
    on_line = console.stream_printer() if stream and not json else None
    with opts.group(session) as grp:
        progress = console.Progress(
            len(grp), "running", enabled=None if not (stream or json) else False
        )
        with progress:
            if via == "slurm":
                from mento_fab.slurm import run_via_slurm

                result = run_via_slurm(
                    grp, md, command, timeout=timeout, env=environment, on_line=on_line,
                    submit_node=submit_node,
                )  # fmt: skip
            else:
                result = run(
                    grp,
                    command,
                    fanout=fanout,
                    timeout=timeout,
                    env=environment,
                    on_line=on_line,
                    on_result=progress.advance,
                    max_output=limit,
                )
    if json:
        print_json(result.as_json())
    else:
        if not stream:
            console.print_gathered(result)
        refused = None
        if via == "slurm":  # no node was reached because Slurm said no: say that, once
            from mento_fab.slurm import refusal

            refused = refusal(result)
        if refused:
            print(f"mento-fab: {refused}", file=sys.stderr)
        else:
            console.print_summary(result)
    if result.exit_status:
        raise Exit(code=result.exit_status)


_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:i?B)?\s*$", re.IGNORECASE)


def byte_count(option: str, value: str) -> int:
    """``16M``, ``512k``, ``1G`` or plain bytes as a number of bytes (units of 1024)."""
    match = _SIZE.match(str(value))
    if not match:
        raise BadInput(f"{option} takes a size such as 16M, 512K or 1048576, not {value!r}")
    count, unit = int(match[1]), match[2].upper()
    return count * 1024 ** " KMG".index(unit or " ")
