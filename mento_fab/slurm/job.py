"""A handle on one batch job: its state, its end, its exit code.

Without ``sacct`` a job's exit code is known only while slurmctld remembers the
job (``MinJobAge``, 300 s by default). :meth:`Job.wait` polls far more often than
that and a :class:`Job` keeps the last state it saw, so a finished job's exit
code is not lost once seen; a job forgotten before anyone looked ends as state
``UNKNOWN``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mento_fab.errors import JobTimeout, SlurmError
from mento_fab.slurm.parse import JobInfo, check_job_id

if TYPE_CHECKING:
    from mento_fab.slurm.client import Slurm

__all__ = ["Job"]

log = logging.getLogger("mento_fab.slurm")


class Job:
    """A submitted batch job. Keeps the last state it saw, so its exit code outlives
    slurmctld's memory (``MinJobAge``) once observed."""

    def __init__(self, job_id: str | int, slurm: Slurm, *, name: str = "") -> None:
        self.id = check_job_id(job_id)
        self.slurm = slurm
        self.name = name
        self.last: JobInfo | None = None
        self._name_asked = bool(name)

    def __repr__(self) -> str:
        state = self.last.state if self.last else "?"
        return f"Job({self.id!r}, state={state})"

    def info(self) -> JobInfo:
        """Ask slurmctld now; a forgotten job keeps its last seen end, else is UNKNOWN.

        A job is followed by its id alone (:meth:`Slurm.job_status`), so its name,
        free text that may mimic Slurm's fields or hold a newline, cannot matter.
        A handle made from a bare id tries once to learn the name; a name it cannot
        read (one that mimics scontrol's fields) stays empty instead of failing.
        """
        if self.last is not None and self.last.finished:
            return self.last
        if not self.name and not self._name_asked:
            self._name_asked = True
            try:
                shown = self.slurm.show_job(self.id)
            except SlurmError as exc:  # best effort: the state below does not need it
                log.debug("job %s: name not read: %s", self.id, exc)
            else:
                self.name = shown.name if shown is not None else ""
        seen = self.slurm.job_status(self.id)
        if seen is not None:
            seen.name = self.name
        if seen is None:
            seen = JobInfo(id=self.id, name=self.name, state="UNKNOWN")
            if self.last is not None:
                seen.nodes = self.last.nodes
                seen.elapsed = self.last.elapsed
        self.last = seen
        return seen

    def state(self) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or UNKNOWN."""
        return self.info().state

    @property
    def exit_code(self) -> int | None:
        return self.last.exit_code if self.last else None

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 0.25,
        max_poll: float = 2.0,
        on_state: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """Follow the job to its end; :class:`JobTimeout` (a ``TimeoutError``) after ``timeout`` s.

        Polling starts at ``poll`` and backs off to ``max_poll`` seconds, well
        under any sensible MinJobAge, so the exit code is read before it is lost.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        previous = None
        while True:
            info = self.info()
            if on_state is not None and info.state != previous:
                on_state(info)
            previous = info.state
            if info.finished:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.id} still {info.state} after {timeout:g} s")
            pause = poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            poll = min(max_poll, poll * 1.5)

    def cancel(self) -> None:
        self.slurm.cancel([self.id])
