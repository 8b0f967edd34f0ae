#!/usr/bin/env python3
"""Benchmark Slurm fan-out and triggers on a real lab with Slurm (not a test; run by hand).

Two measurements on one lab (32 nodes by default, munged + slurmctld + one
slurmd per node) brought up by this script:

* **run-on-nodes, SSH vs Slurm**: ``hostname`` on every node,
  - *cold*: ``mento-fab run-on-nodes hostname --json --via ssh`` against
    ``--via slurm``, a fresh process per run, runs interleaved;
  - *warm*: in this process with the connections already open,
    ``mento_fab.runner.run`` against ``mento_fab.slurm.run_via_slurm``.
  Every run's per-node output and exit status are checked to be the same on
  both paths, so a fast but wrong path cannot win.
* **trigger latency**: ``Trigger(REMOTE_COMMAND).run(["true"])`` against one
  ``ssh`` process per trigger with the original toolkit's options
  (``BatchMode``, ``IdentitiesOnly``, ``-i key -l user``...), alternating, both
  waited for to the command's end; plus how long ``run(..., background=True)``
  takes to return.

The Markdown table goes to stdout and, unless ``--no-docs``, replaces the
``## Slurm and triggers`` section of ``docs/benchmarks.md``. Needs root::

    PYTHONPATH=$PWD python bench/bench_slurm.py
    PYTHONPATH=$PWD python bench/bench_slurm.py --nodes 8 --runs 3 --triggers 50 --no-docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchdocs import replace_section

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Slurm and triggers"
COMMAND = "hostname"
#: The original mento trigger's ssh options (get_ssh_command), for the comparison.
ORIGINAL_SSH_OPTIONS = [
    "BatchMode=yes",
    "CheckHostIP=no",
    "StrictHostKeyChecking=no",
    "GSSAPIAuthentication=no",
    "GSSAPIDelegateCredentials=no",
    "PasswordAuthentication=no",
    "PubkeyAuthentication=yes",
    "PreferredAuthentications=publickey",
    "IdentitiesOnly=yes",
    "ConnectTimeout=10",
]


NOTE = (
    "Why the Slurm path is slower when connections are already open: every `srun` asks "
    "slurmctld for an allocation and starts one `slurmstepd` per node, which an SSH channel "
    "on an open connection does not pay; on a cold start the SSH path pays for one login per "
    "node instead and the two come out close. Other work loaded the machine during the run "
    "(see the load average); that weighs most on the many `slurmstepd` launches. The medians "
    "are as measured."
)


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def spread(values: list[float]) -> str:
    return f"{ms(statistics.median(values))} ({ms(min(values))}-{ms(max(values))})"


def per_node(nodes: list[dict]) -> list[tuple]:
    return [(n["node"], n["exit"], n["stdout"], n["stderr"], n["error"]) for n in nodes]


def cold_runs(lab, runs: int) -> dict[str, list[float]]:
    env = {**os.environ, **lab.env()}
    times: dict[str, list[float]] = {"ssh": [], "slurm": []}
    reference = None
    for i in range(runs + 1):  # the first round warms caches and is not counted
        order = ("ssh", "slurm") if i % 2 else ("slurm", "ssh")
        for via in order:
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "mento_fab", "run-on-nodes", COMMAND, "--json",
                 "--via", via],
                env=env, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"--via {via} failed ({proc.returncode}): {proc.stderr[-500:]}")
            results = per_node(json.loads(proc.stdout)["nodes"])
            shape = [(n, e, o, s) for n, e, o, s, _ in results]
            reference = reference or shape
            if shape != reference:
                raise SystemExit(f"--via {via} gave other per-node results than the first run")
            if i:
                times[via].append(elapsed)
    return times


def warm_runs(lab, runs: int) -> dict[str, list[float]]:
    from mento_fab.metadata import parse_metadata_file
    from mento_fab.nodes import nodes_group
    from mento_fab.runner import run
    from mento_fab.slurm import run_via_slurm

    md = parse_metadata_file(lab.metadata_file)
    group = nodes_group(md, ssh_config=lab.ssh_config)
    times: dict[str, list[float]] = {"ssh": [], "slurm": []}
    paths: dict[str, Callable] = {
        "ssh": lambda: run(group, COMMAND),
        "slurm": lambda: run_via_slurm(group, md, COMMAND),
    }
    try:
        run(group, "true")  # open every connection first
        for i in range(runs + 1):
            reports = {}
            for via in ("ssh", "slurm") if i % 2 else ("slurm", "ssh"):
                start = time.perf_counter()
                reports[via] = paths[via]()
                if i:
                    times[via].append(time.perf_counter() - start)
            a, b = (
                [(r.node, r.exit, r.stdout, r.stderr) for r in reports[v].results]
                for v in ("ssh", "slurm")
            )
            if a != b or reports["ssh"].exit_status:
                raise SystemExit("warm: SSH and Slurm paths disagree")
    finally:
        group.close()
    return times


def trigger_latency(lab, count: int) -> dict[str, list[float]]:
    from mento_fab.metadata import parse_metadata_file
    from mento_fab.trigger import Trigger, TriggerMethod

    md = parse_metadata_file(lab.metadata_file)
    node = md.online.nodes[0]
    ssh = ["ssh", "-F", str(lab.ssh_config)]
    for option in ORIGINAL_SSH_OPTIONS:
        ssh += ["-o", option]
    ssh += ["-i", md.online.ssh.key, "-l", md.online.ssh.user, node, "true"]
    times: dict[str, list[float]] = {"trigger": [], "ssh": [], "background": []}
    with Trigger(TriggerMethod.REMOTE_COMMAND, metadata=md, ssh_config=lab.ssh_config) as trig:
        for _ in range(count):
            start = time.perf_counter()
            handle = trig.run(["true"])
            times["trigger"].append(time.perf_counter() - start)
            if not handle.ok:
                raise SystemExit(f"trigger failed: {handle.describe()}")
            start = time.perf_counter()
            proc = subprocess.run(ssh, capture_output=True, timeout=60, check=False)
            times["ssh"].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise SystemExit(f"ssh failed: {proc.stderr.decode()[-300:]}")
        if trig.connects != {node: 1}:
            raise SystemExit(f"trigger reconnected: {trig.connects}")
        handles = []
        for _ in range(count):
            start = time.perf_counter()
            handles.append(trig.run(["true"], background=True))
            times["background"].append(time.perf_counter() - start)
        for handle in handles:
            if not handle.wait(120).ok:
                raise SystemExit(f"background trigger failed: {handle.describe()}")
    return times


def load() -> str:
    one, _, _ = os.getloadavg()
    return f"{one:.2f}"


def versions() -> str:
    import fabric
    import paramiko

    slurm = (
        "Slurm "
        + subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "slurm-client"], capture_output=True, text=True
        ).stdout
    )
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr
    return (
        f"fabric {fabric.__version__}, paramiko {paramiko.__version__}, "
        f"{slurm.strip()}, {ssh.strip().split(',')[0]}"
    )


def report(args, nodes: int, cold, warm, trig, load_before: str, load_after: str) -> str:
    cpu = os.cpu_count()
    lines = [
        SECTION,
        "",
        f"`bench/bench_slurm.py`, {datetime.date.today()}; machine: {cpu} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}; one lab of "
        f"{nodes} nodes with Slurm (munged, slurmctld and {nodes} slurmd on the same "
        f"machine as the client and every sshd); {versions()}. "
        f"Load average {load_before} before, {load_after} after.",
        "",
        f"**run-on-nodes `{COMMAND}` on {nodes} nodes** (median, min-max in brackets; "
        "per-node output and exit status checked equal on both paths in every run):",
        "",
        "| path | cold: fresh `mento-fab` process | warm: connections open, in-process |",
        "| --- | --- | --- |",
    ]
    for via, label in (("ssh", "`--via ssh` (one SSH session per node)"),
                       ("slurm", "`--via slurm` (one `srun` from the submit node)")):  # fmt: skip
        cold_cell = spread(cold[via]) if cold else "not run"
        warm_cell = spread(warm[via]) if warm else "not run"
        lines.append(f"| {label} | {cold_cell} | {warm_cell} |")
    ratios = [
        f"{statistics.median(d['slurm']) / statistics.median(d['ssh']):.2f}" if d else "-"
        for d in (cold, warm)
    ]
    lines.append(f"| ratio slurm / ssh | {ratios[0]} | {ratios[1]} |")
    lines += [
        "",
        f"Cold runs: {len(cold['ssh']) if cold else 0} per path, interleaved; warm runs: "
        f"{len(warm['ssh']) if warm else 0} per path, alternating.",
        "",
        f"**Trigger latency** ({len(trig['trigger'])} calls each, alternating, "
        "each waited for until the remote `true` has ended):",
        "",
        "| trigger | median | p95 | max |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (
        ("trigger", '`Trigger.run(["true"])`, REMOTE_COMMAND, one persistent connection'),
        ("ssh", "one `ssh` process per trigger, original options"),
        ("background", '`Trigger.run(["true"], background=True)` returning (queued)'),
    ):
        values = trig[key]
        lines.append(
            f"| {label} | {ms(statistics.median(values))} | {ms(percentile(values, 0.95))} | "
            f"{ms(max(values))} |"
        )
    trig_ratio = statistics.median(trig["ssh"]) / statistics.median(trig["trigger"])
    lines += ["", NOTE.strip(), "", "Targets (from the issue), as measured:", ""]
    lines.append(
        f"- trigger median at least 20x lower than ssh per trigger: {trig_ratio:.1f}x "
        f"({'met' if trig_ratio >= 20 else 'MISSED'})"
    )
    for name, data in (("cold", cold), ("warm", warm)):
        if data:
            ratio = statistics.median(data["slurm"]) / statistics.median(data["ssh"])
            lines.append(
                f"- Slurm path no slower than the SSH path at {nodes} nodes ({name}): "
                f"slurm / ssh = {ratio:.2f} ({'met' if ratio <= 1.0 else 'MISSED'})"
            )
    return "\n".join(lines) + "\n"


def write_docs(section: str) -> None:
    replace_section(DOCS, SECTION, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--runs", type=int, default=7, help="cold runs per path (default 7)")
    parser.add_argument("--warm", type=int, default=20, help="warm runs per path (default 20)")
    parser.add_argument("--triggers", type=int, default=200, help="calls each (default 200)")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    parser.add_argument("--workdir", default="/tmp/bench-slurm")
    parser.add_argument("--prefix", default="bslurm")
    parser.add_argument("--subnet", default="198.18.8")
    parser.add_argument("--slurmctld-port", type=int, default=6847)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root")
    sys.path.insert(0, str(REPO))
    from lab import Lab

    logging.basicConfig(level=logging.WARNING)
    lab = Lab(
        Path(args.workdir), args.nodes, slurm=True, prefix=args.prefix, subnet=args.subnet,
        slurmctld_port=args.slurmctld_port,
    )  # fmt: skip
    load_before = load()
    try:
        lab.up()
        print(f"lab up: {args.nodes} nodes with Slurm", file=sys.stderr)
        trig = trigger_latency(lab, args.triggers)
        print("triggers done", file=sys.stderr)
        warm = warm_runs(lab, args.warm) if args.warm else None
        print("warm runs done", file=sys.stderr)
        cold = cold_runs(lab, args.runs) if args.runs else None
        print("cold runs done", file=sys.stderr)
    finally:
        lab.down()
    section = report(args, args.nodes, cold, warm, trig, load_before, load())
    print(section)
    if not args.no_docs:
        write_docs(section)


if __name__ == "__main__":
    main()
