"""One deploy or rollback per target at a time: the lock, its heartbeat, taking over a dead one.

The lock is a directory next to ``current`` (``mkdir`` is atomic, also on a shared
home) holding its owner: run id, client host, pid and start time. While a run
holds it, a heartbeat refreshes the owner file every :data:`HEARTBEAT` seconds.
A second run waits (up to a timeout) and then fails naming the holder; it takes a
lock over when its holder is dead: a process of this host that no longer exists,
or, from another host, a heartbeat older than :data:`STALE_AFTER`. The take-over
removes the lock only if the dead run still holds it, under a mutex, so two
waiting runs never both win.

Nodes are locked all or none: a run that gets some nodes but not others gives
its locks back before waiting, so two runs never deadlock each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import fabric

from mento_fab.connection import connection_node
from mento_fab.deployment import phases
from mento_fab.deployment import remote as sh
from mento_fab.deployment.report import Failure
from mento_fab.errors import DeployLocked
from mento_fab.runner import execute, map_nodes

__all__ = ["HEARTBEAT", "STALE_AFTER", "Heartbeat", "LockOwner", "acquire", "release"]

log = logging.getLogger(__name__)

#: Seconds between heartbeats of a held lock.
HEARTBEAT = 10.0
#: Seconds without a heartbeat after which a lock from another host counts as dead.
STALE_AFTER = 60.0
#: A lock without an owner record younger than this is being created right now.
CREATING = 5
#: Runs of this process that may hold locks (a lock of another, finished run of
#: this same process, left on a node that was unreachable then, is dead).
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def _process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of a process of this host, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _this_system() -> str:
    """Boot id and pid namespace: pids are comparable only within the same ones."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a target's lock; ``proc`` tells a live process from a reused pid."""

    run: str
    host: str
    pid: int
    started: str
    proc: str = ""

    @classmethod
    def mine(cls) -> LockOwner:
        pid = os.getpid()
        return cls(
            run=secrets.token_hex(8),
            host=socket.gethostname(),
            pid=pid,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            proc=f"{_this_system()}:{_process_start(pid) or ''}",
        )

    @classmethod
    def from_record(cls, record: dict[str, str]) -> LockOwner | None:
        try:
            return cls(
                record["run"],
                record.get("host", "?"),
                int(record.get("pid", "0")),
                record.get("started", "?"),
                record.get("proc", ""),
            )
        except (KeyError, ValueError):
            return None

    def record(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    def dead(self, age: float) -> bool:
        """True when this owner can no longer be running (``age``: seconds since its heartbeat)."""
        system, _, start = self.proc.rpartition(":")
        if self.host == socket.gethostname() and system and system == _this_system():
            if self.pid == os.getpid():
                with _ACTIVE_LOCK:
                    return self.run not in _ACTIVE
            return _process_start(self.pid) != start
        return age > STALE_AFTER


@dataclass
class _Held:
    node: str
    age: int
    owner: LockOwner | None


def _try(
    reps: Sequence[fabric.Connection],
    remote: str,
    owner: LockOwner,
    takeover: dict[str, str],
    fanout: int,
    nonces: Sequence[str],
    tidy: bool,
) -> dict[str, str | BaseException]:
    """One attempt on every node: the lock command's output, or why it failed."""

    def one(conn: fabric.Connection) -> str:
        node = connection_node(conn)
        command = sh.lock_command(remote, owner.record(), takeover.get(node), tidy, nonces)
        return phases.run_step(conn, command, "locking the target", phases.COMMAND_TIMEOUT).stdout

    return map_nodes(reps, one, fanout=fanout)


def acquire(
    reps: Sequence[fabric.Connection],
    remote: str,
    label: str,
    owner: LockOwner,
    timeout: float,
    fanout: int,
    on_wait: Callable[[str, str], None] | None = None,
    nonces: Sequence[str] = (),
    *,
    tidy: bool = True,
) -> dict[str, str | Failure]:
    """Lock ``remote`` on every node of ``reps``, waiting up to ``timeout`` seconds.

    ``nonces`` (this run's nonce files) are removed on the way; ``tidy`` removes dead
    runs' leftovers and never-live releases once the lock is taken (a deploy does).
    Returns node -> the lock command's output (a probe taken under the lock) or the
    node's :class:`Failure` (then nothing is locked any more). Raises
    :class:`DeployLocked` naming the holder when the wait runs out.
    """
    with _ACTIVE_LOCK:
        _ACTIVE.add(owner.run)
    deadline = time.monotonic() + timeout
    takeover: dict[str, str] = {}
    delay = 0.2
    while True:
        outcome = _try(reps, remote, owner, takeover, fanout, nonces, tidy)
        texts = {n: v for n, v in outcome.items() if isinstance(v, str)}
        failures = {n: phases.failure_of(v) for n, v in outcome.items() if not isinstance(v, str)}
        held: list[_Held] = []
        for node, text in texts.items():
            ours, age, record = sh.parse_lock(text)
            if not ours:
                held.append(_Held(node, age, LockOwner.from_record(record) if record else None))
        if failures:
            release([c for c in reps if connection_node(c) in texts], remote, owner.run, (), fanout)
            return {**texts, **failures}
        if not held:
            return dict(texts)
        if all(h.owner is None and h.age < CREATING for h in held):
            time.sleep(0.05)  # a lock being created (maybe ours, from another node): look again
            continue
        release(
            [c for c in reps if connection_node(c) not in {h.node for h in held}],
            remote,
            owner.run,
            (),
            fanout,
        )
        takeover = {}
        for h in held:
            if h.owner is None and h.age > STALE_AFTER:
                takeover[h.node] = ""
            elif h.owner is not None and h.owner.dead(h.age):
                log.warning(
                    "%s: taking over the lock of a dead deploy (%s)", h.node, h.owner.describe()
                )
                takeover[h.node] = h.owner.run
        if takeover:
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            first = held[0]
            who = first.owner.describe() if first.owner else "a deploy that is starting"
            raise DeployLocked(
                f"{label} on {first.node} is locked by another deploy ({who}); "
                f"gave up after {timeout:g} s"
            )
        if on_wait is not None:
            for h in held:
                on_wait(h.node, "waiting for the lock")
        time.sleep(min(left, delay * (0.5 + random.random())))
        delay = min(delay * 2, 2.0)


def release(
    reps: Sequence[fabric.Connection],
    remote: str,
    run: str,
    nonces: Sequence[str],
    fanout: int,
    *,
    final: bool = False,
) -> None:
    """Give the lock back on each node (if this run holds it) and remove its nonce files.

    ``final``: the run is over; a lock it could not give back (a node that did not
    answer) counts as dead from now on.
    """
    command = sh.unlock_command(remote, run, nonces)
    try:
        map_nodes(
            reps, lambda c: execute(c, command, timeout=phases.COMMAND_TIMEOUT), fanout=fanout
        )
    finally:
        if final:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(run)


class Heartbeat:
    """Refreshes a held lock on each node every :data:`HEARTBEAT` seconds (a thread)."""

    def __init__(self, reps: Sequence[fabric.Connection], remote: str, run: str) -> None:
        self.reps = list(reps)
        self.command = sh.heartbeat_command(remote, run)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name="mento-deploy-heartbeat", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=HEARTBEAT)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            for conn in self.reps:
                if self._stop.is_set():
                    return
                if conn.is_connected:  # never re-open a connection from this thread
                    execute(conn, self.command, timeout=HEARTBEAT)
