"""The Slurm jobs of ``--via slurm`` workers, once their tasks were told to stop.

Kept apart from :mod:`.slurm` (which starts such workers and uses :mod:`.ops`),
so that ``ops.stop`` can clean up the queue without an import cycle.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import fabric

from mento_fab.errors import SlurmError
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.slurm import Slurm

__all__ = ["cancel_jobs"]


def cancel_jobs(
    conns: Iterable[fabric.Connection], metadata: BeamtimeMetadata, jobs: list[str]
) -> list[str]:
    """``scancel`` the worker jobs still in the queue once their tasks were stopped.

    The tasks end when their supervisors stop, so the job usually ends by itself;
    waits a few seconds for that first. Returns notes for the report.
    """
    conn = next((c for c in conns if c.is_connected), None)
    if conn is None:
        return [f"slurm jobs {', '.join(jobs)} not checked: no node reachable"]
    slurm = Slurm(conn, metadata)
    deadline = time.monotonic() + 5.0
    try:
        while True:
            queued = {j.id: j.state for j in slurm.jobs() if j.id in jobs}
            if not queued:
                return [f"slurm job {', '.join(jobs)} ended"]
            if "PENDING" in queued.values() or time.monotonic() > deadline:
                break  # a pending job has no task that could end it
            time.sleep(0.25)
        slurm.cancel(sorted(queued))
    except SlurmError as exc:
        return [f"slurm job {', '.join(jobs)}: {exc}"]
    return [f"slurm job {', '.join(queued)} cancelled"]
