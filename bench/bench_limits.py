#!/usr/bin/env python3
"""Benchmark bounded output and the remote clean-up of ``run-on-nodes`` on a real lab.

Two measurements:

* **output**: 20 MB (``--size``) from one node, as 37-byte lines and as one single line, through
  ``mento-fab run-on-nodes`` (gathered, ``--json``, ``--stream``) and its peers: a
  plain fabric script (``Connection.run(hide=True)``, then the output printed),
  ClusterShell's ``clush -b`` (gathered) and ``clush`` (streamed), and ``ssh``
  (streamed, keeps nothing: the floor). Peak RSS of the process
  (``/usr/bin/time -f %M``) and wall time; everything printed goes to a pipe that
  is read and thrown away.
* **clean-up cost**: a ``true`` on every node of a 32-node lab with connections
  open (``mento_fab.runner.run``), with the node-side watchdog of
  :mod:`mento_fab.remote` and without it (the command line reduced to the run id
  export), interleaved, median of ``--warm`` runs each.

The Markdown goes to stdout and, unless ``--no-docs``, replaces the
``## Output limits and clean-up`` section of ``docs/benchmarks.md``::

    PYTHONPATH=$PWD python bench/bench_limits.py
    PYTHONPATH=$PWD python bench/bench_limits.py --size 20000000 --warm 20 --no-docs
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdocs import replace_section

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Output limits and clean-up"
TIME = "/usr/bin/time"
#: Measured once before the output limits existed (main at 5fd44f0).
BEFORE = (
    "Before the limits (issue 8; same commands on this machine): 100 MB of 37-byte li"
    "nes from one node peaked at 1768 MiB gathered, 335 MiB with `--json` and 235 MiB"
    " with `--stream`; one 30 MB line took 27 s and 190 MiB with `--stream` (quadrati"
    "c in the line's length). Now, for 100 MB: 76, 93 and 46 MiB; one 100 MB line str"
    "eams in 3.2 s."
)

FABRIC_SCRIPT = """\
import sys
from fabric import Config, Connection


user, key, ssh_config, host, command = sys.argv[1:]
conn = Connection(host, user=user, config=Config(runtime_ssh_path=ssh_config),
                  connect_kwargs={"key_filename": key})
result = conn.run(command, hide=True, warn=True)
sys.stdout.write(result.stdout)
"""


def measure(argv: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) and bytes printed of one process."""
    with tempfile.NamedTemporaryFile("r") as mem:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [TIME, "-f", "%M", "-o", mem.name, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        printed = 0
        while chunk := proc.stdout.read(1 << 20):  # type: ignore[union-attr]
            printed += len(chunk)
        proc.wait()
        elapsed = time.perf_counter() - start
        peak = int(mem.read().split()[-1]) / 1024
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}")
    return elapsed, peak, printed


def bench_output(lab: object, size: int, tmp: Path) -> list[str]:
    cfg, key, user = str(lab.ssh_config), str(lab.key), lab.user  # type: ignore[attr-defined]
    fabric_py = tmp / "fabric_run.py"
    fabric_py.write_text(FABRIC_SCRIPT)
    clush = shutil.which("clush") or "clush"
    mento = [sys.executable, "-m", "mento_fab", "run-on-nodes", "--nodes", "cn01",
             "--metadata", str(lab.metadata_file), "--ssh-config", cfg]  # type: ignore[attr-defined]  # fmt: skip
    shapes = {
        "37-byte lines": f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}",
        "one line": f"head -c {size} /dev/zero | tr '\\0' x",
    }
    rows = []
    for shape, command in shapes.items():
        tools = {
            "mento-fab (gathered)": [*mento, command],
            "mento-fab --json": [*mento, "--json", command],
            "mento-fab --stream": [*mento, "--stream", command],
            "fabric Connection.run": [
                sys.executable,
                str(fabric_py),
                user,
                key,
                cfg,
                "cn01",
                command,
            ],
            "clush -b (gathered)": [clush, "-b", "-w", "cn01", "-o", f"-F {cfg}", command],
            "clush (streamed)": [clush, "-w", "cn01", "-o", f"-F {cfg}", command],
            "ssh": ["ssh", "-F", cfg, "cn01", command],
        }
        for tool, argv in tools.items():
            print(f"output: {shape}: {tool}", file=sys.stderr, flush=True)
            elapsed, peak, printed = measure(argv)
            rows.append(
                f"| {shape} | {tool} | {peak:.0f} MiB | {elapsed:.1f} s | {printed / 1e6:.1f} MB |"
            )
    return rows


def bench_cleanup(lab: object, reps: int, tmp: Path) -> tuple[float, float]:
    """Median ms of a warm ``true`` on every node: with the watchdog, without."""
    import mento_fab.runner as runner
    from mento_fab import nodes_group
    from mento_fab.remote import RUN_ID_VARIABLE, remote_command

    def without(command: str, env=None, timeout=None, *, run_id=None) -> str:  # type: ignore[no-untyped-def]
        return f"export {RUN_ID_VARIABLE}={run_id}; {command}"

    group = nodes_group(
        lab.metadata_file,
        ssh_config=lab.ssh_config,
        known_hosts=lab.known_hosts,  # type: ignore[attr-defined]
    )
    times: dict[str, list[float]] = {"with": [], "without": []}
    try:
        for _ in range(3):
            assert runner.run(group, "true").ok
        for _ in range(reps):
            for variant, line in (("with", remote_command), ("without", without)):
                runner.remote_command = line  # type: ignore[assignment]
                start = time.perf_counter()
                report = runner.run(group, "true")
                times[variant].append(time.perf_counter() - start)
                if not report.ok:
                    raise RuntimeError(f"run failed: {report.results}")
    finally:
        runner.remote_command = remote_command  # type: ignore[assignment]
        group.close()
    return statistics.median(times["with"]) * 1000, statistics.median(times["without"]) * 1000


def section(rows: list[str], cleanup: tuple[float, float] | None, size: int,
            load: tuple[float, float]) -> str:  # fmt: skip
    today = datetime.date.today().isoformat()
    head = (
        f"{SECTION}\n\n`bench/bench_limits.py`, {today}; machine: {os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}. Load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after (other work on the machine adds noise).\n"
    )
    text = head
    if rows:
        text += (
            f"\n**Output**: {size / 1e6:.0f} MB from one node (`--max-output` default, 16 MiB); "
            "peak RSS of the process, wall time, bytes printed (mento-fab keeps and prints the "
            "first 16 MiB and reports the rest as not kept; `--stream` and the peers print "
            "everything; `--stream` prefixes each line, a long line in 64 KiB pieces):\n\n"
            "| output | tool | peak RSS | time | printed |\n| --- | --- | --- | --- | --- |\n"
            + "\n".join(rows)
            + "\n\n"
            + BEFORE
            + "\n"
        )
    if cleanup:
        with_, without = cleanup
        text += (
            "\n**Clean-up cost**: a warm `true` on 32 nodes (`mento_fab.runner.run`, "
            f"connections open): {with_:.1f} ms with the node-side watchdog, {without:.1f} ms "
            f"without it ({with_ / without:.2f}x). The watchdog is one fork of the node's "
            "shell per command; in the lab all 32 nodes share the client's cores, so that "
            "work adds up here, where on a cluster each node pays it on its own.\n"
        )
    return text


def write_docs(text: str) -> None:
    replace_section(DOCS, SECTION, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20_000_000, help="output bytes")
    parser.add_argument("--warm", type=int, default=30, help="warm runs per variant")
    parser.add_argument("--skip-output", action="store_true")
    parser.add_argument("--skip-cleanup", action="store_true")
    parser.add_argument("--workdir", default="/tmp/bench-limits")
    parser.add_argument("--prefix", default="blim")
    parser.add_argument("--subnet", default="198.18.10")
    parser.add_argument("--no-docs", action="store_true", help=f"do not update {DOCS}")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from lab import Lab

    load_before = os.getloadavg()[0]
    lab = Lab(Path(args.workdir), 32, prefix=args.prefix, subnet=args.subnet, user=args.prefix)
    rows: list[str] = []
    cleanup = None
    try:
        lab.up()
        with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
            if not args.skip_output:
                rows = bench_output(lab, args.size, Path(tmp))
            if not args.skip_cleanup:
                cleanup = bench_cleanup(lab, args.warm, Path(tmp))
    finally:
        lab.down()
    text = section(rows, cleanup, args.size, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
