#!/usr/bin/env python3
"""How the two fan-out paths grow with the node count: ``--via ssh`` against ``--via slurm``.

For each lab size (8, 32 and 64 nodes by default; the lab goes up to 64), a lab
with Slurm is brought up and ``mento-fab run-on-nodes hostname --json`` is run,
interleaved, four ways: ``--via ssh`` and ``--via slurm``, each cold (a fresh
process with ``MENTO_AGENT=0``: imports, key loading, logins) and warm (through
the connection agent, its connections open). Per run: wall time, the client
process's CPU time (user+system, from ``/usr/bin/time``) and, for warm runs,
the agent's CPU time during the call (``/proc/<pid>/stat``). After the warm runs:
the agent's RSS and thread count, which grow with the connections it holds.

Every node of the lab runs its ``sshd``, ``slurmd`` and commands on the same
machine as the client, so wall times include the nodes' work; CPU times of the
client and the agent do not. The table goes to stdout and, unless ``--no-docs``,
replaces the ``## Measurements`` section of ``docs/scaling.md``. Needs root::

    PYTHONPATH=$PWD python bench/bench_scaling.py
    PYTHONPATH=$PWD python bench/bench_scaling.py --nodes 8 --runs 3 --no-docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchdocs import compile_package, exit_with, replace_section

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "scaling.md"
SECTION = "## Measurements"
TIME = "/usr/bin/time"
COMMAND = "hostname"
WAYS = ("ssh cold", "ssh warm", "slurm cold", "slurm warm")


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    agent_cpu: list[float] = field(default_factory=list)


@dataclass
class Size:
    nodes: int
    runs: dict[str, Runs] = field(default_factory=lambda: {w: Runs() for w in WAYS})
    agent_rss_kib: float = 0.0
    agent_threads: int = 0
    agent_connections: int = 0


class BenchError(RuntimeError):
    """A run failed or answered for the wrong nodes: its numbers would mean nothing."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mento_binary() -> str:
    local = Path(sys.executable).parent / "mento-fab"
    return str(local) if local.is_file() else "mento-fab"


def proc_stat(pid: int) -> tuple[float, int]:
    """CPU seconds so far and thread count of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[17])


def rss_kib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    return 0.0


def agent_pid(agent_dir: Path) -> int:
    (pidfile,) = agent_dir.glob("agent-*.pid")
    return int(pidfile.read_text())


def one_run(argv: list[str], env: dict[str, str], nodes: int) -> tuple[float, float]:
    """Wall and client CPU seconds of one ``mento-fab`` process; checks every node answered."""
    with tempfile.NamedTemporaryFile("r") as cpu:
        start = time.perf_counter()
        proc = subprocess.run(
            [TIME, "-f", "%U %S", "-o", cpu.name, *argv],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - start
        user, system = cpu.read().split()[-2:]
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[1:4])} exited {proc.returncode}: {proc.stderr[-600:]}")
    rows = json.loads(proc.stdout)["nodes"]
    if len(rows) != nodes or not all(r["exit"] == 0 and r["stdout"] for r in rows):
        raise BenchError(f"{' '.join(argv[1:4])}: {len(rows)} answers for {nodes} nodes")
    return wall, float(user) + float(system)


def measure(lab: object, runs: int, tmp: Path) -> Size:
    nodes = len(lab.nodes)  # type: ignore[attr-defined]
    agent_dir = tmp / "agent"
    agent_dir.mkdir(mode=0o700)
    base = {
        **os.environ,
        "MENTO_METADATA": str(lab.metadata_file),  # type: ignore[attr-defined]
        "MENTO_SSH_CONFIG": str(lab.ssh_config),  # type: ignore[attr-defined]
        "MENTO_AGENT_DIR": str(agent_dir),
    }
    envs = {"cold": {**base, "MENTO_AGENT": "0"}, "warm": {**base, "MENTO_AGENT": "1"}}
    mento = mento_binary()

    def argv(way: str) -> list[str]:
        return [mento, "run-on-nodes", "--json", "--via", way.split()[0], COMMAND]

    size = Size(nodes)
    try:
        for way in WAYS:  # untimed: starts the agent, opens its connections, warms sshd
            one_run(argv(way), envs[way.split()[1]], nodes)
        pid = agent_pid(agent_dir)
        for rep in range(runs):
            order = WAYS[rep % len(WAYS) :] + WAYS[: rep % len(WAYS)]
            for way in order:
                warm = way.endswith("warm")
                before = proc_stat(pid)[0] if warm else 0.0
                wall, cpu = one_run(argv(way), envs[way.split()[1]], nodes)
                size.runs[way].wall.append(wall)
                size.runs[way].client_cpu.append(cpu)
                if warm:
                    size.runs[way].agent_cpu.append(proc_stat(pid)[0] - before)
            log(f"  {nodes} nodes: round {rep + 1}/{runs}")
        state = json.loads(
            subprocess.run(
                [mento, "agent", "--json"], env=envs["warm"], capture_output=True, check=True
            ).stdout
        )
        (agent,) = state["agents"]
        if agent["served"] != 2 * (runs + 1) or agent["pid"] != pid:
            raise BenchError(f"the agent served {agent['served']} calls, not {2 * (runs + 1)}")
        size.agent_connections = sum(
            n["open"] for kind in agent["pool"] for n in kind["nodes"].values()
        )
        size.agent_rss_kib = rss_kib(pid)
        size.agent_threads = proc_stat(pid)[1]
    finally:
        subprocess.run([mento, "agent", "--stop"], env=envs["warm"], capture_output=True)
    return size


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(sizes: list[Size], runs: int, load: tuple[float, float]) -> str:
    counts = [s.nodes for s in sizes]
    head = "| path | " + " | ".join(f"{n} nodes" for n in counts) + " |"
    lines = [
        SECTION,
        "",
        f"`bench/bench_scaling.py`, {datetime.date.today().isoformat()}; "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}; labs of "
        f"{', '.join(map(str, counts))} nodes with Slurm, every sshd, slurmd and command on "
        f"the same machine as the client. `run-on-nodes {COMMAND} --json`; median of {runs}. "
        f"Load average {load[0]:.2f} before, {load[1]:.2f} after.",
        "",
        "Wall time per run:",
        "",
        head,
        "| --- |" + " --- |" * len(sizes),
    ]
    for way in WAYS:
        lines.append(f"| `--via {way}` | " + " | ".join(ms(med(s.runs[way].wall)) for s in sizes)
                     + " |")  # fmt: skip
    lines += ["", "CPU time per run (client process; warm: + the agent's share):", "", head,
              "| --- |" + " --- |" * len(sizes)]  # fmt: skip
    for way in WAYS:
        cells = []
        for s in sizes:
            r = s.runs[way]
            cell = ms(med(r.client_cpu))
            if r.agent_cpu:
                cell += f" + {ms(med(r.agent_cpu))}"
            cells.append(cell)
        lines.append(f"| `--via {way}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The agent after the runs (its connections to every node, for both paths' submit node):",
        "",
        head,
        "| --- |" + " --- |" * len(sizes),
        "| open connections | " + " | ".join(str(s.agent_connections) for s in sizes) + " |",
        "| threads | " + " | ".join(str(s.agent_threads) for s in sizes) + " |",
        "| RSS | " + " | ".join(f"{s.agent_rss_kib / 1024:.0f} MiB" for s in sizes) + " |",
        "",
    ]
    lines += per_node(sizes)
    return "\n".join(lines)


def per_node(sizes: list[Size]) -> list[str]:
    """The slope between the smallest and the largest lab: what one more node costs."""
    if len(sizes) < 2:
        return []
    lo, hi = sizes[0], sizes[-1]
    span = hi.nodes - lo.nodes
    out = [f"Cost of one more node (slope from {lo.nodes} to {hi.nodes} nodes):", ""]
    for way in WAYS:
        a, b = lo.runs[way], hi.runs[way]
        wall = (med(b.wall) - med(a.wall)) / span
        cpu = (med(b.client_cpu) + med(b.agent_cpu) - med(a.client_cpu) - med(a.agent_cpu)) / span
        out.append(f"- `--via {way}`: wall {ms(wall)}, CPU {ms(cpu)} per node")
    rss = (hi.agent_rss_kib - lo.agent_rss_kib) / max(
        1, hi.agent_connections - lo.agent_connections
    )
    out += [f"- the agent: {rss:.0f} KiB of RSS per open connection", ""]
    return out


def write_docs(text: str) -> None:
    replace_section(DOCS, SECTION, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="8,32,64", help="lab sizes (default 8,32,64)")
    parser.add_argument("--runs", type=int, default=9, help="runs per path and size (default 9)")
    parser.add_argument("--workdir", default="/tmp/bench-scaling")
    parser.add_argument("--prefix", default="bscale")
    parser.add_argument("--subnet", default="198.18.14")
    parser.add_argument("--slurmctld-port", type=int, default=6849)
    parser.add_argument("--no-docs", action="store_true", help=f"do not update {DOCS}")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root")
    sys.path.insert(0, str(REPO))
    compile_package(REPO / "mento_fab")
    from lab import Lab

    logging.basicConfig(level=logging.WARNING)
    sizes = []
    load_before = os.getloadavg()[0]
    for n in sorted({int(x) for x in args.nodes.split(",")}):
        lab = Lab(Path(args.workdir), n, slurm=True, prefix=args.prefix, subnet=args.subnet,
                  slurmctld_port=args.slurmctld_port)  # fmt: skip
        log(f"lab: bringing up {n} nodes with Slurm")
        try:
            lab.up()
            with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
                sizes.append(measure(lab, args.runs, Path(tmp)))
        finally:
            lab.down()
    text = report(sizes, args.runs, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_docs:
        write_docs(text)
        log(f"wrote the {SECTION!r} section of {DOCS}")
    return 0


if __name__ == "__main__":
    exit_with(main, "bench_scaling", BenchError)
