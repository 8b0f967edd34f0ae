"""Slurm in the beamtime's reservation, driven over the nodes' SSH connections.

- :mod:`~mento_fab.slurm.parse`: what ``scontrol``/``squeue``/``sbatch``/``scancel``
  print, read back into :class:`JobInfo` and :class:`Reservation` (pure);
- :mod:`~mento_fab.slurm.client`: :class:`Slurm`, the commands on a submit node;
- :mod:`~mento_fab.slurm.job`: :class:`Job`, one batch job followed to its end;
- :mod:`~mento_fab.slurm.fanout`: :func:`run_via_slurm`, one ``srun`` instead of
  SSH per node, reporting the same :class:`~mento_fab.results.RunReport`.

Example (a lab started with ``inv lab.up --slurm`` and its exports)::

    from mento_fab.slurm import Slurm

    with Slurm.open() as slurm:
        print(slurm.reservation().state, [j.id for j in slurm.jobs()])
"""

from __future__ import annotations

from mento_fab.errors import (
    NoSubmitNode,
    ReservationError,
    SlurmError,
    SlurmUnavailable,
    UnknownJob,
)
from mento_fab.slurm.client import Slurm, default_job_name, pick_submit_node, sbatch_argv
from mento_fab.slurm.fanout import LabelSplitter, refusal, run_via_slurm, srun
from mento_fab.slurm.job import Job
from mento_fab.slurm.parse import (
    TERMINAL_STATES,
    JobInfo,
    Reservation,
    check_job_id,
    parse_job,
    parse_job_id,
    parse_job_status,
    parse_key_values,
    parse_reservation,
    parse_scancel,
    parse_squeue,
    squeue_format,
    status_format,
)

__all__ = [
    "TERMINAL_STATES",
    "Job",
    "JobInfo",
    "LabelSplitter",
    "NoSubmitNode",
    "Reservation",
    "ReservationError",
    "Slurm",
    "SlurmError",
    "SlurmUnavailable",
    "UnknownJob",
    "check_job_id",
    "default_job_name",
    "parse_job",
    "parse_job_id",
    "parse_job_status",
    "parse_key_values",
    "parse_reservation",
    "parse_scancel",
    "parse_squeue",
    "pick_submit_node",
    "refusal",
    "run_via_slurm",
    "sbatch_argv",
    "squeue_format",
    "srun",
    "status_format",
]
