"""Benchmark ``mento_fab.deployment`` against parallel ``rsync -a`` and ``scp -r`` (run as root).

    python bench/bench_deploy.py [--rounds 5] [--nodes 8] [--subnet 198.18.7]

Brings up its own lab (prefix ``bdeploy``, subnet 198.18.7.0/24 unless ``--subnet``
names another free one, workdir /tmp/bench-deploy), generates a 50 MB tree of 2,000
files (incompressible: no tool compresses here), and times, on node-local targets
(``/srv/local``, one disk per node):

- first deploy: mento_fab vs ``rsync -a`` and ``scp -r`` over ssh, one process per
  node, all nodes at once;
- one changed file: mento_fab redeploy vs rsync to the same target again;
- no change: mento_fab vs rsync again.

mento_fab's times include what the CLI does: scan + hash of the tree, a fresh
connection to every node, staging, switching. Medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab import Lab
from mento_fab import deployment as dp
from mento_fab.metadata import parse_metadata_file
from mento_fab.nodes import nodes_group

WORKDIR = Path("/tmp/bench-deploy")
FILES = 2000
TOTAL = 50 * 1000 * 1000


def make_tree(root: Path, seed: int = 0) -> Path:
    """2,000 files of random content, 50 MB in all, spread over 40 directories."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 2 * TOTAL // FILES) for _ in range(FILES)]
    scale = TOTAL / sum(sizes)
    for i, size in enumerate(sizes):
        path = root / f"pkg{i % 40:02d}" / f"mod{i:04d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(max(1, int(size * scale))))
    return root


def fan_out(lab: Lab, argv_for: Callable[[str], list[str]]) -> None:
    """Run one process per node, all at once; fail loudly if any fails."""

    def one(node: str) -> None:
        proc = subprocess.run(argv_for(node), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{node}: {' '.join(argv_for(node)[:3])}: {proc.stderr.strip()}")

    with ThreadPoolExecutor(len(lab.nodes)) as pool:
        list(pool.map(one, lab.nodes))


def timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--subnet", default="198.18.7", help="three octets of a free /24")
    args = parser.parse_args()

    if (WORKDIR / "lab.json").exists():
        Lab.from_state(WORKDIR).down()
    lab = Lab(WORKDIR, args.nodes, prefix="bdeploy", subnet=args.subnet)
    lab.up()
    try:
        session = lab.make_session(WORKDIR / "session", lab.nodes)
        md = parse_metadata_file(session)
        src = make_tree(WORKDIR / "src")
        ssh = f"ssh -F {lab.ssh_config}"
        times: dict[str, list[float]] = {}

        def record(key: str, seconds: float) -> None:
            times.setdefault(key, []).append(seconds)

        def mento(target: str) -> dp.DeployReport:
            grp = nodes_group(md, ssh_config=lab.ssh_config)
            try:
                report = dp.deploy(grp, session, src, target)
            finally:
                grp.close()
            if not report.ok:
                raise RuntimeError(f"mento_fab deploy failed: {report.run.results}")
            return report

        for r in range(args.rounds):
            for node in lab.nodes:
                lab.node_exec(node, ["sh", "-c", "rm -rf /srv/local/bm-*"])
            mt, rt, st = (
                f"/srv/local/bm-mento-{r}",
                f"/srv/local/bm-rsync-{r}",
                f"/srv/local/bm-scp-{r}",
            )

            def rsync(node: str, target: str = rt) -> list[str]:
                return ["rsync", "-a", "-e", ssh, f"{src}/", f"{node}:{target}/"]

            def scp(node: str, target: str = st) -> list[str]:
                return ["scp", "-q", "-r", "-F", str(lab.ssh_config), str(src), f"{node}:{target}"]

            record("first/mento_fab", timed(lambda t=mt: mento(t)))
            record("first/rsync", timed(lambda f=rsync: fan_out(lab, f)))
            record("first/scp", timed(lambda f=scp: fan_out(lab, f)))
            changed = src / "pkg07" / "mod0007.dat"
            changed.write_bytes(random.Random(100 + r).randbytes(changed.stat().st_size))
            record("one-file/mento_fab", timed(lambda t=mt: mento(t)))
            record("one-file/rsync", timed(lambda f=rsync: fan_out(lab, f)))
            record("no-op/mento_fab", timed(lambda t=mt: mento(t)))
            record("no-op/rsync", timed(lambda f=rsync: fan_out(lab, f)))
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
                flush=True,
            )

        print()
        print(
            f"{len(lab.nodes)} nodes, {FILES} files, {TOTAL / 1e6:.0f} MB, "
            f"median of {args.rounds} rounds"
        )
        print("| case | mento_fab | rsync -a (parallel) | scp -r (parallel) | mento_fab / rsync |")
        print("|---|---|---|---|---|")
        for case in ("first", "one-file", "no-op"):
            m = statistics.median(times[f"{case}/mento_fab"])
            rs = statistics.median(times[f"{case}/rsync"])
            sc = times.get(f"{case}/scp")
            scp_text = f"{statistics.median(sc):.3f} s" if sc else "-"
            print(f"| {case} | {m:.3f} s | {rs:.3f} s | {scp_text} | {m / rs:.2f}x |")
    finally:
        lab.down()


if __name__ == "__main__":
    main()
