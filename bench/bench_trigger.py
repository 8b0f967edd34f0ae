#!/usr/bin/env python3
"""Benchmark one trigger per process (one process per scan) on a real lab (run by hand).

An acquisition that starts a new process for every scan pays, per trigger, the
interpreter, the imports and, without help, an SSH login. Measured here as a
whole process each, on one node of a 4-node lab brought up by this script:

* **agent warm**: ``python -c "from mento_fab.trigger import Trigger, TriggerMethod;
  Trigger(TriggerMethod.REMOTE_COMMAND, metadata=...).run(['true']).check()"`` while
  this user's connection agent runs with the node's connection open;
* **MENTO_AGENT=0**: the same process, the Trigger logs in itself;
* **ssh one-shot**: ``ssh -F ssh_config -i key -l user NODE true`` with the original
  toolkit's options (one login per trigger, as the original ``mento`` did);
* **ssh ControlPersist**: the same ``ssh`` with a master connection already open
  (OpenSSH's own kept connection, the strongest peer for "no login per trigger").

One untimed round first, then the runs interleaved (one of each per round, order
rotated). The agent's ``served`` count is checked to grow by exactly the agent
runs, so a run that silently went direct cannot count as warm. The Markdown goes to
stdout and, unless ``--no-docs``, replaces the ``## Triggers, one process per scan``
section of ``docs/benchmarks.md``. Needs root::

    PYTHONPATH=$PWD python bench/bench_trigger.py
    PYTHONPATH=$PWD python bench/bench_trigger.py --runs 9 --no-docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdocs import replace_section

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Triggers, one process per scan"
NODE = "cn01"
#: The original mento trigger's ssh options (get_ssh_command).
ORIGINAL_SSH_OPTIONS = [
    "BatchMode=yes", "CheckHostIP=no", "StrictHostKeyChecking=no", "GSSAPIAuthentication=no",
    "GSSAPIDelegateCredentials=no", "PasswordAuthentication=no", "PubkeyAuthentication=yes",
    "PreferredAuthentications=publickey", "IdentitiesOnly=yes", "ConnectTimeout=10",
]  # fmt: skip
SCAN = (
    "from mento_fab.trigger import Trigger, TriggerMethod; "
    "Trigger(TriggerMethod.REMOTE_COMMAND, metadata={md!r}, ssh_config={cfg!r}, "
    "known_hosts={kh!r}).run(['true']).check()"
)
LABELS = {
    "agent": "mento_fab `Trigger` process, agent warm",
    "direct": "mento_fab `Trigger` process, `MENTO_AGENT=0`",
    "ssh": "`ssh` one-shot, original options (a login per trigger)",
    "controlpersist": "`ssh` with a ControlPersist master already open",
}


def commands(lab, control: Path) -> dict[str, list[str]]:
    from mento_fab.metadata import parse_metadata_file

    md = parse_metadata_file(lab.metadata_file)
    scan = [sys.executable, "-c", SCAN.format(md=str(lab.metadata_file), cfg=str(lab.ssh_config),
                                              kh=str(lab.known_hosts))]  # fmt: skip
    ssh = ["ssh", "-F", str(lab.ssh_config)]
    for option in ORIGINAL_SSH_OPTIONS:
        ssh += ["-o", option]
    login = ["-i", md.online.ssh.key, "-l", md.online.ssh.user, NODE, "true"]
    master = ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
              "-o", "ControlPersist=600"]  # fmt: skip
    return {"agent": scan, "direct": scan, "ssh": ssh + login,
            "controlpersist": ssh + master + login}  # fmt: skip


def served(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-m", "mento_fab", "agent", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    (state,) = json.loads(out)["agents"]
    return int(state["served"])


def measure(lab, runs: int, tmp: Path) -> dict[str, list[float]]:
    agent_dir = tmp / "agent"
    agent_dir.mkdir(mode=0o700)
    base = {**os.environ, **lab.env(), "MENTO_AGENT_DIR": str(agent_dir),
            "PYTHONPATH": str(REPO)}  # fmt: skip
    envs = {"agent": {**base, "MENTO_AGENT": "1"}, "direct": {**base, "MENTO_AGENT": "0"},
            "ssh": base, "controlpersist": base}  # fmt: skip
    argv = commands(lab, tmp / "cm-%C")
    subprocess.run([sys.executable, "-m", "mento_fab", "info"], env=envs["agent"],
                   capture_output=True, check=True)  # the agent starts  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in argv}
    order = list(argv)
    try:
        for round_ in range(runs + 1):  # round 0: warm-up, not counted
            if round_ == 1:
                first = served(envs["agent"])
            for name in order:
                start = time.perf_counter()
                proc = subprocess.run(argv[name], env=envs[name], capture_output=True,
                                      timeout=120, check=False)  # fmt: skip
                seconds = time.perf_counter() - start
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed: {proc.stderr.decode()[-500:]}")
                if round_:
                    times[name].append(seconds)
            order = order[1:] + order[:1]
        if served(envs["agent"]) - first != runs:
            raise SystemExit("the agent did not serve every warm run: not a fair measurement")
    finally:
        subprocess.run([sys.executable, "-m", "mento_fab", "agent", "--stop"], env=base,
                       capture_output=True, check=False)  # fmt: skip
        subprocess.run([*argv["controlpersist"][:-2], "-O", "exit", NODE], env=base,
                       capture_output=True, check=False)  # fmt: skip
    return times


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def section(times: dict[str, list[float]], runs: int, loads: tuple[float, float]) -> str:
    import fabric
    import paramiko

    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        SECTION,
        "",
        f"`bench/bench_trigger.py`, {datetime.date.today()}; machine: {os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}; a 4-node lab on the "
        f"same machine, one node used; fabric {fabric.__version__}, paramiko "
        f"{paramiko.__version__}, {ssh_version.strip().split(',')[0]}. Load average "
        f"{loads[0]:.2f} before, {loads[1]:.2f} after.",
        "",
        f"**One trigger per process**: a whole process each, `true` on the node, waited for "
        f"to its end; median of {runs} (min-max), runs interleaved in one run of the script:",
        "",
        "| one scan | median | min-max | vs ssh one-shot |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in LABELS.items():
        values = times[key]
        lines.append(
            f"| {label} | {ms(med[key])} | {ms(min(values))}-{ms(max(values))} | "
            f"{med['ssh'] / med[key]:.2f}x |"
        )
    lines += [
        "",
        f"Through the agent a scan process costs {med['direct'] / med['agent']:.1f}x less "
        f"than the same process with `MENTO_AGENT=0` and {med['ssh'] / med['agent']:.1f}x "
        "less than one `ssh` login; what is left is the interpreter, `import "
        "mento_fab.trigger` (no fabric or paramiko on this path) and one call through the "
        "agent's kept connection. `ssh` with a ControlPersist master is "
        f"{med['agent'] / med['controlpersist']:.1f}x faster still: no Python start-up. "
        "The agent's `served` count was checked to grow by exactly the warm runs.",
    ]
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    replace_section(DOCS, SECTION, text, after="## Slurm and triggers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11, help="runs per case (default 11)")
    parser.add_argument("--workdir", default="/tmp/bench-trigger")
    parser.add_argument("--prefix", default="btrig")
    parser.add_argument("--subnet", default="198.18.12")
    parser.add_argument("--no-docs", action="store_true", help=f"do not update {DOCS}")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from lab import Lab

    load_before = os.getloadavg()[0]
    lab = Lab(Path(args.workdir), 4, prefix=args.prefix, subnet=args.subnet, user=args.prefix)
    try:
        lab.up()
        with tempfile.TemporaryDirectory(prefix="bench-trigger-") as tmp:
            times = measure(lab, args.runs, Path(tmp))
    finally:
        lab.down()
    text = section(times, args.runs, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
