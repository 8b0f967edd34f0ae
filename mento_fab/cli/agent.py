"""``agent``: the state of this user's connection agent, and ``agent --stop``."""

from __future__ import annotations

import os
from typing import Any

from invoke import Context

from mento_fab.cli import console
from mento_fab.cli.options import Options, mento_task, print_json

__all__ = ["agent"]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _states() -> tuple[str, list[dict[str, Any]]]:
    """The agent directory and the state of every agent answering in it."""
    from mento_fab.agent import wire
    from mento_fab.cli import client

    directory = wire.agent_dir()
    states = []
    for names in wire.Names.all_in(directory):
        try:
            states.append(client.query(names, {"op": "status"}))
        except (OSError, EOFError, ValueError):
            continue  # a stale socket: the next call replaces it
    return str(directory), states


@mento_task(
    shared=("json",),
    help={"stop": "end the agent now (running calls are interrupted, as by Ctrl-C)"},
)
def agent(c: Context, opts: Options, stop: bool = False):
    """Show the connection agent: socket, pid, idle time, nodes and their connections."""
    from mento_fab.agent import wire
    from mento_fab.cli import client

    if stop:
        directory = wire.agent_dir()
        stopped = [
            names.socket for names in wire.Names.all_in(directory) if client.stop(names)
        ]
        if opts.json:
            print_json({"stopped": [str(s) for s in stopped]})
        elif stopped:
            for sock in stopped:
                print(f"stopped the agent at {sock}")
        else:
            print("no agent was running")
        return
    directory, states = _states()
    off = os.environ.get("MENTO_AGENT", "1").strip().lower() in ("0", "no", "off", "false")
    if opts.json:
        print_json({"directory": directory, "disabled": off, "agents": states})
        return
    if off:
        print("the agent is turned off here (MENTO_AGENT=0): calls run in their own process")
    if not states:
        print(f"no agent running in {directory}; the next call starts one")
        return
    for state in states:
        print(f"socket   {state['socket']}")
        print(f"pid      {state['pid']}, up {_duration(state['uptime'])}, "
              f"{state['served']} calls served")  # fmt: skip
        running = ", ".join(f"{r['task']} ({r['seconds']:g} s)" for r in state["calls"])
        idle = f"idle {_duration(state['idle_seconds'])}" if not running else f"running {running}"
        print(f"state    {idle}; exits after {_duration(state['idle_limit'])} without a call")
        print(f"log      {state['log']}")
        for kind in state["pool"]:
            rows = [
                [node, str(n["open"]), str(n["in_use"]), str(n["dropped"]),
                 _duration(n["idle_seconds"])]
                for node, n in kind["nodes"].items()
            ]  # fmt: skip
            console.print_table(
                f"{kind['metadata']} (as {kind['user']})",
                ["node", "open", "in use", "dropped", "idle"],
                rows,
            )
