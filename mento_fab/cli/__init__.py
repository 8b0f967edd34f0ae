"""The ``mento-fab`` command: an invoke Program over the same tasks as ``inv``.

The command line is the only part of mento_fab that prints. Each module holds the
tasks of one area (``core``: info, check, run-on-nodes; ``deploy``; ``slurm``);
options shared by tasks are declared once in :mod:`.options`, and exceptions become
exit statuses in one table, :mod:`.exits`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from invoke import Collection, Config, Exit, Program
from invoke.exceptions import ParseError

from mento_fab.cli import exits
from mento_fab.cli.options import configure_logging
from mento_fab.defaults import BAD_INPUT_EXIT

__all__ = ["main", "namespace", "program"]

_TASK_MODULES = ("core", "slurm", "deploy", "access", "workers")


def namespace() -> Collection:
    """A fresh collection of every mento_fab task (callers may add their own)."""
    import importlib

    ns = Collection()
    for name in _TASK_MODULES:
        module = importlib.import_module(f"mento_fab.cli.{name}")
        for attr in getattr(module, "__all__", ()):
            ns.add_task(getattr(module, attr))
    return ns


class MentoConfig(Config):
    """Config files: ``/etc/mento_fab.yaml``, ``~/.mento_fab.yaml``, or ``-f FILE``."""

    prefix = "mento_fab"
    env_prefix = "MENTO_FAB"


def _usage_hint(exc: ParseError) -> str | None:
    """A task module's ``USAGE[task]``, for a word invoke did not expect after that task."""
    task = getattr(getattr(exc, "context", None), "name", None)
    text = str(exc)
    if not task or "No idea what" not in text:
        return None
    # Only a stray word (a positional SOURCE) gets the hint; a mistyped flag does not.
    word = text.partition("No idea what '")[2].partition("'")[0]
    if word.startswith("-"):
        return None
    for name in _TASK_MODULES:
        hint = getattr(sys.modules.get(f"mento_fab.cli.{name}"), "USAGE", {}).get(task)
        if hint:
            return str(hint)
    return None


def _bad_usage(step: Callable[..., Any]) -> Callable[..., Any]:
    """A command-line mistake is bad input: exit status 2 with one line, as for the tasks."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except ParseError as exc:
            message = _usage_hint(exc) or str(exc)
            raise Exit(f"mento-fab: {message}", code=BAD_INPUT_EXIT) from None

    return wrapper


def _parse_tasks(program: Program) -> None:
    from mento_fab.cli.argv import optional_positionals

    program.core.unparsed = optional_positionals(program.core.unparsed, program.collection)
    Program.parse_tasks(program)


class MentoProgram(Program):
    parse_core = _bad_usage(Program.parse_core)
    parse_tasks = _bad_usage(_parse_tasks)
    parse_cleanup = _bad_usage(Program.parse_cleanup)

    def execute(self) -> None:
        # invoke's own --debug also asks for tracebacks of unexpected errors.
        exits.set_debug(bool(self.args.debug.value))
        # invoke keeps what follows `--` to itself: `ssh cn01 -- ls -l` reads it here.
        self.config.mento_fab_remainder = self.core.remainder
        super().execute()


def _program() -> MentoProgram:
    from mento_fab import __version__

    return MentoProgram(
        namespace=namespace(),
        name="mento-fab",
        binary="mento-fab",
        version=__version__,
        config_class=MentoConfig,
    )


program = _program()


def main() -> None:
    configure_logging()
    program.run()
