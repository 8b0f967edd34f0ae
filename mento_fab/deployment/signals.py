"""Holding Ctrl-C, SIGTERM and SIGHUP back while nodes switch, so none is left half-way.

Once the first node's ``current`` moves, stopping would leave nodes on different
releases (and ``concurrent.futures`` cancels queued work on ``KeyboardInterrupt``).
Inside :class:`SignalGuard` these signals are only recorded; the deploy finishes
switching (or switching back) every node and then stops, raising
:class:`~mento_fab.errors.DeployInterrupted` with the report. A second Ctrl-C
aborts at once (``KeyboardInterrupt``); the caller then reports where each node is.
Any later signal is only recorded: the report and the release of the locks must
not be cut short by a third Ctrl-C, so the caller keeps the guard until both are done.

Signal handlers can only be set from the main thread: elsewhere the guard holds
nothing back (the host program owns its signals then).

>>> with SignalGuard() as guard:
...     pass
>>> guard.signum is None
True
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["DEFERRED", "SignalGuard"]

log = logging.getLogger(__name__)

#: The signals held back while nodes switch.
DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    """Record :data:`DEFERRED` signals instead of acting on them; the second SIGINT
    (and only that one) aborts."""

    def __init__(self) -> None:
        self.received: list[int] = []
        #: Whether a second SIGINT aborts; cleared once the switch is over, when
        #: stopping early would only cut the report and the lock's release short.
        self.abortable = True
        self._old: dict[int, Any] = {}

    @property
    def signum(self) -> int | None:
        """The first signal received, if any."""
        return self.received[0] if self.received else None

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: signals are not held back")
            return self
        for sig in DEFERRED:
            with contextlib.suppress(ValueError, OSError):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        what = "finishing the switch on every node first"
        if self.received.count(signal.SIGINT) > 1:
            what = "reporting where every node is and giving the locks back first"
        log.warning("%s received: %s", signal.Signals(signum).name, what)
        if self.abortable and signum == signal.SIGINT and self.received.count(signum) == 2:
            raise KeyboardInterrupt
