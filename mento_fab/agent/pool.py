"""Open connections kept by the agent between calls, and the groups built from them.

:func:`Pool.group` is what ``Options.group`` calls inside the agent: it builds the
group exactly as the direct path does (``nodes_group``: the same checks and
errors), then swaps in an open Connection kept from an earlier call for every
node that has one under the same *key*:

- the metadata file's content (a changed reservation or node list: new connections),
- the key file's content, the ssh_config files' contents, ``$HOME``,
- the known_hosts option, the host-key policy, the connect timeout.

A Connection is leased to one call at a time and taken back when the call ends;
``close()`` on it leaves it open for the next call (so ``with group:`` and
``Slurm.from_group`` work unchanged). A dropped connection is re-opened by the
runner's ``ensure_open`` as on the direct path. Host keys are checked when a
connection opens; a kept connection stays what it was when its key was accepted,
as with OpenSSH's ControlPersist, so a node whose sshd now has another key is
refused at its next (re)connect. The known_hosts files are stamped (size, mtime,
inode): when one changed since a connection was kept, the key tables inside it
are stale and it is closed instead of reused. ``check`` always logs in anew (that
is what it checks) and leaves its connections for the next call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fabric

from mento_fab.agent.context import Request, current
from mento_fab.hostkeys import SYSTEM_KNOWN_HOSTS
from mento_fab.nodes import connection_node, nodes_group
from mento_fab.session import Session

__all__ = ["FRESH_LOGIN_TASKS", "Pool"]

log = logging.getLogger("mento_fab.agent")

#: Tasks whose point is a new login on every node: never handed kept connections.
FRESH_LOGIN_TASKS = frozenset({"check"})
#: Connections kept per node and key (two calls at once each get their own).
PER_NODE = 2
#: Seconds an interrupted call's connections stay open for its cleanup before closing.
RETIRE_DELAY = 60.0


class _Kept:
    """Mixin for pooled Connections: ``close()`` keeps an open connection for the pool."""

    _mento_kept = True

    def close(self) -> None:
        if self._mento_kept and self.is_connected:  # type: ignore[attr-defined]
            return
        super().close()  # type: ignore[misc]


_KEPT_CLASSES: dict[type, type] = {}


def _keep(conn: fabric.Connection) -> fabric.Connection:
    base = type(conn)
    if not issubclass(base, _Kept):
        kept = _KEPT_CLASSES.get(base)
        if kept is None:
            kept = _KEPT_CLASSES[base] = type(f"Kept{base.__name__}", (_Kept, base), {})
        conn.__class__ = kept  # behaviour only, no new state (as nodes does for hops)
    conn._mento_kept = True  # type: ignore[attr-defined]
    return conn


def _really_close(conn: fabric.Connection) -> None:
    conn._mento_kept = False  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        conn.close()


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _content(path: str | os.PathLike[str] | None) -> bytes:
    if not path:
        return b"-"
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        return f"unreadable {exc.errno}".encode()


def _stamp(paths: Iterable[str]) -> tuple[Any, ...]:
    out = []
    for path in paths:
        try:
            info = os.stat(os.path.expanduser(path))
            out.append((path, info.st_size, info.st_mtime_ns, info.st_ino))
        except OSError:
            out.append((path, None))
    return tuple(out)


@dataclass
class _Shape:
    """A group ``nodes_group`` built for one set of arguments: its nodes and what it logged.

    Building a group parses ssh_config once per node and loads the key: most of a
    warm call's CPU time on 32 nodes. Its inputs are all in the pool key and the
    known_hosts stamp, so while they hold, the kept connections are the group, and
    the warnings it gave (an unprotected key file, a bad known_hosts line) are
    given again from the records.
    """

    group_class: type
    nodes: list[str]
    files: list[str]
    records: list[logging.LogRecord]


class _Capture(logging.Handler):
    """Records of mento_fab's loggers from one thread."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)


@contextlib.contextmanager
def _captured() -> Iterator[list[logging.LogRecord]]:
    handler = _Capture()
    root = logging.getLogger("mento_fab")
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


@dataclass
class _Kind:
    """What the pool knows about one key: label for the status, known_hosts stamp."""

    metadata: str
    user: str
    stamp: tuple[Any, ...] = ()
    last_used: float = field(default_factory=time.monotonic)
    idle: dict[str, list[tuple[fabric.Connection, float]]] = field(default_factory=dict)
    leased: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, _Shape] = field(default_factory=dict)


class Pool:
    """Open Connections by (key, node), leased to one call at a time."""

    def __init__(self, per_node: int = PER_NODE) -> None:
        self.per_node = per_node
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the hook
    def group(self, session: Session, **options: Any) -> Any:
        """``nodes_group(session, **options)`` with kept connections swapped in."""
        request = current()
        if request is None:  # not inside a call: nothing to keep it for
            return nodes_group(session, **options)
        key = self._key(session, options)
        level = logging.getLogger("mento_fab").getEffectiveLevel()
        shape_key = repr((sorted(options.items()), level))
        fresh = request.task in FRESH_LOGIN_TASKS
        hit = None if fresh else self._lease_shape(key, shape_key)
        if hit is not None:
            group, shape = hit
            for record in shape.records:  # what building the group logged, as it would
                logging.getLogger(record.name).handle(record)
        else:
            with _captured() as records:
                built = nodes_group(session, **options)
            group = self._lease(session, key, built, fresh, options)
            with self._lock:
                self._kinds[key].shapes[shape_key] = _Shape(
                    type(built), [connection_node(c) for c in built],
                    self._known_hosts_files(list(built), options), records,
                )  # fmt: skip
        leases = [(key, connection_node(c), c) for c in group]
        request.on_close.append(lambda req: self._release(req, leases, options))
        return group

    def _lease(
        self, session: Session, key: str, group: Any, fresh: bool, options: dict[str, Any]
    ) -> Any:
        """The group with a kept connection in place of each fresh one that has one."""
        conns = list(group)
        stamp = _stamp(self._known_hosts_files(conns, options))
        chosen: list[fabric.Connection] = []
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                online = session.online
                kind = self._kinds[key] = _Kind(str(session.file), online.ssh.user, stamp)
            elif kind.stamp != stamp:
                log.info("known_hosts changed: closing kept connections of %s", kind.metadata)
                self._drop_idle(kind)
                kind.stamp = stamp
            kind.last_used = time.monotonic()
            for conn in conns:
                node = connection_node(conn)
                kept = None if fresh else self._take(kind, node)
                chosen.append(_keep(kept if kept is not None else conn))
                kind.leased[node] = kind.leased.get(node, 0) + 1
        return type(group).from_connections(chosen)

    def _lease_shape(self, key: str, shape_key: str) -> tuple[Any, _Shape] | None:
        """Kept connections for every node of a group built before with these arguments.

        None (build it anew) unless each node has an open kept connection and no
        known_hosts file changed since: so a dropped node, a concurrent call, a
        changed host key file all take the way of the direct path.
        """
        with self._lock:
            kind = self._kinds.get(key)
            shape = kind.shapes.get(shape_key) if kind else None
            if kind is None or shape is None or _stamp(shape.files) != kind.stamp:
                return None
            taken: list[tuple[str, fabric.Connection]] = []
            for node in shape.nodes:
                conn = self._take(kind, node)
                if conn is None:
                    now = time.monotonic()
                    for back, kept in taken:
                        kind.idle[back].append((kept, now))
                    return None
                taken.append((node, conn))
            for node, _ in taken:
                kind.leased[node] = kind.leased.get(node, 0) + 1
            kind.last_used = time.monotonic()
        return shape.group_class.from_connections([c for _, c in taken]), shape

    # ----------------------------------------------------------- bookkeeping
    @staticmethod
    def _key(session: Session, options: dict[str, Any]) -> str:
        online = session.online
        ssh_config = options.get("ssh_config") or os.environ.get("MENTO_SSH_CONFIG")
        try:  # a key file's mode decides whether loading it warns
            mode = str(os.stat(online.ssh.key).st_mode)
        except OSError as exc:
            mode = f"unreadable {exc.errno}"
        return _digest(
            _content(session.file),
            _content(online.ssh.key), mode,
            str(ssh_config), _content(ssh_config),
            _content("~/.ssh/config"), _content("/etc/ssh/ssh_config"),
            os.path.expanduser("~"),
            str(options.get("known_hosts")),
            str(options.get("host_keys")),
            str(options.get("connect_timeout")),
            str(options.get("extra_keys")), str(options.get("allow_agent")),
        )  # fmt: skip

    @staticmethod
    def _known_hosts_files(conns: list[fabric.Connection], options: dict[str, Any]) -> list[str]:
        """Every known_hosts file ``nodes_group`` may have read for these connections."""
        files = [str(options.get("known_hosts") or "~/.ssh/known_hosts"), *SYSTEM_KNOWN_HOSTS]
        if conns:
            seen = conns[0].config.base_ssh_config.lookup(connection_node(conns[0]))
            for name in ("userknownhostsfile", "globalknownhostsfile"):
                files += str(seen.get(name, "")).split()
        return sorted(set(files))

    @staticmethod
    def _take(kind: _Kind, node: str) -> fabric.Connection | None:
        idle = kind.idle.get(node, [])
        while idle:
            conn, _ = idle.pop()  # the most recently used
            if conn.is_connected:
                return conn
            _really_close(conn)
        return None

    def _release(
        self, request: Request, leases: list[tuple[str, str, fabric.Connection]], options: Any
    ) -> None:
        """Take a call's connections back (closing what cannot be kept)."""
        retire: list[fabric.Connection] = []
        with self._lock:
            for key, node, conn in leases:
                kind = self._kinds.get(key)
                if kind is None:
                    retire.append(conn)
                    continue
                kind.leased[node] = max(0, kind.leased.get(node, 1) - 1)
                kind.last_used = time.monotonic()
                if request.interrupts or not conn.is_connected:
                    # An interrupted call may still be ending remote commands on it.
                    retire.append(conn)
                    continue
                idle = kind.idle.setdefault(node, [])
                if not any(c is conn for c, _ in idle):
                    idle.append((conn, time.monotonic()))
                while len(idle) > self.per_node:
                    old, _ = idle.pop(0)
                    retire.append(old)
            # What this call wrote to known_hosts (accept-new) is in its tables already.
            for key in {k for k, _, _ in leases}:
                kind = self._kinds.get(key)
                if kind is not None and leases:
                    conns = [c for k, _, c in leases if k == key]
                    kind.stamp = _stamp(self._known_hosts_files(conns, options))
        if request.interrupts:
            timer = threading.Timer(RETIRE_DELAY, lambda: [_really_close(c) for c in retire])
            timer.daemon = True
            timer.start()
        else:
            for conn in retire:
                _really_close(conn)

    @staticmethod
    def _drop_idle(kind: _Kind) -> None:
        for idle in kind.idle.values():
            for conn, _ in idle:
                _really_close(conn)
            idle.clear()

    def expire(self, max_idle: float) -> None:
        """Close connections idle for ``max_idle`` seconds or dropped by their node."""
        now = time.monotonic()
        with self._lock:
            for key, kind in list(self._kinds.items()):
                for idle in kind.idle.values():
                    for entry in list(idle):
                        conn, since = entry
                        if now - since > max_idle or not conn.is_connected:
                            idle.remove(entry)
                            _really_close(conn)
                unused = not any(kind.idle.values()) and not any(kind.leased.values())
                if unused and now - kind.last_used > max_idle:
                    del self._kinds[key]

    def close(self) -> None:
        with self._lock:
            for kind in self._kinds.values():
                self._drop_idle(kind)
            self._kinds.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        """Per key: the metadata file, the account, and each node's connections."""
        out = []
        now = time.monotonic()
        with self._lock:
            for kind in self._kinds.values():
                nodes = {}
                for node in sorted(set(kind.idle) | set(kind.leased)):
                    idle = kind.idle.get(node, [])
                    nodes[node] = {
                        "open": sum(1 for c, _ in idle if c.is_connected),
                        "dropped": sum(1 for c, _ in idle if not c.is_connected),
                        "in_use": kind.leased.get(node, 0),
                        "idle_seconds": round(now - max((t for _, t in idle), default=now), 1),
                    }
                out.append({
                    "metadata": kind.metadata,
                    "user": kind.user,
                    "idle_seconds": round(now - kind.last_used, 1),
                    "nodes": nodes,
                })  # fmt: skip
        return out
