"""The invoke application behind ``mento-fab``: the Program, its config and its tasks.

Imported only when a command runs in this process (the direct path, or inside the
connection agent); :mod:`mento_fab.cli` itself stays cheap so that the thin client
can start without invoke, fabric or paramiko::

    from mento_fab.cli.app import make_program
    make_program().run(["mento-fab", "info"], exit=False)
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from invoke import Argument, Collection, Config, Exit, Program
from invoke.exceptions import ParseError

from mento_fab import __version__
from mento_fab.cli import exits, namespace, task_modules
from mento_fab.cli.options import configure_logging
from mento_fab.defaults import BAD_INPUT_EXIT

__all__ = [
    "MentoConfig", "MentoProgram", "make_program", "program", "run_direct", "run_for_status",
]  # fmt: skip


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
    for name in task_modules():
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


def _named(collection: Collection, argv: list[str]) -> Collection:
    """The tasks of ``collection`` that ``argv`` names (by name, alias or underscored name).

    invoke's parser deep-copies the parser context of every task in the collection
    for each parse: a few milliseconds per call for tasks the command line never
    names. Only a named task can be switched to, so parsing against these alone
    gives the same result, errors included.
    """
    words = {token for token in argv if not token.startswith("-")}
    named = Collection()
    for primary, aliases in collection.task_names.items():
        if words & {primary, primary.replace("-", "_"), *aliases}:
            named.add_task(collection[primary])
    return named


def _parse_tasks(program: Program) -> None:
    from mento_fab.cli.argv import optional_positionals

    program.core.unparsed = optional_positionals(program.core.unparsed, program.collection)
    everything = program.collection
    asked = program.args.help.value  # `--help TASK` looks TASK up in the parser's contexts
    words = [*program.core.unparsed, *([asked] if isinstance(asked, str) else [])]
    program.collection = _named(everything, words)
    try:
        Program.parse_tasks(program)
    finally:
        program.collection = everything


class MentoProgram(Program):
    parse_core = _bad_usage(Program.parse_core)
    parse_tasks = _bad_usage(_parse_tasks)
    parse_cleanup = _bad_usage(Program.parse_cleanup)

    def core_args(self) -> list[Argument]:
        # Read by the thin client before invoke runs (mento_fab.cli.client);
        # declared here so that --help lists it and the parser accepts it.
        no_agent = Argument(
            names=("no-agent",),
            kind=bool,
            default=False,
            help="Run in this process, without the connection agent (env MENTO_AGENT=0).",
        )
        return [*super().core_args(), no_agent]

    def execute(self) -> None:
        # invoke's own --debug also asks for tracebacks of unexpected errors.
        exits.set_debug(bool(self.args.debug.value))
        # invoke keeps what follows `--` to itself: `ssh cn01 -- ls -l` reads it here.
        self.config.mento_fab_remainder = self.core.remainder
        super().execute()


def make_program() -> MentoProgram:
    """A new Program over a new namespace (the agent makes one per request)."""
    return MentoProgram(
        namespace=namespace(),
        name="mento-fab",
        binary="mento-fab",
        version=__version__,
        config_class=MentoConfig,
    )


program = make_program()


def run_for_status(argv: list[str]) -> int:
    """Run the command in this thread and return the exit status the interpreter would.

    The connection agent's way to run a call: what invoke hands to ``sys.exit`` is
    turned into a status here (a message is printed, as the interpreter prints it),
    an unexpected exception is printed with its traceback and gives 1.
    """
    logging.getLogger("mento_fab").setLevel(os.environ.get("MENTO_LOG_LEVEL", "WARNING").upper())
    try:
        make_program().run(argv)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code & 0xFF
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a task: invoke's own steps
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def run_direct(argv: list[str] | None = None) -> None:
    """Run the command in this process (exits through ``sys.exit`` as invoke does)."""
    configure_logging()
    program.run(argv)
