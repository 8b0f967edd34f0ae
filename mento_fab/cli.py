"""The ``mento-fab`` command: an invoke Program over the same tasks as ``inv``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from invoke import Config, Exit, Program
from invoke.exceptions import ParseError

from mento_fab import __version__
from mento_fab.tasks import namespace
from mento_fab.tasks._common import BAD_INPUT, configure_logging


class MentoConfig(Config):
    """Config files: ``/etc/mento_fab.yaml``, ``~/.mento_fab.yaml``, or ``-f FILE``."""

    prefix = "mento_fab"
    env_prefix = "MENTO_FAB"


def _bad_usage(step: Callable[..., Any]) -> Callable[..., Any]:
    """A command-line mistake is bad input: exit status 2 with one line, as for the tasks."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except ParseError as exc:
            raise Exit(f"mento-fab: {exc}", code=BAD_INPUT) from None

    return wrapper


class MentoProgram(Program):
    parse_core = _bad_usage(Program.parse_core)
    parse_tasks = _bad_usage(Program.parse_tasks)
    parse_cleanup = _bad_usage(Program.parse_cleanup)


program = MentoProgram(
    namespace=namespace(),
    name="mento-fab",
    binary="mento-fab",
    version=__version__,
    config_class=MentoConfig,
)


def main() -> None:
    configure_logging()
    program.run()
