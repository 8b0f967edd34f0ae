"""Workers: long-running programs on every reserved node, supervised there.

``start`` runs a command as the worker NAME on each selected node, detached from
the client (it survives the client's exit, a lost connection and an sshd
restart), with restarts, a rotated log and a state record on the node; ``ps``,
``logs`` and ``stop`` read and act on those records. ``--via slurm`` makes the
same worker one Slurm job in the reservation. :mod:`.top` samples the nodes for
``mento-fab top``. Nothing is installed on the nodes and nothing here prints.

>>> from mento_fab import nodes_group                                  # doctest: +SKIP
>>> from mento_fab.workers import WorkerSpec, start, ps, logs, stop
>>> group = nodes_group()                                              # doctest: +SKIP
>>> start(group, WorkerSpec("consumer", "python3 consume.py", per_node=2))  # doctest: +SKIP
>>> ps(group)                              # a WorkersReport; a table in Jupyter  # doctest: +SKIP
>>> stop(group, "consumer")                                            # doctest: +SKIP
"""

from __future__ import annotations

from mento_fab.workers.ops import follow, logs, ps, start, stop
from mento_fab.workers.report import WorkersReport
from mento_fab.workers.spec import STATES, WorkerRow, WorkerSpec, check_name

__all__ = [
    "STATES",
    "WorkerRow",
    "WorkerSpec",
    "WorkersReport",
    "check_name",
    "follow",
    "logs",
    "ps",
    "start",
    "start_via_slurm",
    "stop",
]


def __getattr__(name: str) -> object:
    if name == "start_via_slurm":  # imports the Slurm client only when asked for
        from mento_fab.workers.slurm import start_via_slurm

        return start_via_slurm
    raise AttributeError(f"module 'mento_fab.workers' has no attribute {name!r}")
