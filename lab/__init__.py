"""The mento lab: a real SSH (and Slurm) cluster of namespaces on one machine.

For tests, the demo and benchmarks only; the ``mento_fab`` library never imports it.
"""

from lab.cluster import DEFAULT_WORKDIR, MAX_NODES, Lab, LabError

__all__ = ["DEFAULT_WORKDIR", "MAX_NODES", "Lab", "LabError"]
