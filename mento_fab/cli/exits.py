"""The one table from exception to exit status, and the wrapper every task runs under.

========================================  ======  ==========================================
raised                                    status  meaning
========================================  ======  ==========================================
``KeyboardInterrupt``                     130     interrupted (as a shell reports SIGINT)
``BrokenPipeError``                       141     ``mento-fab … | head`` stopped reading
:class:`~mento_fab.errors.BadInput`       2       bad input: file, option, node set
:class:`~mento_fab.errors.NodeError`      255     a node failed (as ssh)
:class:`~mento_fab.errors.SlurmUnavailable` 255   Slurm could not be reached
:class:`~mento_fab.errors.MentoError`     1       an operation failed for another reason
anything else                             1       a bug: one line; the traceback with --debug
========================================  ======  ==========================================

A per-node failure inside a run is never an exception: it is a ``NodeResult``, and
the task exits by the exit rule (:mod:`mento_fab.results`).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from invoke import Exit

from mento_fab.defaults import BAD_INPUT_EXIT, UNREACHABLE_EXIT
from mento_fab.errors import BadInput, MentoError, NodeError, SlurmUnavailable
from mento_fab.names import printable

__all__ = ["EXIT_STATUS", "debug_enabled", "exit_status_of", "friendly", "set_debug"]

F = TypeVar("F", bound=Callable[..., Any])

#: First match wins.
EXIT_STATUS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (KeyboardInterrupt, 130),
    (BrokenPipeError, 141),
    (BadInput, BAD_INPUT_EXIT),
    (NodeError, UNREACHABLE_EXIT),
    (SlurmUnavailable, UNREACHABLE_EXIT),
    (MentoError, 1),
    (BaseException, 1),
)

_debug = False


def set_debug(value: bool) -> None:
    global _debug
    _debug = bool(value)


def debug_enabled() -> bool:
    return _debug or os.environ.get("MENTO_DEBUG", "") not in ("", "0")


def exit_status_of(exc: BaseException) -> int:
    for kinds, status in EXIT_STATUS:
        if isinstance(exc, kinds):
            return status
    return 1  # pragma: no cover - BaseException matches everything


def message_of(exc: BaseException) -> str:
    """The one line shown for an exception, control characters escaped.

    Messages quote file names and remote text (a metadata file named with a terminal
    escape, Slurm's stderr): nothing of it reaches the terminal raw.
    """
    return printable(_message(exc))


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, MentoError):
        return str(exc) or type(exc).__name__
    # Not one of ours: a bug, or a failure nobody turned into a message yet.
    text = str(exc).splitlines()[0] if str(exc) else ""
    hint = "" if debug_enabled() else " (run with --debug for the traceback)"
    return f"internal error: {type(exc).__name__}{': ' + text if text else ''}{hint}"


def _group_failure(exc: BaseException) -> str | None:
    """fabric's GroupException (a library user's group call) as one line per node."""
    result = getattr(exc, "result", None)
    if type(exc).__name__ != "GroupException" or not hasattr(result, "items"):
        return None
    return "; ".join(
        sorted(
            f"{getattr(conn, 'original_host', conn.host)}: {type(value).__name__}: {value}"
            for conn, value in result.items()
            if isinstance(value, BaseException)
        )
    )


def friendly(func: F) -> F:
    """Run a task: any exception becomes one line on stderr and the table's exit status."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exit:
            raise
        except BrokenPipeError:  # stop quietly, like other tools
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise Exit(code=141) from None
        except BaseException as exc:
            if isinstance(exc, SystemExit):
                raise
            group_failure = _group_failure(exc)
            if group_failure:
                raise Exit(f"mento-fab: {group_failure}", code=UNREACHABLE_EXIT) from None
            status = exit_status_of(exc)
            if status == 1 and not isinstance(exc, MentoError) and debug_enabled():
                traceback.print_exc()
            raise Exit(f"mento-fab: {message_of(exc)}", code=status) from None

    return wrapper  # type: ignore[return-value]
