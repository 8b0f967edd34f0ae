"""Which nodes: selection inside the reservation, and the fabric group over them.

``nodes_group()`` is the library call users asked for. It returns a plain
``fabric.ThreadingGroup`` (or ``SerialGroup``) of :func:`~mento_fab.connection.node_connection`
Connections: logged in as the temporary account with its key only, honouring
ssh_config, failing fast on a dead node and never trusting a changed host key.

Node sets use ClusterShell's syntax (``cn[01-03,07]``, ``!`` to leave out), checked
for size before they are expanded: ``cn[1-99999999]`` is refused at once rather
than built in memory.

>>> select_nodes(["cn01", "cn02", "cn03"], "cn[01-02]")
['cn01', 'cn02']
>>> node_count("cn[1-10],cn[20-29/2],x[1-2]-[1-3]")
21
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import fabric
import paramiko
from ClusterShell.NodeSet import NodeSet

from mento_fab import defaults
from mento_fab.connection import connection_node, load_key, node_connection
from mento_fab.errors import (
    BadInput,
    HostKeyRefused,
    MentoError,
    MissingFile,
    NoOnlineAnalysis,
    SelectionError,
)
from mento_fab.hostkeys import SYSTEM_KNOWN_HOSTS, HostKeyPolicy, KnownHosts
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.names import printable
from mento_fab.session import Session

# HostKeyPolicy, HostKeyRefused, KnownHosts, SelectionError and connection_node are
# re-exported for callers of the earlier layout; they live in hostkeys/errors/connection.
__all__ = [
    "HostKeyPolicy",
    "HostKeyRefused",
    "KnownHosts",
    "SelectionError",
    "connection_node",
    "fold",
    "node_count",
    "nodes_group",
    "select_nodes",
]


def fold(nodes: Iterable[str]) -> str:
    """``["cn01", "cn02", "cn03"]`` as ``cn[01-03]``."""
    return str(NodeSet.fromlist(list(nodes)))


def _top_level(pattern: str, separators: str) -> list[str]:
    """``pattern`` split at ``separators`` outside brackets."""
    parts, depth, current = [], 0, []
    for char in pattern:
        depth += (char == "[") - (char == "]")
        if depth == 0 and char in separators:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?(?:/\s*(\d+)\s*)?$")


def _range_size(text: str) -> int:
    """Members of one RangeSet item (``7``, ``1-9``, ``0-10/2``, ``-3--1``)."""
    match = _RANGE.match(text)
    if match is None:
        raise SelectionError(f"bad range {text.strip()!r} in a node set")
    first, last, step = match.groups()
    if last is None:
        return 1
    return max(0, (int(last) - int(first)) // max(1, int(step or 1)) + 1)


def node_count(pattern: str) -> int:
    """How many names ``pattern`` names at most, computed without expanding it.

    ClusterShell's RangeSet is a set of strings: ``cn[1-99999999]`` would be built
    name by name (gigabytes, a minute) before anything could refuse it. Every
    operand of ``,``/``!``/``&``/``^`` is counted as if added.
    """
    total = 0
    for part in _top_level(pattern, ",!&^"):
        size, depth, body = 1, 0, []
        for char in part:
            if char == "]" and depth == 1:
                size *= sum(_range_size(item) for item in "".join(body).split(","))
                body = []
            elif depth == 1:
                body.append(char)
            depth += (char == "[") - (char == "]")
        total += size
    return total


def _node_set(pattern: str, what: str) -> NodeSet:
    """A NodeSet from user input, refused when too large or not plain names."""
    shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
    if "@" in pattern:
        raise SelectionError(f"{what} {shown!r}: node groups (@...) are not supported")
    try:
        count = node_count(pattern)
    except SelectionError as exc:
        raise SelectionError(f"bad {what} {shown!r}: {exc}") from None
    if count > defaults.MAX_NODES:
        raise SelectionError(
            f"{what} {shown!r} names {count} nodes; at most {defaults.MAX_NODES} are accepted"
        )
    try:
        return NodeSet(pattern)
    except Exception as exc:  # ClusterShell's parse errors have no common base
        raise SelectionError(f"bad {what} {shown!r}: {exc}") from None


def select_nodes(
    reserved: Iterable[str], nodes: str | None = None, exclude: str | None = None
) -> list[str]:
    """Pick nodes out of the reservation with ClusterShell node-set syntax.

    Duplicates are dropped and order follows the node set; a node outside the
    reservation is refused rather than silently contacted.
    """
    reserved_set = NodeSet.fromlist(list(reserved))
    chosen = _node_set(nodes, "node set") if nodes else NodeSet(reserved_set)
    if exclude:
        chosen.difference_update(_node_set(exclude, "excluded node set"))
    outside = chosen.difference(reserved_set)
    if outside:
        raise SelectionError(
            f"not reserved for this beamtime: {outside} (reserved: {reserved_set})"
        )
    if not chosen:
        raise SelectionError("no nodes selected")
    return list(chosen)


def _check_ssh_options(options: paramiko.SSHConfigDict, node: str, where: str) -> None:
    """Refuse the ssh_config values fabric would choke on (``int("notaport")``), naming the key.

    OpenSSH refuses such a file too; without this, fabric's ``ValueError``/``KeyError``
    escaped as an internal error.
    """
    port = options.get("port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise BadInput(f"{where}: Port {port!r} (for {node}) is not a port number")
    forward = options.get("forwardagent")
    if forward is not None and forward not in ("yes", "no"):
        raise BadInput(f"{where}: ForwardAgent {forward!r} (for {node}) is not yes or no")


def nodes_group(
    metadata: Session | BeamtimeMetadata | str | os.PathLike[str] | None = None,
    *,
    nodes: str | Iterable[str] | None = None,
    exclude: str | None = None,
    root_dir: str | os.PathLike[str] | None = None,
    ssh_config: str | os.PathLike[str] | None = None,
    known_hosts: str | os.PathLike[str] | None = None,
    host_keys: HostKeyPolicy | str = defaults.HOST_KEYS,
    connect_timeout: float = defaults.CONNECT_TIMEOUT,
    serial: bool = False,
    extra_keys: Iterable[str] = (),
    allow_agent: bool = False,
) -> fabric.ThreadingGroup | fabric.SerialGroup:
    """A fabric group over the beamtime's reserved nodes, logged in as the temporary account.

    ``metadata`` is a :class:`Session`, a :class:`BeamtimeMetadata`, a metadata file,
    or ``None`` for the active session under ``root_dir``. ``nodes``/``exclude``
    select with node-set syntax (``cn[01-03]``) inside the reservation. ``ssh_config``
    (else ``$MENTO_SSH_CONFIG``, else the usual files) is honoured for HostName, Port,
    ProxyJump, UserKnownHostsFile and GlobalKnownHostsFile; only the beamtime key is
    offered unless ``extra_keys``/``allow_agent`` say otherwise. Every wait (name
    lookup, TCP, banner, auth, channel) is bounded by ``connect_timeout``.
    """
    md = Session.load(metadata, root_dir).metadata
    if md.online is None:
        raise NoOnlineAnalysis(md.beamtime)
    if nodes is not None and not isinstance(nodes, str):
        nodes = ",".join(nodes)
    selected = select_nodes(md.online.nodes, nodes, exclude)
    policy = HostKeyPolicy(host_keys)
    key = load_key(md.online.ssh.key)

    ssh_config = ssh_config or os.environ.get("MENTO_SSH_CONFIG") or None
    if ssh_config is not None and not Path(ssh_config).is_file():
        raise MissingFile(f"ssh_config not found: {ssh_config}")
    where = str(ssh_config) if ssh_config else "ssh_config (~/.ssh/config, /etc/ssh/ssh_config)"
    # One Config for all nodes: fabric would parse the ssh_config files once per Connection.
    try:
        config = fabric.Config(runtime_ssh_path=str(ssh_config) if ssh_config else None)
    except paramiko.ConfigParseError as exc:  # an unparsable line (quoted in the message)
        raise BadInput(f"{where}: {printable(str(exc))}") from None
    first = config.base_ssh_config.lookup(selected[0])
    if known_hosts is None:
        # Per-host UserKnownHostsFile is honoured through the first node's lookup.
        files = first.get("userknownhostsfile")
        known_hosts = files.split()[0] if files else "~/.ssh/known_hosts"
    system = first.get("globalknownhostsfile")
    known = KnownHosts(known_hosts, system.split() if system else SYSTEM_KNOWN_HOSTS)

    try:
        for node in selected:
            _check_ssh_options(config.base_ssh_config.lookup(node), node, where)
        connections = [
            node_connection(
                node,
                user=md.online.ssh.user,
                key=key,
                known=known,
                policy=policy,
                config=config,
                connect_timeout=connect_timeout,
                extra_keys=extra_keys,
                allow_agent=allow_agent,
            )
            for node in selected
        ]
    except MentoError:
        raise
    # fabric's own conversions (a ProxyJump hop's port), paramiko's Match/token expansion
    except (ValueError, KeyError, paramiko.ConfigParseError) as exc:
        problem = printable(f"{type(exc).__name__}: {exc}")
        raise BadInput(f"{where}: a setting fabric cannot use ({problem})") from None
    group_class = fabric.SerialGroup if serial else fabric.ThreadingGroup
    return group_class.from_connections(connections)
