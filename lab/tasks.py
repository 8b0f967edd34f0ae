"""Invoke tasks to bring the lab up and down from a shell (``inv lab.up --nodes 8``).

The lab outlives the ``inv`` process: its state lives in ``<workdir>/lab.json``.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path

from invoke import Collection, Context, task

from lab.cluster import DEFAULT_WORKDIR, Lab, LabError


def _fail(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr)
    sys.exit(2)


@task(
    help={
        "nodes": "number of nodes, 1 to 64 (default 4)",
        "slurm": "also start munged, slurmctld and one slurmd per node",
        "workdir": f"work dir (default {DEFAULT_WORKDIR})",
        "verbose": "log what the lab does",
    }
)
def up(
    c: Context,
    nodes: int = 4,
    slurm: bool = False,
    workdir: str = str(DEFAULT_WORKDIR),
    verbose: bool = False,
) -> None:
    """Bring the lab up (replacing a lab already running there)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    t0 = time.monotonic()
    try:
        cluster = Lab(Path(workdir), nodes, slurm=slurm).up()
    except (LabError, ValueError) as exc:
        _fail(str(exc))
    print(f"lab up in {time.monotonic() - t0:.1f}s: {' '.join(cluster.nodes)}")
    print(f"metadata file: {cluster.metadata_file}")
    print(f"root dir:      {cluster.root_dir}")
    if cluster.slurm:
        print(f"slurm:         partition {cluster.partition}, reservation {cluster.reservation}")
    print(f"try:           ssh -F {cluster.ssh_config} cn01 hostname")
    print()
    print(" ".join(["export", *(f"{k}={shlex.quote(v)}" for k, v in cluster.env().items())]))


@task(help={"workdir": f"work dir (default {DEFAULT_WORKDIR})"})
def down(c: Context, workdir: str = str(DEFAULT_WORKDIR)) -> None:
    """Tear the lab down (also the leftovers of a crashed run); fine when nothing is up."""
    try:
        cluster = Lab.from_state(Path(workdir))
    except LabError:
        cluster = Lab(Path(workdir))
    try:
        cluster.down()
    except LabError as exc:
        _fail(str(exc))
    print("lab down")


@task(help={"workdir": f"work dir (default {DEFAULT_WORKDIR})", "json": "print JSON"})
def status(c: Context, workdir: str = str(DEFAULT_WORKDIR), json_: bool = False) -> None:
    """Show the lab's nodes and whether each answers SSH."""
    try:
        cluster = Lab.from_state(Path(workdir))
    except LabError as exc:
        _fail(str(exc))
    info = cluster.status()
    if json_:
        print(json.dumps({"workdir": str(cluster.workdir), "slurm": cluster.slurm, "nodes": info}))
        return
    for node, st in info.items():
        print(f"{node}  {st['address']:<14} ssh {'up' if st['ssh'] else 'DOWN'}")
    up_count = sum(1 for st in info.values() if st["ssh"])
    print(f"{up_count}/{len(info)} nodes answer ssh; slurm {'on' if cluster.slurm else 'off'}")
    print(" ".join(["export", *(f"{k}={shlex.quote(v)}" for k, v in cluster.env().items())]))


ns = Collection("lab")
ns.add_task(up)
ns.add_task(down)
ns.add_task(status)
