"""The invoke tasks, one collection for both ``inv`` (via the root tasks.py) and ``mento-fab``.

Tasks parse options, call the library and render; no logic that a library
user would also need lives here.
"""

from __future__ import annotations

from invoke import Collection

from mento_fab.tasks import core, deploy, slurm

__all__ = ["namespace"]


def namespace() -> Collection:
    """A fresh collection of every mento_fab task (callers may add their own)."""
    ns = Collection()
    for module in (core, slurm, deploy):
        for name in dir(module):
            obj = getattr(module, name)
            if hasattr(obj, "body") and getattr(obj, "__module__", None) == module.__name__:
                ns.add_task(obj)
    return ns
