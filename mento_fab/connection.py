"""One connection to one node: how it is built, opened, re-opened, and why it failed.

:func:`node_connection` makes a fabric ``Connection`` that logs in with the
beamtime key only, holds the node and its ProxyJump hops to the host-key policy
(:mod:`mento_fab.hostkeys`), and bounds every wait by one connect timeout: name
resolution, TCP connect, SSH banner, authentication and channel opening. Once
open, keepalives and ``TCP_USER_TIMEOUT`` turn a node that vanished into an error
instead of a hang. :func:`ensure_open`/:func:`open_channel` (re)open it, and
:func:`describe_error` turns any failure into the one-line reason shown per node.

>>> describe_error(ConnectionRefusedError(111, "Connection refused"))
'unreachable: connection refused'
>>> describe_error(TimeoutError(), 3)
'connect timed out after 3 s'
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import fabric
import paramiko

from mento_fab import defaults
from mento_fab.errors import BadInput, HostKeyRefused, MissingFile, NodeError
from mento_fab.hostkeys import HostKeyPolicy, KnownHosts, PolicyForNode

__all__ = [
    "NodeConnection",
    "connection_node",
    "describe_error",
    "ensure_open",
    "key_problem",
    "load_key",
    "node_connection",
    "open_channel",
    "resolve",
    "transport_factory",
]

log = logging.getLogger(__name__)

#: Read when a connection opens, so a test may shorten them.
KEEPALIVE_INTERVAL = defaults.KEEPALIVE_INTERVAL
DEAD_PEER_TIMEOUT = defaults.DEAD_PEER_TIMEOUT
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)  # Linux


def connection_node(conn: fabric.Connection) -> str:
    """The node name a Connection was made for (before ssh_config's HostName)."""
    return str(getattr(conn, "original_host", None) or conn.host)


# ----------------------------------------------------------------- the key
def key_problem(path: str) -> str | None:
    """Why ssh would refuse this private key file, or None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"key file missing: {path}"
    except OSError as exc:
        return f"key file unreadable: {path} ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return f"key file is not a regular file: {path}"
    if info.st_mode & 0o077:
        return (
            f"key file {path} is accessible by group/others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); ssh refuses it: chmod 600 {shlex.quote(path)}"
        )
    if not os.access(path, os.R_OK):
        return f"key file not readable by you: {path}"
    return None


def load_key(path: str) -> paramiko.PKey:
    """Load the temporary account's key once for a whole group (not once per node).

    A key others can read is still used (the beamtime's files are the facility's to
    fix), but every call warns, as OpenSSH complains about an unprotected key.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise MissingFile(f"SSH key not found: {path}") from None
    except OSError:
        mode = 0
    if mode & 0o077:
        log.warning(
            "WARNING: SSH key %s is accessible by group/others (mode %04o): anyone who "
            "can read it can log in as the beamtime account; chmod 600 %s",
            path,
            mode,
            shlex.quote(path),
        )
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise MissingFile(f"SSH key not found: {path}") from None
    except PermissionError:
        raise BadInput(f"SSH key not readable: {path}") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        # The exception text can quote key material: name the file and the kind only.
        raise BadInput(f"SSH key {path} could not be loaded ({type(exc).__name__})") from None


# ------------------------------------------------------------ the transport
#: Host-key algorithms that prove a key of each known_hosts type.
_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


def transport_factory(known_types: Callable[[], Iterable[str]] = tuple) -> Callable[..., Any]:
    """A paramiko ``transport_factory`` that prefers AES-GCM and the host's known key types.

    paramiko lists GCM last; with CTR it computes the MAC separately in Python for
    every packet. One AEAD call per packet takes about a fifth off the client CPU
    of a command on an open connection (measured on 32 lab nodes).

    ``known_types`` is asked at connect time which key types known_hosts holds for
    the host; those algorithms go first (as OpenSSH orders HostKeyAlgorithms), so a
    host that still has its known key proves it with that key, and one that offers
    only another type is caught as *changed* by the policy.
    """

    def factory(sock: Any, **kwargs: Any) -> paramiko.Transport:
        transport = paramiko.Transport(sock, **kwargs)
        options = transport.get_security_options()
        aead = tuple(c for c in options.ciphers if c.endswith("-gcm@openssh.com"))
        options.ciphers = aead + tuple(c for c in options.ciphers if c not in aead)
        known = [a for t in known_types() for a in _ALGORITHMS.get(t, (t,))]
        first = tuple(a for a in dict.fromkeys(known) if a in options.key_types)
        if first:
            options.key_types = first + tuple(k for k in options.key_types if k not in first)
        return transport

    return factory


# ------------------------------------------------------- bounded name lookup
def resolve(host: str, port: int, timeout: float) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` that gives up after ``timeout`` seconds.

    The C resolver has its own timeouts (5 s per server and try by default) that no
    socket option shortens, so a name that does not resolve would cost every node
    that much whatever ``--connect-timeout`` says. The lookup runs in a daemon thread;
    a lookup that outlives the timeout finishes there, unobserved.
    """
    try:  # an address needs no lookup, and no thread
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    box: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            box.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except BaseException as exc:  # handed over to the caller
            box.append(exc)
        done.set()

    threading.Thread(target=lookup, name=f"resolve-{host}", daemon=True).start()
    if not done.wait(timeout):
        raise NodeError(f"unknown host: no answer resolving {host} within {timeout:g} s")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _connect_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP socket to ``host``, resolution and connect together within ``timeout``."""
    deadline = time.monotonic() + timeout
    errors: dict[tuple[str, int], OSError] = {}
    for family, kind, proto, _, address in resolve(host, port, timeout):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                raise  # as paramiko: only a refusal tries the next address
            errors[address[:2]] = exc
    raise paramiko.ssh_exception.NoValidConnectionsError(errors)


class NodeConnection(fabric.Connection):
    """A fabric Connection with bounded name lookup, TCP_NODELAY and dead-peer detection.

    SSH sends a command as several small packets (channel open, exec, EOF); with
    Nagle's algorithm on, each waits for the server's delayed ACK, which costs
    about 40 ms per command on an open connection. Without it a ``true`` on an
    open connection takes a few milliseconds.

    Opening is serialised per Connection (:attr:`open_lock`): two threads that find
    it closed (a run started from another run's callback) get one connection, not
    two transports racing for one client.
    """

    #: Declared on the class: invoke would store a new attribute in the config.
    open_lock: threading.RLock | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_lock = threading.RLock()

    def open(self) -> Any:
        with self.open_lock or contextlib.nullcontext():
            if self.is_connected:
                return None
            return self._open()

    def _open(self) -> Any:
        sock = None
        if not self.gateway and "sock" not in self.connect_kwargs:
            timeout = self.connect_timeout or defaults.CONNECT_TIMEOUT
            sock = _connect_socket(self.host, int(self.port), timeout)
            # fabric hands connect_kwargs to paramiko: a socket given there skips
            # paramiko's own (unbounded) lookup. The lock keeps this to one caller.
            self.connect_kwargs["sock"] = sock
        try:
            result = super().open()
        except BaseException:
            if sock is not None and self.client.get_transport() is None:
                sock.close()  # paramiko never took it over
            raise
        finally:
            if sock is not None:
                self.connect_kwargs.pop("sock", None)
        tcp = getattr(self.transport, "sock", None)
        if isinstance(tcp, socket.socket):
            with contextlib.suppress(OSError):
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # A node that vanishes without a reset (power, network) fails the
                # socket once keepalives go unanswered, instead of hanging forever.
                tcp.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(DEAD_PEER_TIMEOUT * 1000))
        if self.transport is not None:
            self.transport.set_keepalive(max(1, int(KEEPALIVE_INTERVAL)))
        return result


def _hold_to_policy(
    conn: fabric.Connection, policy: HostKeyPolicy, known: KnownHosts, connect_timeout: float
) -> None:
    """One host-key decision and one set of timeouts for a node or a ProxyJump hop."""
    alias = connection_node(conn)
    checker = PolicyForNode(policy, known, alias)
    conn.client.set_missing_host_key_policy(checker)
    port = int(conn.port)
    names = [alias, conn.host if port == 22 else f"[{conn.host}]:{port}"]
    conn.connect_timeout = connect_timeout
    conn.connect_kwargs = {
        **conn.connect_kwargs,
        "banner_timeout": connect_timeout,
        "auth_timeout": connect_timeout,
        "channel_timeout": connect_timeout,
        "transport_factory": transport_factory(lambda: known.lookup(names)),
    }


def node_connection(
    node: str,
    *,
    user: str,
    key: paramiko.PKey,
    known: KnownHosts,
    policy: HostKeyPolicy | str = defaults.HOST_KEYS,
    config: fabric.Config | None = None,
    connect_timeout: float = defaults.CONNECT_TIMEOUT,
    extra_keys: Iterable[str] = (),
    allow_agent: bool = False,
) -> NodeConnection:
    """A Connection to ``node`` as ``user`` with ``key`` only, under the host-key ``policy``.

    ``config`` (one ``fabric.Config`` shared by a group, so ssh_config is parsed
    once) supplies HostName, Port, ProxyJump. Not opened yet.
    """
    conn = NodeConnection(
        node, user=user, config=config, connect_timeout=connect_timeout, connect_kwargs={}
    )
    # Its own dict (a Group shares one), and ssh_config's IdentityFile must not add keys.
    conn.connect_kwargs = {"pkey": key, "allow_agent": allow_agent, "look_for_keys": False}
    if extra_keys:
        conn.connect_kwargs["key_filename"] = list(extra_keys)
    policy = HostKeyPolicy(policy)
    _hold_to_policy(conn, policy, known, connect_timeout)
    # ProxyJump hops are Connections fabric builds itself, with AutoAddPolicy and
    # paramiko's own name lookup: same policy, same timeouts, same socket handling.
    hop = conn.gateway
    while isinstance(hop, fabric.Connection):
        hop.__class__ = NodeConnection  # adds behaviour and a lock only
        hop.open_lock = threading.RLock()
        _hold_to_policy(hop, policy, known, connect_timeout)
        hop = hop.gateway
    return conn


# ------------------------------------------------------------ open, re-open
def ensure_open(conn: fabric.Connection) -> paramiko.Transport:
    """Open the connection if needed (reconnecting after a drop) and return its transport.

    Check, close and open happen under the Connection's lock (a NodeConnection's;
    a caller's plain Connection has none), so a thread never closes a connection
    another thread has just opened.
    """
    with getattr(conn, "open_lock", None) or contextlib.nullcontext():
        if not conn.is_connected:
            if conn.transport is not None:  # dropped: start over with a fresh client state
                conn.close()
            try:
                conn.open()
            except paramiko.SSHException as exc:
                # paramiko reports a failed handshake as "No existing session"; the
                # transport kept the real reason (e.g. no banner from a non-SSH server).
                transport = conn.client.get_transport()
                saved = getattr(transport, "saved_exception", None)
                if saved is not None and saved is not exc:
                    raise NodeError(describe_error(saved, conn.connect_timeout)) from None
                raise
        transport = conn.client.get_transport()
    if transport is None:
        raise NodeError("unreachable: no transport after connect")
    return transport


def open_channel(conn: fabric.Connection) -> paramiko.Channel:
    """A new session channel on the Connection (opened or re-opened as needed).

    Nothing has reached the node's shell yet when this returns or raises.
    """
    return ensure_open(conn).open_session(timeout=conn.connect_timeout)


def describe_error(exc: BaseException, timeout: float | None = None) -> str:
    """A one-line reason for a node failure, without a traceback or any secret."""
    if isinstance(exc, NodeError | HostKeyRefused):
        return str(exc)
    if isinstance(exc, paramiko.AuthenticationException):
        return "authentication failed (key not accepted for this account)"
    if isinstance(exc, paramiko.BadHostKeyException):
        return f"host key changed ({exc})"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        reasons = {e.strerror or str(e) for e in exc.errors.values()}
        return "unreachable: " + "; ".join(sorted(reasons)).lower()
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"connect timed out after {timeout:g} s" if timeout else "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "unreachable: connection refused"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, paramiko.SSHException):
        text = str(exc)
        within = f" within {timeout:g} s" if timeout else ""
        if "banner" in text.lower():
            return f"no SSH server answered (no SSH banner{within})"
        if text == "No existing session":  # the handshake outlived paramiko's start timeout
            return f"no SSH handshake{within} (not an SSH server, or overloaded)"
        return f"ssh error: {text}"
    if isinstance(exc, OSError):
        return f"unreachable: {exc.strerror or exc}".lower()
    if isinstance(exc, EOFError):
        return "connection closed by the node"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
