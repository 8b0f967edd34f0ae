"""What a worker is: its name, how to start it, and the row ``ps`` shows for one instance.

A :class:`WorkerSpec` is checked when it is made, so bad input fails before any
node is touched; its ``repr`` names the ``env`` variables but never their values.
:func:`parse_listing` turns what a node prints for ``ps``/``top`` (see
:mod:`.shell`) into :class:`WorkerRow` objects, deciding ``lost``: the record says
a supervisor is in charge, but that process is gone (or the node rebooted).

>>> spec = WorkerSpec("consumer", "python3 consume.py", per_node=2, env={"TOKEN": "s3cret"})
>>> spec.name, spec.per_node, "s3cret" in repr(spec)
('consumer', 2, False)
>>> check_name("../x")
Traceback (most recent call last):
...
mento_fab.errors.WorkerNameError: not a worker name: '../x' (letters, digits, '_', '.', '-'; \
not starting with '.')
"""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mento_fab import defaults
from mento_fab.errors import BadInput, WorkerNameError

__all__ = [
    "ACTIVE",
    "RESTART_POLICIES",
    "STATES",
    "NodeListing",
    "WorkerRow",
    "WorkerSpec",
    "check_name",
    "parse_listing",
]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESTART_POLICIES = ("no", "on-failure", "always")
#: Every state ``ps`` can show (``lost`` is decided by the client, the rest by the node;
#: ``pending``: a ``--via slurm`` worker whose job Slurm has not started yet).
STATES = ("running", "restarting", "failed", "exited", "stopped", "lost", "pending")
#: States in which a supervisor is in charge (the worker runs or will run again).
ACTIVE = ("running", "restarting", "failed")
#: Most instances per node (``--per-node``).
MAX_PER_NODE = 256


def check_name(name: str) -> str:
    """``name`` if it can name a worker (it becomes a directory name on every node)."""
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("."):
        raise WorkerNameError(
            f"not a worker name: {name!r} (letters, digits, '_', '.', '-'; not starting with '.')"
        )
    return name


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a worker on every selected node (checked on creation)."""

    name: str
    command: str
    per_node: int = 1
    restart: str = defaults.WORKER_RESTART
    #: Restarts in a row before the worker is left ``failed``; None: no limit.
    max_restarts: int | None = defaults.WORKER_MAX_RESTARTS
    #: Working directory on the node (``~`` and relative paths start at the home).
    cwd: str | None = None
    #: Extra environment; values travel on the supervisor's stdin, never in an argv.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: A deploy target: start in its ``current`` release with ``.mento/beamtime.env`` set.
    target: str | None = None
    replace: bool = False
    grace: float = defaults.WORKER_GRACE
    log_cap: int = defaults.WORKER_LOG_CAP
    restart_delay: float = defaults.WORKER_RESTART_DELAY
    restart_delay_max: float = defaults.WORKER_RESTART_DELAY_MAX

    def __post_init__(self) -> None:
        check_name(self.name)
        if not self.command or not self.command.strip():
            raise BadInput("the worker's command must not be empty")
        if not 1 <= int(self.per_node) <= MAX_PER_NODE:
            raise BadInput(f"--per-node must be between 1 and {MAX_PER_NODE}, not {self.per_node}")
        if self.restart not in RESTART_POLICIES:
            raise BadInput(
                f"--restart must be one of {', '.join(RESTART_POLICIES)}, not {self.restart!r}"
            )
        if self.max_restarts is not None and int(self.max_restarts) < 0:
            raise BadInput(f"--max-restarts must not be negative, not {self.max_restarts}")
        for key in self.env:
            if not _ENV_NAME.match(key):
                raise BadInput(f"not a valid environment variable name: {key!r}")
        for label, value in (("--grace", self.grace), ("restart delay", self.restart_delay)):
            if not 0 < float(value) < 1e6:
                raise BadInput(f"{label} must be a positive number of seconds, not {value!r}")
        if int(self.log_cap) < 4096:
            raise BadInput("the log size cap must be at least 4096 bytes")
        for label, path in (("--cwd", self.cwd), ("--target", self.target)):
            if path is not None and (not path.strip() or "\0" in path):
                raise BadInput(f"{label} must be a directory path, not {path!r}")

    @property
    def env_names(self) -> list[str]:
        return sorted(self.env)

    def __repr__(self) -> str:
        return (
            f"WorkerSpec(name={self.name!r}, command={self.command!r}, "
            f"per_node={self.per_node}, restart={self.restart!r}, env={self.env_names})"
        )

    def node_spec(self, op: str, base: str = defaults.WORKERS_DIR) -> dict[str, Any]:
        """What the node's launcher reads (see :mod:`.launcher`)."""
        return {
            "op": op,
            "dir": base,
            "name": self.name,
            "command": self.command,
            "per_node": int(self.per_node),
            "restart": self.restart,
            "max_restarts": None if self.max_restarts is None else int(self.max_restarts),
            "cwd": self.cwd,
            "env": dict(self.env),
            "target": self.target,
            "replace": self.replace,
            "grace": float(self.grace),
            "log_cap": int(self.log_cap),
            "delay": float(self.restart_delay),
            "delay_max": float(self.restart_delay_max),
        }


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


@dataclass
class WorkerRow:
    """One worker instance on one node, as ``ps`` shows it."""

    node: str
    name: str
    index: int
    state: str
    #: The worker's own process (the session leader of its process group).
    pid: int | None = None
    #: The last run's exit status (a signal as 128 + its number), None before any end.
    exit: int | None = None
    restarts: int = 0
    #: When the current (or last) run started, seconds since the epoch.
    started: float | None = None
    #: CPU % of the worker's process group (over its lifetime, as ps(1) shows it).
    cpu: float | None = None
    #: Resident memory of the worker's process group in bytes.
    rss: int | None = None
    kind: str = "ssh"
    job: str | None = None
    command: str = ""
    message: str | None = None
    supervisor: int | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def uptime(self) -> float | None:
        """Seconds the current run has been going (None unless running)."""
        if not self.running or self.started is None:
            return None
        return max(0.0, time.time() - self.started)

    def as_dict(self) -> dict[str, Any]:
        uptime = self.uptime
        return {
            "node": self.node,
            "name": self.name,
            "index": self.index,
            "state": self.state,
            "pid": self.pid,
            "exit": self.exit,
            "restarts": self.restarts,
            "started": _iso(self.started),
            "cpu": self.cpu,
            "rss": self.rss,
            "uptime": None if uptime is None else round(uptime, 1),
            "kind": self.kind,
            "job": self.job,
            "command": self.command,
            "message": self.message,
        }


@dataclass
class NodeListing:
    """What one node said about itself and its workers."""

    node: str
    host: str = ""
    boot: str = ""
    rows: list[WorkerRow] = field(default_factory=list)
    #: Other ``KEY rest`` lines (the ``top`` sample), in order.
    lines: list[tuple[str, str]] = field(default_factory=list)


def _alive(pids: list[str], stat: str, boot: str) -> bool:
    """The recorded supervisor is the process now at that pid (same boot, same start)."""
    fields = stat.split()
    if len(pids) < 3 or len(fields) < 20 or pids[2] != boot:
        return False
    return fields[0] not in ("Z", "X") and fields[19] == pids[1]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _row(node: str, pids: list[str], stat: str, state: dict[str, Any], boot: str) -> WorkerRow:
    name = str(state.get("name", "?"))
    status = str(state.get("state", "?"))
    if state.get("active") and not _alive(pids, stat, boot):
        status = "lost"
    running = status == "running"
    return WorkerRow(
        node=node,
        name=name,
        index=_int(state.get("index")) or 0,
        state=status,
        pid=_int(state.get("pid")),
        exit=_int(state.get("exit")),
        restarts=_int(state.get("restarts")) or 0,
        started=state.get("since") if running else state.get("since") or state.get("started"),
        kind=str(state.get("kind") or "ssh"),
        job=state.get("job"),
        command=str(state.get("command", "")),
        message=state.get("message") if not running else None,
        supervisor=_int(state.get("supervisor")),
    )


def parse_listing(node: str, text: str) -> NodeListing:
    """The output of :func:`.shell.listing` / :func:`.shell.top` from one node.

    ``H host boot``; per record ``R <pids file>``, ``P <supervisor's /proc stat after
    the name>`` (empty when gone) and ``S <state.json>``; after ``C``, ``ps`` lines
    ``sid pcpu rss-kB`` of the workers' sessions. Other ``KEY ...`` lines are kept.
    """
    listing = NodeListing(node)
    pids: list[str] = []
    stat = ""
    usage: dict[int, list[float]] = {}
    in_ps = False
    for line in text.splitlines():
        if in_ps:
            parts = line.split()
            if len(parts) == 3 and parts[0].isdigit():
                total = usage.setdefault(int(parts[0]), [0.0, 0.0])
                total[0] += float(parts[1])
                total[1] += float(parts[2])
            continue
        key, _, rest = line.partition(" ")
        if key == "H":
            listing.host, _, listing.boot = rest.partition(" ")
        elif key == "R":
            pids, stat = rest.split(), ""
        elif key == "P":
            stat = rest
        elif key == "S":
            try:
                state = json.loads(rest)
            except ValueError:
                continue
            if isinstance(state, dict):
                listing.rows.append(_row(node, pids, stat, state, listing.boot))
        elif key == "C":
            in_ps = True
        elif key:
            listing.lines.append((key, rest))
    for row in listing.rows:
        if row.running and row.pid in usage:
            row.cpu = round(usage[row.pid][0], 1)
            row.rss = int(usage[row.pid][1]) * 1024
    listing.rows.sort(key=lambda r: (r.name, r.index))
    return listing
