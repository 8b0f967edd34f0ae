"""The ``mento-fab`` command: an invoke Program over the same tasks as ``inv``.

The command line is the only part of mento_fab that prints. Each module holds the
tasks of one area (``core``: info, check, run-on-nodes; ``deploy``; ``slurm``;
``agent``); options shared by tasks are declared once in :mod:`.options`, and
exceptions become exit statuses in one table, :mod:`.exits`.

Importing this package is cheap: :func:`main` first runs the thin client
(:mod:`mento_fab.cli.client`, standard library only), which hands the command
to the connection agent when one applies; the invoke Program (:mod:`.app`) is
imported only to run a command in this process. ``program`` and ``namespace``
are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["main", "namespace", "program", "task_modules"]

#: The task modules, in ``--list`` order; :mod:`.app` builds the namespace from them.
_TASK_MODULES = ("core", "slurm", "deploy", "access", "workers", "agent")


def task_modules() -> tuple[str, ...]:
    """The names of the task modules under ``mento_fab.cli``."""
    return _TASK_MODULES


def namespace() -> Any:
    """A fresh invoke Collection of every mento_fab task (callers may add their own)."""
    from invoke import Collection

    ns = Collection()
    for name in _TASK_MODULES:
        module = importlib.import_module(f"mento_fab.cli.{name}")
        for attr in getattr(module, "__all__", ()):
            ns.add_task(getattr(module, attr))
    return ns


def main() -> None:
    """The ``mento-fab`` entry point: through the connection agent, or in this process."""
    from mento_fab.cli.client import main as client_main

    client_main()


def __getattr__(name: str) -> Any:
    if name in ("program", "MentoProgram", "MentoConfig", "make_program"):
        return getattr(importlib.import_module("mento_fab.cli.app"), name)
    raise AttributeError(f"module 'mento_fab.cli' has no attribute {name!r}")
