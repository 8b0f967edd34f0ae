#!/usr/bin/env python3
"""Start-up of the ``mento-fab`` command, before and after the cold-start work.

Each given git revision is exported (``git archive``) into a scratch directory and
run through the console entry point its own ``pyproject.toml`` names, so old and
new code run with the same interpreter and the same installed libraries. Runs are
interleaved (one of each revision per round) so load from elsewhere hits all alike.

Measured per revision, whole process, median of ``--runs``:

* ``mento-fab --version``;
* ``mento-fab run-on-nodes true --json`` on a lab of ``--nodes`` nodes with
  ``MENTO_AGENT=0`` (interpreter start, imports, key loading, logins), and, for
  revisions that have the connection agent, through the agent with its
  connections open;
* the time ``run-on-nodes`` spends importing (``python -X importtime``) and
  which heavy packages it loads (``unittest``/``asyncio`` come with invoke).

The table goes to stdout and, unless ``--no-docs``, replaces the ``## Start-up``
section of ``docs/benchmarks.md``. Needs root (the lab)::

    PYTHONPATH=$PWD python bench/bench_startup.py --revisions b27dfe5,HEAD
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from benchdocs import compile_package, exit_with, replace_section

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Start-up"
CASES = ("--version", "run-on-nodes, MENTO_AGENT=0", "run-on-nodes, agent warm")


class BenchError(RuntimeError):
    """A run failed: its numbers would mean nothing."""


@dataclass
class Revision:
    name: str
    sha: str
    root: Path
    entry: str  # "module:function"
    has_agent: bool
    seconds: dict[str, list[float]] = field(default_factory=dict)
    import_ms: float = 0.0
    heavy: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export(rev: str, scratch: Path) -> Revision:
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    root = scratch / sha
    root.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", sha],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    tar_path = scratch / f"{sha}.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(root, filter="data")
    compile_package(root / "mento_fab")
    entry = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["mento-fab"]
    return Revision(rev, sha, root, entry, (root / "mento_fab" / "agent").is_dir())


def command(rev: Revision, args: list[str]) -> list[str]:
    module, function = rev.entry.split(":")
    code = (
        f"import sys; sys.argv = ['mento-fab', *sys.argv[1:]]; "
        f"from {module} import {function}; sys.exit({function}())"
    )
    return [sys.executable, "-c", code, *args]


def environment(rev: Revision, agent: bool, agent_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(rev.root)
    env["MENTO_AGENT"] = "1" if agent else "0"
    private = agent_dir / "agents" / rev.sha  # the agent refuses a directory others can enter
    private.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(private.parent, 0o700)
    env["MENTO_AGENT_DIR"] = str(private)
    return env


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"{argv[3:6]} exited {proc.returncode}: {proc.stderr[-600:]}")
    return elapsed, proc.stdout


HEAVY = ("unittest", "asyncio", "paramiko", "invoke", "fabric", "marshmallow", "rich")


def import_profile(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, list[str]]:
    """Import time of one whole command (ms, best of 5) and the heavy packages it loads.

    The sum of ``-X importtime``'s cumulative times of top-level imports: what the
    command spends importing, whichever module the entry point is.
    """
    best = float("inf")
    heavy: set[str] = set()
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], env=env,
                              cwd=cwd, capture_output=True, text=True, check=False)  # fmt: skip
        total = 0
        for line in proc.stderr.splitlines():
            parts = line.split("|")
            if len(parts) != 3 or not parts[1].strip().isdigit():
                continue
            name = parts[2].rstrip()
            if not name.startswith("  "):  # top level: its cumulative time counts once
                total += int(parts[1])
            if name.strip() in HEAVY:
                heavy.add(name.strip())
        best = min(best, total / 1000)
    return best, sorted(heavy)


def measure(revisions: list[Revision], lab: object, runs: int, tmp: Path) -> None:
    metadata = str(lab.metadata_file)  # type: ignore[attr-defined]
    cfg = str(lab.ssh_config)  # type: ignore[attr-defined]
    n = len(lab.nodes)  # type: ignore[attr-defined]
    run_args = ["run-on-nodes", "true", "--json", "--metadata", metadata, "--ssh-config", cfg]
    plan: list[tuple[Revision, str, list[str], dict[str, str]]] = []
    for rev in revisions:
        plan.append((rev, CASES[0], ["--version"], environment(rev, False, tmp)))
        plan.append((rev, CASES[1], run_args, environment(rev, False, tmp)))
        if rev.has_agent:
            plan.append((rev, CASES[2], run_args, environment(rev, True, tmp)))
    for rev, _case, args, env in plan:  # untimed: page cache, agent start, known_hosts
        _, out = timed(command(rev, args), env, tmp)
        if args is run_args:
            rows = json.loads(out)["nodes"]
            if len(rows) != n or not all(r["exit"] == 0 for r in rows):
                raise BenchError(f"{rev.sha}: {len(rows)} answers for {n} nodes")
    try:
        for rep in range(runs):
            order = plan[rep % len(plan) :] + plan[: rep % len(plan)]
            for rev, case, args, env in order:
                seconds, _ = timed(command(rev, args), env, tmp)
                rev.seconds.setdefault(case, []).append(seconds)
            log(f"  round {rep + 1}/{runs}")
        for rev in revisions:  # a warm call that ran without the agent would not be warm
            if rev.has_agent:
                _, out = timed(command(rev, ["agent", "--json"]), environment(rev, True, tmp), tmp)
                served = [a["served"] for a in json.loads(out)["agents"]]
                if served != [runs + 1]:
                    raise BenchError(f"{rev.sha}: the agent served {served}, not {runs + 1}")
    finally:
        for rev in revisions:
            if rev.has_agent:
                subprocess.run(command(rev, ["agent", "--stop"]), env=environment(rev, True, tmp),
                               capture_output=True, check=False)  # fmt: skip
    for rev in revisions:
        rev.import_ms, rev.heavy = import_profile(
            command(rev, run_args), environment(rev, False, tmp), tmp
        )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def report(revisions: list[Revision], nodes: int, runs: int, load: tuple[float, float]) -> str:
    head = "| | " + " | ".join(f"`{r.sha}` ({r.name})" for r in revisions) + " |"
    lines = [
        SECTION,
        "",
        f"`bench/bench_startup.py`, {datetime.date.today().isoformat()}; {os.cpu_count()} "
        f"cores, Python {sys.version.split()[0]}; whole process, median of {runs}, "
        f"`run-on-nodes true --json` on {nodes} lab nodes. Load average {load[0]:.2f} "
        f"before, {load[1]:.2f} after.",
        "",
        head,
        "| --- |" + " --- |" * len(revisions),
    ]
    for case in CASES:
        cells = []
        for r in revisions:
            values = r.seconds.get(case)
            cells.append(ms(statistics.median(values)) if values else "(no agent)")
        lines.append(f"| `{case}` | " + " | ".join(cells) + " |")
    lines.append(
        "| imports of `run-on-nodes`, MENTO_AGENT=0 (`-X importtime`, best of 5) | "
        + " | ".join(f"{r.import_ms:.0f} ms" for r in revisions)
        + " |"
    )
    lines.append(
        "| heavy packages it loads | "
        + " | ".join(", ".join(r.heavy) or "none" for r in revisions)
        + " |"
    )
    first, last = revisions[0], revisions[-1]
    lines += ["", "Ratios, last revision against the first:", ""]
    for case in CASES[:2]:
        a, b = first.seconds.get(case), last.seconds.get(case)
        if a and b:
            ratio = statistics.median(b) / statistics.median(a)
            lines.append(f"- `{case}`: {ratio:.2f}x")
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    replace_section(DOCS, SECTION, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revisions", default="b27dfe5,HEAD",
                        help="git revisions, oldest first (default b27dfe5,HEAD)")  # fmt: skip
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--workdir", default="/tmp/bench-startup")
    parser.add_argument("--prefix", default="bstart")
    parser.add_argument("--subnet", default="198.18.15")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root")
    sys.path.insert(0, str(REPO))
    from lab import Lab

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        tmp = Path(scratch)
        revisions = [export(r, tmp) for r in args.revisions.split(",")]
        lab = Lab(Path(args.workdir), args.nodes, prefix=args.prefix, subnet=args.subnet)
        log(f"lab: bringing up {args.nodes} nodes")
        try:
            lab.up()
            measure(revisions, lab, args.runs, tmp)
        finally:
            lab.down()
    text = report(revisions, args.nodes, args.runs, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_docs:
        write_docs(text)
        log(f"wrote the {SECTION!r} section of {DOCS}")
    return 0


if __name__ == "__main__":
    exit_with(main, "bench_startup", BenchError)
