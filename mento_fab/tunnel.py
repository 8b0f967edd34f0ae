"""A local port forwarded to a port on a reserved node, over the node's SSH connection.

For a Jupyter server, a dashboard or a live viewer running on a node: the
listener is bound to ``127.0.0.1`` only (other users of the beamline PC cannot
use the beamtime's tunnel), every accepted connection becomes a ``direct-tcpip``
channel of one SSH connection made like every other task's (same key, host keys,
timeouts, keepalives), and any number of connections run at once (one thread
each). A node that goes away ends the tunnel; :attr:`Tunnel.error` says why.

In a notebook::

    from mento_fab.tunnel import tunnel
    with tunnel(md, "cn01", 8888) as url:      # http://127.0.0.1:<free port>/
        requests.get(url + "api/status")

    t = tunnel(md, "cn01", 8888).start()     # or keep it open across cells
    t                                        # shows a link
    t.close()
"""

from __future__ import annotations

import contextlib
import errno
import html
import logging
import os
import select
import socket
import threading
from types import TracebackType
from typing import Any

import fabric
import paramiko

from mento_fab.connection import connection_node, describe_error, ensure_open
from mento_fab.errors import BadPort, NodeError, PortInUse, SelectionError
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.session import Session

__all__ = ["LOCAL_HOST", "Tunnel", "check_port", "tunnel"]

log = logging.getLogger(__name__)

#: The only address a tunnel listens on.
LOCAL_HOST = "127.0.0.1"
#: Seconds between checks that the node's connection is still alive.
WATCH_INTERVAL = 1.0
_CHUNK = 65536


def check_port(value: Any, what: str, *, allow_zero: bool = False) -> int:
    """A TCP port number from user input; :class:`BadPort` (bad input) otherwise."""
    try:
        port = int(str(value))
    except ValueError:
        raise BadPort(f"{what} must be a port number, not {value!r}") from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise BadPort(f"{what} must be between {max(low, 1)} and 65535, not {port}")
    return port


class Tunnel:
    """Forward ``127.0.0.1:local_port`` to ``remote_host:remote_port`` as seen from a node.

    ``local_port=0`` picks a free port. :meth:`start` binds and connects (or
    raises, leaving nothing behind); :meth:`close` ends every forwarded
    connection. As a context manager it starts, yields :attr:`url`, and closes.
    """

    def __init__(
        self,
        conn: fabric.Connection,
        remote_port: int,
        *,
        remote_host: str = "localhost",
        local_port: int = 0,
        own_connection: bool = False,
    ) -> None:
        self.conn = conn
        self.node = connection_node(conn)
        self.remote_port = check_port(remote_port, "remote port")
        self.remote_host = remote_host or "localhost"
        self.local_port = check_port(local_port, "local port", allow_zero=True)
        #: Why the tunnel ended on its own (the node went away), else None.
        self.error: str | None = None
        #: Connections forwarded so far, and failures to reach the remote port.
        self.forwarded = 0
        self.refused = 0
        self._own = own_connection
        self._listener: socket.socket | None = None
        self._transport: paramiko.Transport | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[Any] = set()  # sockets and channels to close on close()
        self._threads: set[threading.Thread] = set()
        self._watcher: threading.Thread | None = None

    # ----------------------------------------------------------------- public
    @property
    def url(self) -> str:
        return f"http://{LOCAL_HOST}:{self.local_port}/"

    @property
    def active(self) -> bool:
        return self._listener is not None and not self._closed.is_set()

    def start(self) -> Tunnel:
        """Bind the local port, then connect to the node; raise (cleanly) if either fails."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((LOCAL_HOST, self.local_port))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"local port {self.local_port} is in use: pick another with "
                    "--local-port, or leave it out for a free one"
                ) from None
            raise BadPort(
                f"cannot listen on {LOCAL_HOST}:{self.local_port}: {exc.strerror}"
            ) from None
        try:
            self._transport = ensure_open(self.conn)
        except Exception as exc:
            listener.close()
            if self._own:
                self.conn.close()
            raise NodeError(
                f"{self.node}: {describe_error(exc, self.conn.connect_timeout)}"
            ) from None
        self.local_port = listener.getsockname()[1]
        self._listener = listener
        self._watcher = threading.Thread(
            target=self._accept_loop, name=f"tunnel-{self.node}-{self.local_port}", daemon=True
        )
        self._watcher.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the tunnel ends (closed, or the node went away); True if it has."""
        return self._closed.wait(timeout)

    def close(self) -> None:
        """Stop listening, end every forwarded connection, close an own connection."""
        self._end(None)
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._own:
            self.conn.close()

    def __enter__(self) -> str:
        self.start()
        return self.url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self.active else f"closed{f': {self.error}' if self.error else ''}"
        return f"<Tunnel {self.url} -> {self.node}:{self.remote_host}:{self.remote_port} ({state})>"

    def _repr_html_(self) -> str:
        target = html.escape(f"{self.node}:{self.remote_host}:{self.remote_port}")
        if self.active:
            link = html.escape(self.url)
            return f'<a href="{link}" target="_blank">{link}</a> &rarr; {target}'
        why = html.escape(self.error or "closed")
        return f"tunnel to {target}: {why}"

    # --------------------------------------------------------------- internals
    def _end(self, error: str | None) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self.error = error
            self._closed.set()
            things = list(self._open)
            self._open.clear()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        for thing in things:
            with contextlib.suppress(Exception):
                thing.close()

    def _track(self, *things: Any) -> bool:
        with self._lock:
            if self._closed.is_set():
                return False
            self._open.update(things)
            return True

    def _untrack(self, *things: Any) -> None:
        with self._lock:
            self._open.difference_update(things)
        for thing in things:
            with contextlib.suppress(Exception):
                thing.close()

    def _accept_loop(self) -> None:
        listener, transport = self._listener, self._transport
        assert listener is not None and transport is not None
        listener.settimeout(WATCH_INTERVAL)
        while not self._closed.is_set():
            if not transport.is_active():
                self._end(f"the connection to {self.node} was lost")
                return
            try:
                client, address = listener.accept()
            except TimeoutError:
                continue
            except (OSError, ValueError):  # closed under us
                if not self._closed.is_set():
                    self._end(f"the local listener on port {self.local_port} failed")
                return
            thread = threading.Thread(
                target=self._forward, args=(transport, client, address), daemon=True
            )
            self._threads.add(thread)
            thread.start()

    def _forward(self, transport: paramiko.Transport, client: socket.socket, address: Any) -> None:
        channel = None
        try:
            if not self._track(client):
                client.close()
                return
            try:
                channel = transport.open_channel(
                    "direct-tcpip",
                    (self.remote_host, self.remote_port),
                    address[:2],
                    timeout=self.conn.connect_timeout,
                )
            except Exception as exc:
                self.refused += 1
                reason = (
                    "nothing listens there"
                    if isinstance(exc, paramiko.ChannelException)
                    else describe_error(exc)
                )
                log.warning(
                    "tunnel: %s could not reach %s:%s (%s)",
                    self.node,
                    self.remote_host,
                    self.remote_port,
                    reason,
                )
                if not transport.is_active():
                    self._end(f"the connection to {self.node} was lost")
                return
            if not self._track(channel):
                return
            self.forwarded += 1
            client.setblocking(True)
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                _pump(client, channel)
        finally:
            self._untrack(*(x for x in (client, channel) if x is not None))
            self._threads.discard(threading.current_thread())


def _pump(client: socket.socket, channel: paramiko.Channel) -> None:
    """Copy both ways until both sides have ended (half-closes passed on).

    ``poll``, not ``select``: a notebook may hold more than 1024 descriptors.
    """
    sides = {client.fileno(): client, channel.fileno(): channel}
    poller = select.poll()
    for fd in sides:
        poller.register(fd, select.POLLIN)
    client_open = channel_open = True
    while client_open or channel_open:
        events = poller.poll(WATCH_INTERVAL * 1000)
        if not events and channel.closed:
            return
        for fd, _ in events:
            side = sides[fd]
            data = side.recv(_CHUNK)
            if not data:
                poller.unregister(fd)
            if side is client:
                if data:
                    channel.sendall(data)
                else:
                    client_open = False
                    channel.shutdown_write()
            elif data:
                client.sendall(data)
            else:
                channel_open = False
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)


def tunnel(
    metadata: Session | BeamtimeMetadata | str | os.PathLike[str] | None,
    node: str,
    remote_port: int,
    *,
    local_port: int = 0,
    remote_host: str = "localhost",
    **group_options: Any,
) -> Tunnel:
    """A (not yet started) :class:`Tunnel` to ``remote_port`` on one reserved ``node``.

    ``group_options`` are :func:`~mento_fab.nodes.nodes_group`'s (``ssh_config``,
    ``known_hosts``, ``host_keys``, ``connect_timeout``, ``root_dir``).
    """
    from mento_fab.nodes import nodes_group

    check_port(remote_port, "remote port")
    check_port(local_port, "local port", allow_zero=True)
    group = nodes_group(metadata, nodes=node, **group_options)
    if len(group) != 1:
        raise SelectionError(f"a tunnel goes to one node, not {len(group)} ({node})")
    return Tunnel(
        group[0],
        remote_port,
        remote_host=remote_host,
        local_port=local_port,
        own_connection=True,
    )
