"""One trigger call: its method, its argument list as the original flattens it, its handle.

Kept apart from :mod:`mento_fab.trigger` (the connections, the queue and the calls)
because scripts and tests use these pieces on their own.

>>> split_arg_list(["python3", ["process.py", "scan 42"]])
['python3', 'process.py', 'scan 42']
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, auto, unique
from typing import TYPE_CHECKING, Any

from mento_fab.errors import BadTrigger, TriggerError, TriggerTimeout

if TYPE_CHECKING:
    from mento_fab.results import NodeResult
    from mento_fab.slurm import Job

__all__ = ["TriggerHandle", "TriggerMethod", "split_arg_list"]


@unique
class TriggerMethod(IntEnum):
    """Supported triggering methods (values as in the original)."""

    SLURM_REST_API = auto()
    REMOTE_COMMAND = auto()
    REMOTE_SBATCH_SCRIPT = auto()
    LOCAL_BASH_SCRIPT = auto()


@dataclass
class TriggerHandle:
    """The outcome of one trigger; filled in when the call ends (at once unless background).

    ``exit_status`` is the command's (or sbatch's) exit status, None when it never
    ran to an end (then ``error`` says why); ``job_id`` is set for sbatch triggers.
    """

    method: TriggerMethod
    command: str
    destination: str | None = None
    background: bool = False
    exit_status: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    job_id: str | None = None
    job: Job | None = field(default=None, repr=False)
    seconds: float = 0.0
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def ok(self) -> bool:
        return self.done() and self.error is None and self.exit_status == 0

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> TriggerHandle:
        """Block until the call has ended; TriggerTimeout (a TimeoutError) if it has not
        after ``timeout``."""
        if not self._done.wait(timeout):
            raise TriggerTimeout(f"trigger still running after {timeout:g} s: {self.command}")
        return self

    def check(self) -> TriggerHandle:
        """Raise TriggerError unless the call succeeded (waits for it first)."""
        self.wait()
        if not self.ok:
            raise TriggerError(self.describe())
        return self

    def describe(self) -> str:
        """One line: what ran where and how it ended."""
        where = f" on {self.destination}" if self.destination else ""
        if self.error is not None:
            outcome = self.error
        elif self.job_id is not None:
            outcome = f"job {self.job_id}"
        else:
            outcome = f"exit {self.exit_status}"
            tail = self.stderr.strip().splitlines()
            if self.exit_status and tail:
                outcome += f": {tail[-1]}"
        return f"{self.method.name} {self.command}{where}: {outcome}"

    def _fill(self, result: NodeResult) -> None:
        self.exit_status = result.exit
        self.stdout, self.stderr = result.stdout, result.stderr
        self.error = result.error
        self.seconds = result.seconds


def split_arg_list(arg_list: Sequence[Any] | None) -> list[str]:
    """The original's four shapes of ``arg_list`` as one argv.

    ``["cmd"]``, ``["cmd a1 a2"]`` (split with shlex), ``["cmd", [a1, a2]]``,
    ``["cmd", a1, a2]``.
    """
    if not arg_list:
        raise BadTrigger("Command (or executable script) not provided")
    if isinstance(arg_list, str):
        arg_list = [arg_list]
    first = str(arg_list[0])
    if len(arg_list) == 1:
        argv = shlex.split(first)
    elif len(arg_list) == 2 and isinstance(arg_list[1], list | tuple):
        argv = [first, *map(str, arg_list[1])]
    else:
        argv = [first, *map(str, arg_list[1:])]
    if not argv or not argv[0]:
        raise BadTrigger("Command (or executable script) not provided")
    return argv

