"""Snapshots of the reserved nodes for ``mento-fab top``: load, CPU, memory, GPUs, disk, workers.

One light request per node per refresh over the group's open connections: a small
``sh`` loop (:func:`.shell.top_loop`) stays open on every node and answers each
request with shell built-ins reading ``/proc`` and the worker records (``df`` every
few refreshes, ``nvidia-smi`` where present). A node that does not answer in time
keeps its previous sample, marked as waiting, and never holds up the others; one
that cannot be reached shows its error once the connect timeout is over. CPU % is
the busy share of the node's CPU time since the previous sample (the first sample
reads the counters twice, ``FIRST_SAMPLE`` s apart).

>>> from mento_fab import nodes_group                       # doctest: +SKIP
>>> with Top(nodes_group(), metadata=md) as top:            # doctest: +SKIP
...     snapshot = top.refresh()
...     print(snapshot.as_json()["nodes"][0]["cpu"])
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import secrets
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import fabric
import paramiko

from mento_fab import defaults
from mento_fab.connection import connection_node, describe_error, open_channel
from mento_fab.defaults import UNREACHABLE_EXIT
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.workers import shell
from mento_fab.workers.spec import WorkerRow, parse_listing

__all__ = ["FIRST_SAMPLE", "NodeSample", "Snapshot", "Top"]

#: Seconds between the two CPU readings of a node's first sample.
FIRST_SAMPLE = 0.25
#: Seconds a reservation lookup is reused.
RESERVATION_TTL = 60.0
#: Seconds a one-off snapshot waits for Slurm's answer about the reservation.
RESERVATION_WAIT = 5.0
#: Free disk space is read every this many refreshes (``df`` is the one program run).
DISK_EVERY = 5
#: Largest answer to one sample request (bytes); more means something is wrong.
MAX_ANSWER = 4 * 1024 * 1024


class _Pool:
    """Daemon worker threads: a node (or Slurm) that never answers must not keep the
    program from exiting, as ``ThreadPoolExecutor`` threads would (they are joined)."""

    def __init__(self, size: int) -> None:
        self.jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self.threads = [
            threading.Thread(target=self._work, name=f"mento-top-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            future, call = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:
                    future.set_exception(exc)

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self.jobs.put((future, call))
        return future

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)


@dataclass
class NodeSample:
    """One node at one moment (``None``: not known, e.g. no GPU or not reachable)."""

    node: str
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    cpus: int | None = None
    #: Busy CPU time in % of all CPUs since the previous sample.
    cpu: float | None = None
    mem_used: int | None = None
    mem_total: int | None = None
    disk_path: str | None = None
    disk_free: int | None = None
    disk_total: int | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    workers: list[WorkerRow] = field(default_factory=list)
    error: str | None = None
    #: When the sample was taken (monotonic) and whether a newer one is still awaited.
    taken: float = 0.0
    waiting: bool = False
    counters: tuple[int, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "load1": self.load1,
            "load5": self.load5,
            "load15": self.load15,
            "cpus": self.cpus,
            "cpu": self.cpu,
            "mem_used": self.mem_used,
            "mem_total": self.mem_total,
            "disk": {"path": self.disk_path, "free": self.disk_free, "total": self.disk_total},
            "gpus": self.gpus,
            "workers": [_worker(w) for w in self.workers],
            "error": self.error,
            "waiting": self.waiting,
        }


def _worker(w: WorkerRow) -> dict[str, Any]:
    return {"name": w.name, "index": w.index, "state": w.state, "pid": w.pid,
            "restarts": w.restarts, "exit": w.exit}  # fmt: skip


@dataclass
class Snapshot:
    """Every node's latest sample and the reservation's end, at one refresh."""

    nodes: list[NodeSample]
    reservation: dict[str, Any]
    #: Wall seconds the refresh took.
    seconds: float = 0.0
    taken: datetime.datetime = field(default_factory=lambda: datetime.datetime.now().astimezone())

    @property
    def exit_status(self) -> int:
        """0, or 255 when some node could not be sampled (as ssh)."""
        return UNREACHABLE_EXIT if any(n.error for n in self.nodes) else 0

    def as_json(self) -> dict[str, Any]:
        """``{"nodes": [...], "reservation": {...}, "taken", "seconds"}``."""
        return {
            "nodes": [n.as_dict() for n in self.nodes],
            "reservation": self.reservation,
            "taken": self.taken.isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 4),
        }


def _counters(line: str) -> tuple[int, int] | None:
    """``(total, idle)`` jiffies from a ``cpu ...`` line of /proc/stat (guest time is in user)."""
    parts = line.split()
    try:
        values = [int(v) for v in parts[1:9]]
    except ValueError:
        return None
    if len(values) < 4:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


def _busy(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[0] <= before[0]:
        return None
    total, idle = after[0] - before[0], after[1] - before[1]
    return round(100.0 * (total - idle) / total, 1)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _mib(text: str) -> int | None:
    value = _number(text)
    return None if value is None else int(value) << 20


def parse_sample(node: str, text: str, previous: NodeSample | None) -> NodeSample:
    """A :class:`NodeSample` from :func:`.shell.top`'s output (see there for the lines)."""
    listing = parse_listing(node, text)
    sample = NodeSample(node, workers=listing.rows, taken=time.monotonic())
    second = None
    for key, rest in listing.lines:
        parts = rest.split()
        if key == "L" and len(parts) >= 3:
            sample.load1, sample.load5, sample.load15 = (_number(p) for p in parts[:3])
        elif key == "U" and parts:
            sample.cpus = int(parts[0]) if parts[0].isdigit() else None
            sample.counters = _counters(" ".join(parts[1:]))
        elif key == "V":
            second = _counters(rest)
        elif key == "M" and len(parts) >= 2 and parts[1].isdigit():
            if parts[0] == "MemTotal:":
                sample.mem_total = int(parts[1]) * 1024
            elif parts[0] == "MemAvailable:":
                sample.mem_used = int(parts[1]) * 1024  # available, for now
        elif key == "D" and len(parts) >= 4 and parts[0].isdigit():
            sample.disk_total = int(parts[0]) * 1024
            sample.disk_free = int(parts[2]) * 1024
            sample.disk_path = " ".join(parts[3:])
        elif key == "G":
            fields = [f.strip() for f in rest.split(",")]
            if len(fields) >= 4:
                sample.gpus.append({
                    "index": fields[0],
                    "util": _number(fields[1]),
                    "mem_used": _mib(fields[2]),
                    "mem_total": _mib(fields[3]),
                })  # fmt: skip
    if sample.mem_total is not None and sample.mem_used is not None:
        sample.mem_used = sample.mem_total - sample.mem_used
    if second is not None:
        sample.cpu = _busy(sample.counters, second)
        sample.counters = second
    elif previous is not None:
        sample.cpu = _busy(previous.counters, sample.counters)
    return sample


class _Shell:
    """The sampling loop (:func:`.shell.top_loop`) on one node: a channel kept open."""

    def __init__(self, conn: fabric.Connection) -> None:
        self.conn = conn
        self.node = connection_node(conn)
        self.channel: paramiko.Channel | None = None
        self.out = bytearray()
        self.busy = False
        self.first = True

    def drop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel, self.busy, self.first = None, False, True
        self.out.clear()


class Top:
    """Samples a group of nodes; :meth:`refresh` returns a :class:`Snapshot`.

    One ``sh`` loop per node stays open on the node's connection between refreshes,
    so a refresh costs a node one request line and a few built-ins (no new SSH
    channel, no new shell), and the client one ``select()`` loop in the calling
    thread. Connections are (re)opened by daemon threads, so a node that does not
    answer never holds up the others or the program's exit. Not thread-safe: one
    caller refreshes.
    """

    def __init__(
        self,
        group: Any,
        *,
        metadata: BeamtimeMetadata | None = None,
        target: str | None = None,
        base: str = defaults.WORKERS_DIR,
        fanout: int = defaults.FANOUT,
        disk_every: int = DISK_EVERY,
    ) -> None:
        self.conns: list[fabric.Connection] = list(group)
        self.metadata, self.target, self.base = metadata, target, base
        self.end = f"MENTO-TOP-{secrets.token_hex(8)}"
        self.loop = shell.top_loop(base, target, end=self.end)
        self.shells = [_Shell(c) for c in self.conns]
        self.samples: dict[str, NodeSample] = {}
        self.errors: dict[str, str] = {}
        self.connecting: dict[str, Future[Any]] = {}
        self.pool = _Pool(max(1, min(fanout, len(self.conns))))
        self._slurm_pool = _Pool(1)
        self.disk_every = max(1, disk_every)
        self.count = 0
        self._reservation: dict[str, Any] = {}
        self._reservation_at = -RESERVATION_TTL
        self._reservation_job: Future[dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Top:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the loops on the nodes (EOF on their stdin) and the threads."""
        for sh in self.shells:
            if sh.channel is not None:
                with contextlib.suppress(Exception):
                    sh.channel.shutdown_write()
                sh.channel.close()
        self.pool.close()
        self._slurm_pool.close()

    def _open(self, sh: _Shell) -> None:
        channel = open_channel(sh.conn)
        channel.exec_command(self.loop)
        sh.channel = channel

    def _connect(self, deadline: float | None) -> None:
        """Start (re)opening every node without a loop; wait for them until ``deadline``."""
        for sh in self.shells:
            if sh.channel is None and sh.node not in self.connecting:
                self.connecting[sh.node] = self.pool.submit(lambda sh=sh: self._open(sh))
        if self.connecting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait(list(self.connecting.values()), left)
        for node, future in list(self.connecting.items()):
            if future.done():
                del self.connecting[node]
                exc = future.exception()
                if exc is not None:
                    conn = next(c for c in self.conns if connection_node(c) == node)
                    self.errors[node] = describe_error(exc, conn.connect_timeout)
                else:
                    self.errors.pop(node, None)

    def _ask(self) -> None:
        disk = "1" if self.count % self.disk_every == 0 else "0"
        for sh in self.shells:
            if sh.channel is not None and not sh.busy:
                request = f"{FIRST_SAMPLE:g} {disk}\n" if sh.first else f"0 {disk}\n"
                try:
                    sh.channel.sendall(request.encode())
                except Exception as exc:
                    self.errors[sh.node] = describe_error(exc)
                    sh.drop()
                    continue
                sh.busy = True

    def _read(self, deadline: float | None) -> None:
        """Read answers until every asked node has answered (or ``deadline``)."""
        end = self.end.encode() + b"\n"
        while True:
            busy = [sh for sh in self.shells if sh.busy and sh.channel is not None]
            if not busy:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            ready = select.select([sh.channel for sh in busy], [], [], left)[0]
            for sh in busy:
                channel = sh.channel
                if channel is None or channel not in ready:
                    continue
                while channel.recv_ready():
                    sh.out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    channel.recv_stderr(65536)
                at = sh.out.find(end)
                if at >= 0 and (at == 0 or sh.out[at - 1] == 10):
                    text = sh.out[:at].decode("utf-8", "replace")
                    del sh.out[: at + len(end)]
                    sh.busy = False
                    self._done(sh, text)
                elif channel.eof_received or channel.closed or len(sh.out) > MAX_ANSWER:
                    self.errors[sh.node] = (
                        "connection lost" if len(sh.out) <= MAX_ANSWER else ("answer too large")
                    )
                    sh.drop()

    def _done(self, sh: _Shell, text: str) -> None:
        previous = self.samples.get(sh.node)
        sample = parse_sample(sh.node, text, None if sh.first else previous)
        sh.first = False
        if sample.disk_total is None and previous is not None:  # disk is read less often
            sample.disk_path = previous.disk_path
            sample.disk_free, sample.disk_total = previous.disk_free, previous.disk_total
        self.samples[sh.node] = sample
        self.errors.pop(sh.node, None)

    def refresh(self, timeout: float | None = None, *, once: bool = False) -> Snapshot:
        """Ask every node that is not still answering for a sample; wait up to ``timeout``
        seconds (None: until every node answered or failed).

        ``once``: a single snapshot, so a node that has not answered within ``timeout``
        is an error, and Slurm gets :data:`RESERVATION_WAIT` seconds for the reservation.
        """
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        self._connect(deadline)
        self._ask()
        self._read(deadline)
        self.count += 1
        self._start_reservation()
        nodes = []
        for sh in self.shells:
            error = self.errors.get(sh.node)
            sample = self.samples.get(sh.node)
            if sample is None or (error and sh.channel is None):
                sample = NodeSample(sh.node, error=error)
            waiting = sh.busy or sh.node in self.connecting
            sample.waiting = waiting
            if once and waiting and sample.error is None:
                sample.error = f"no answer within {timeout:g} s"
            nodes.append(sample)
        job = self._reservation_job
        if once and job is not None:
            wait([job], RESERVATION_WAIT)
        return Snapshot(nodes, self.reservation(), seconds=time.monotonic() - start)

    def _start_reservation(self) -> None:
        """Look the reservation up (in a daemon thread) once a node answered, every minute."""
        if self.metadata is None or self.metadata.online is None:
            return
        if not any(c.is_connected for c in self.conns):
            return
        due = time.monotonic() - self._reservation_at >= RESERVATION_TTL
        if due and self._reservation_job is None:
            self._reservation_job = self._slurm_pool.submit(self._lookup)

    def _lookup(self) -> dict[str, Any]:
        from mento_fab.errors import MentoError
        from mento_fab.slurm import Slurm

        online = self.metadata.online if self.metadata else None
        info: dict[str, Any] = {"name": online.slurm.reservation if online else None}
        conn = next((c for c in self.conns if c.is_connected), None)
        try:
            if conn is None:
                raise ConnectionError("no node reachable")
            found = Slurm(conn, self.metadata).reservation()  # type: ignore[arg-type]
            info.update(state=found.state, start=found.start, end=found.end, error=None)
        except (MentoError, ConnectionError) as exc:
            info.update(state=None, start=None, end=None, error=str(exc))
        with self._lock:
            self._reservation = info
            self._reservation_at = time.monotonic()
            self._reservation_job = None
        return info

    def reservation(self) -> dict[str, Any]:
        """``{"name", "state", "start", "end", "left", "error"}`` (``left`` in seconds)."""
        with self._lock:
            info = dict(self._reservation)
        if not info:
            online = self.metadata.online if self.metadata else None
            name = online.slurm.reservation if online else None
            why = "no answer from Slurm yet" if name else "no reservation in the metadata"
            return {"name": name, "state": None, "start": None, "end": None, "left": None,
                    "error": why}  # fmt: skip
        end = info.get("end")
        left = (end - datetime.datetime.now()).total_seconds() if end else None
        return {
            "name": info.get("name"),
            "state": info.get("state"),
            "start": info["start"].isoformat() if info.get("start") else None,
            "end": end.isoformat() if end else None,
            "left": None if left is None else max(0, round(left)),
            "error": info.get("error"),
        }
