"""Which nodes, and how to reach them: the fabric group over a beamtime's reserved nodes.

``nodes_group()`` is the library call users asked for. It returns a plain
``fabric.ThreadingGroup`` (or ``SerialGroup``) whose Connections log in as the
temporary account with its key only, honour ssh_config, fail fast on a dead
node and never trust a changed host key. Two fabric traps are avoided here:
each Connection gets its own ``connect_kwargs`` dict (a Group shares and mutates
one), and unknown host keys follow an explicit policy instead of fabric's
silent ``AutoAddPolicy``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

import fabric
import paramiko
from ClusterShell.NodeSet import NodeSet, NodeSetParseError

from mento_fab.metadata import BeamtimeMetadata, get_beamtime_metadata, parse_metadata_file

__all__ = [
    "HostKeyPolicy",
    "HostKeyRefused",
    "KnownHosts",
    "NodeConnection",
    "SelectionError",
    "connection_node",
    "fold",
    "load_metadata",
    "nodes_group",
    "select_nodes",
]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds between SSH keepalives on an open connection.
KEEPALIVE_INTERVAL = 15.0
#: Seconds of unacknowledged data after which a connection counts as dead.
DEAD_PEER_TIMEOUT = 60.0
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)  # Linux


class SelectionError(ValueError):
    """A node selection that cannot be honoured (bad syntax, outside the reservation)."""


class HostKeyRefused(paramiko.SSHException):
    """A host key that the policy does not accept; the message says what to check."""


class HostKeyPolicy(StrEnum):
    """What to do with host keys, in the words of OpenSSH's StrictHostKeyChecking."""

    ACCEPT_NEW = "accept-new"  # record unknown keys, refuse changed ones
    STRICT = "strict"  # refuse unknown and changed keys
    OFF = "off"  # accept anything (warns loudly)


def fold(nodes: Iterable[str]) -> str:
    """``["cn01", "cn02", "cn03"]`` as ``cn[01-03]``."""
    return str(NodeSet.fromlist(list(nodes)))


def select_nodes(
    reserved: Iterable[str], nodes: str | None = None, exclude: str | None = None
) -> list[str]:
    """Pick nodes out of the reservation with ClusterShell node-set syntax.

    Duplicates are dropped and order follows the node set; a node outside the
    reservation is refused rather than silently contacted.
    """
    reserved_set = NodeSet.fromlist(list(reserved))
    try:
        chosen = NodeSet(nodes) if nodes else NodeSet(reserved_set)
        if exclude:
            chosen.difference_update(NodeSet(exclude))
    except (NodeSetParseError, ValueError) as exc:
        raise SelectionError(f"bad node set: {exc}") from None
    outside = chosen.difference(reserved_set)
    if outside:
        raise SelectionError(
            f"not reserved for this beamtime: {outside} (reserved: {reserved_set})"
        )
    if not chosen:
        raise SelectionError("no nodes selected")
    return list(chosen)


def load_metadata(
    metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
    root_dir: str | os.PathLike[str] | None = None,
) -> BeamtimeMetadata:
    """A metadata object from an object, a file, or the active session (a file wins).

    With neither given, ``$MENTO_METADATA`` then ``$MENTO_ROOT_DIR`` (then ``/gpfs``)
    apply, as for the command line.
    """
    if isinstance(metadata, BeamtimeMetadata):
        return metadata
    if metadata is None and root_dir is None:
        metadata = os.environ.get("MENTO_METADATA") or None
    if metadata is not None:
        return parse_metadata_file(metadata)
    if root_dir is None:
        root_dir = os.environ.get("MENTO_ROOT_DIR") or "/gpfs"
    return get_beamtime_metadata(root_dir)


def connection_node(conn: fabric.Connection) -> str:
    """The node name a Connection was made for (before ssh_config's HostName)."""
    return str(getattr(conn, "original_host", None) or conn.host)


#: Where clusters publish their nodes' keys (OpenSSH's GlobalKnownHostsFile default).
SYSTEM_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


class KnownHosts:
    """The user's known_hosts file plus the system-wide ones, parsed once per group.

    New keys are appended to the user's file under a lock, like OpenSSH does:
    paramiko's ``save_host_keys`` rewrites the whole file from one client's
    memory, and with 32 clients in threads that loses lines. The system files
    (where admins publish node keys) are only read.
    """

    def __init__(
        self, path: str | os.PathLike[str], system_files: Iterable[str] = SYSTEM_KNOWN_HOSTS
    ) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._tables = [paramiko.HostKeys(), paramiko.HostKeys()]  # user's, system's
        for table, files in ((self._tables[0], [self.path]), (self._tables[1], system_files)):
            for file in map(Path, files):
                if not file.is_file():
                    continue
                try:
                    table.load(str(file))
                except (OSError, paramiko.SSHException) as exc:
                    log.warning("%s: could not read known hosts: %s", file, exc)

    def lookup(self, names: Iterable[str]) -> dict[str, list[paramiko.PKey]]:
        """Every known key of each key type recorded for any of ``names``."""
        found: dict[str, list[paramiko.PKey]] = {}
        with self._lock:
            for table in self._tables:
                for name in names:
                    entry = table.lookup(name)
                    for keytype in entry or ():
                        found.setdefault(keytype, []).append(entry[keytype])
        return found

    def add(self, names: list[str], key: paramiko.PKey) -> None:
        line = f"{','.join(names)} {key.get_name()} {key.get_base64()}\n"
        with self._lock:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(self.path, "a", encoding="ascii") as handle:
                    handle.write(line)
            except OSError as exc:
                raise HostKeyRefused(
                    f"cannot record the host key of {names[0]} in {self.path}: "
                    f"{exc.strerror or exc}"
                ) from None
            for name in names:
                self._tables[0].add(name, key.get_name(), key)


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


class _PolicyForNode(paramiko.MissingHostKeyPolicy):
    """Checks a node's host key against known_hosts under its alias and its address.

    No keys are loaded into the paramiko client, so paramiko always asks here and
    the decision (including "changed") is made in one place.
    """

    def __init__(self, policy: HostKeyPolicy, known: KnownHosts, alias: str) -> None:
        self.policy = policy
        self.known = known
        self.alias = alias

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        names = list(dict.fromkeys([self.alias, hostname]))
        if self.policy is HostKeyPolicy.OFF:
            log.warning(
                "host key checking is OFF: %s presented %s and was trusted blindly",
                self.alias,
                _fingerprint(key),
            )
            return
        expected = self.known.lookup(names).get(key.get_name())
        if expected:
            if key in expected:
                return
            raise HostKeyRefused(
                f"host key of {self.alias} CHANGED: it presents {_fingerprint(key)}, "
                f"{self.known.path} has {_fingerprint(expected[0])}. If the node was reinstalled, "
                f"check with the cluster admins and remove the old key "
                f"(ssh-keygen -R {self.alias} -f {self.known.path}); otherwise someone may be "
                "intercepting the connection."
            )
        if self.policy is HostKeyPolicy.STRICT:
            raise HostKeyRefused(
                f"unknown host key of {self.alias} ({_fingerprint(key)}) and host keys are "
                f"strict: add it to {self.known.path} or use --host-keys accept-new"
            )
        log.info(
            "recording new host key of %s (%s) in %s",
            self.alias,
            _fingerprint(key),
            self.known.path,
        )
        self.known.add(names, key)


class NodeConnection(fabric.Connection):
    """A fabric Connection that sets TCP_NODELAY once open.

    SSH sends a command as several small packets (channel open, exec, EOF); with
    Nagle's algorithm on, each waits for the server's delayed ACK, which costs
    about 40 ms per command on an open connection. Without it a ``true`` on an
    open connection takes a few milliseconds.
    """

    def open(self) -> Any:
        result = super().open()
        sock = getattr(self.transport, "sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # A node that vanishes without a reset (power, network) fails the
                # socket once keepalives go unanswered, instead of hanging forever.
                sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(DEAD_PEER_TIMEOUT * 1000))
        if self.transport is not None:
            self.transport.set_keepalive(max(1, int(KEEPALIVE_INTERVAL)))
        return result


def _transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """A Transport that prefers AES-GCM when the server offers it.

    paramiko lists GCM last; with CTR it computes the MAC separately in Python for
    every packet. One AEAD call per packet takes about a fifth off the client CPU
    of a command on an open connection (measured on 32 lab nodes).
    """
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    aead = tuple(c for c in options.ciphers if c.endswith("-gcm@openssh.com"))
    options.ciphers = aead + tuple(c for c in options.ciphers if c not in aead)
    return transport


def _load_key(path: str) -> paramiko.PKey:
    """Load the temporary account's key once for the whole group (not once per node)."""
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"SSH key not found: {path}") from None
    except PermissionError:
        raise PermissionError(f"SSH key not readable: {path}") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        # The exception text can quote key material: name the file and the kind only.
        raise ValueError(f"SSH key {path} could not be loaded ({type(exc).__name__})") from None


def nodes_group(
    metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
    *,
    nodes: str | Iterable[str] | None = None,
    exclude: str | None = None,
    root_dir: str | os.PathLike[str] | None = None,
    ssh_config: str | os.PathLike[str] | None = None,
    known_hosts: str | os.PathLike[str] | None = None,
    host_keys: HostKeyPolicy | str = HostKeyPolicy.ACCEPT_NEW,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    serial: bool = False,
    extra_keys: Iterable[str] = (),
    allow_agent: bool = False,
) -> fabric.ThreadingGroup | fabric.SerialGroup:
    """A fabric group over the beamtime's reserved nodes, logged in as the temporary account.

    ``metadata`` is a :class:`BeamtimeMetadata`, a metadata file, or ``None`` for
    the active session under ``root_dir``. ``nodes``/``exclude`` select with node-set
    syntax (``cn[01-03]``) inside the reservation. ``ssh_config`` (else
    ``$MENTO_SSH_CONFIG``, else the usual files) is honoured for HostName, Port,
    ProxyJump and UserKnownHostsFile; only the beamtime key is offered unless
    ``extra_keys``/``allow_agent`` say otherwise. Every timeout (TCP, banner,
    auth, channel) is ``connect_timeout`` so a dead node never hangs the caller.
    """
    md = load_metadata(metadata, root_dir)
    if md.online is None:
        raise SelectionError(
            f"beamtime {md.beamtime} has no onlineAnalysis block: no compute nodes were reserved"
        )
    if nodes is not None and not isinstance(nodes, str):
        nodes = ",".join(nodes)
    selected = select_nodes(md.online.nodes, nodes, exclude)
    policy = HostKeyPolicy(host_keys)
    key = _load_key(md.online.ssh.key)

    ssh_config = ssh_config or os.environ.get("MENTO_SSH_CONFIG") or None
    if ssh_config is not None and not Path(ssh_config).is_file():
        raise FileNotFoundError(f"ssh_config not found: {ssh_config}")
    # One Config for all nodes: fabric would parse the ssh_config files once per Connection.
    config = fabric.Config(runtime_ssh_path=str(ssh_config) if ssh_config else None)
    if known_hosts is None:
        # Per-host UserKnownHostsFile is honoured through the first node's lookup.
        files = config.base_ssh_config.lookup(selected[0]).get("userknownhostsfile")
        known_hosts = files.split()[0] if files else "~/.ssh/known_hosts"
    system = config.base_ssh_config.lookup(selected[0]).get("globalknownhostsfile")
    known = KnownHosts(known_hosts, system.split() if system else SYSTEM_KNOWN_HOSTS)

    connections = []
    for node in selected:
        conn = NodeConnection(
            node,
            user=md.online.ssh.user,
            config=config,
            connect_timeout=connect_timeout,
            connect_kwargs={},
        )
        # Own dict per Connection; and ssh_config's IdentityFile must not add keys.
        conn.connect_kwargs = {
            "pkey": key,
            "key_filename": list(extra_keys),
            "allow_agent": allow_agent,
            "look_for_keys": False,
            "banner_timeout": connect_timeout,
            "auth_timeout": connect_timeout,
            "channel_timeout": connect_timeout,
            "transport_factory": _transport,
        }
        if not conn.connect_kwargs["key_filename"]:
            del conn.connect_kwargs["key_filename"]
        conn.client.set_missing_host_key_policy(_PolicyForNode(policy, known, node))
        # ProxyJump hops are Connections fabric builds itself, with AutoAddPolicy:
        # hold them to the same host-key policy.
        hop = conn.gateway
        while isinstance(hop, fabric.Connection):
            hop.client.set_missing_host_key_policy(
                _PolicyForNode(policy, known, connection_node(hop))
            )
            hop.connect_timeout = connect_timeout
            hop.connect_kwargs = {
                **hop.connect_kwargs,
                **{k: connect_timeout for k in ("banner_timeout", "auth_timeout")},
                "channel_timeout": connect_timeout,
            }
            hop = hop.gateway
        connections.append(conn)
    group_class = fabric.SerialGroup if serial else fabric.ThreadingGroup
    return group_class.from_connections(connections)
