"""The OpenSSH command line that reaches a node exactly as every other task does.

``mento-fab ssh`` hands the terminal to the real ``ssh`` client (an interactive
login needs its pty handling, escape characters and agent-free key handling);
this module builds its argument vector from the same settings a
:func:`~mento_fab.nodes.nodes_group` uses: the beamtime account and only its key
(``-i`` plus ``IdentitiesOnly``, no agent; an ssh_config ``IdentityFile``
would still be offered after it), the ssh_config file, the known_hosts
file, the host-key policy (``StrictHostKeyChecking``), the connect timeout and the
keepalives. The key's *path* goes on the command line, never its contents.

OpenSSH refuses a changed host key under ``accept-new`` and ``strict``, also one of
another type than the key it knows for the node (an attacker offering only a new
key type is not "new").

>>> from mento_fab.metadata import BeamtimeMetadata, OnlineInfo, SSHInfo, SlurmInfo
>>> md = BeamtimeMetadata("p11", "1", "/asap3/p11/1", "current",
...     OnlineInfo(SSHInfo("bt01", "/gpfs/current/shared/id_rsa"),
...                       SlurmInfo("p", "r"), ["cn01", "cn02"]))
>>> argv = ssh_argv(md, "cn02", "hostname", check_files=False)
>>> argv[:3], argv[-3:]
(['ssh', '-l', 'bt01'], ['--', 'cn02', 'hostname'])
>>> argv[3:5]
['-i', '/gpfs/current/shared/id_rsa']
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mento_fab import defaults
from mento_fab.errors import BadInput, MissingFile, SelectionError
from mento_fab.hostkeys import HostKeyPolicy
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.nodes import select_nodes
from mento_fab.session import Session

__all__ = ["STRICT_HOST_KEY_CHECKING", "ssh_argv"]

#: mento_fab's host-key policy in OpenSSH's words.
STRICT_HOST_KEY_CHECKING = {
    HostKeyPolicy.ACCEPT_NEW: "accept-new",
    HostKeyPolicy.STRICT: "yes",
    HostKeyPolicy.OFF: "no",
}


def _file_option(name: str, path: str | os.PathLike[str]) -> str:
    """``Name=path`` for ``-o``/``-i``: OpenSSH expands ``%`` tokens in these paths."""
    text = str(path)
    if "${" in text or '"' in text:
        raise BadInput(f"{name}: OpenSSH cannot take this path literally: {text!r}")
    text = text.replace("%", "%%")
    if any(c.isspace() for c in text):
        text = f'"{text}"'
    return f"{name}={text}"


def ssh_argv(
    metadata: Session | BeamtimeMetadata | str | os.PathLike[str] | None,
    node: str,
    command: str | None = None,
    *,
    ssh_config: str | os.PathLike[str] | None = None,
    known_hosts: str | os.PathLike[str] | None = None,
    host_keys: HostKeyPolicy | str = defaults.HOST_KEYS,
    connect_timeout: float = defaults.CONNECT_TIMEOUT,
    tty: bool | None = None,
    check_files: bool = True,
    program: str = "ssh",
) -> list[str]:
    """The ``ssh`` argument vector for ``node`` (one reserved node), optionally running ``command``.

    ``ssh_config`` (else ``$MENTO_SSH_CONFIG``, else OpenSSH's own files) is passed
    with ``-F``; ``known_hosts`` (else the ssh_config's or OpenSSH's default) as
    ``UserKnownHostsFile``. ``tty`` forces (``-t``) or forbids (``-T``) a terminal;
    ``None`` leaves it to ssh (a terminal for a login, none for a command).
    A node outside the reservation raises :class:`~mento_fab.errors.SelectionError`.
    """
    session = Session.load(metadata)
    online = session.online
    chosen = select_nodes(online.nodes, node)
    if len(chosen) != 1:
        raise SelectionError(f"ssh takes one node, not {len(chosen)} ({node})")
    policy = HostKeyPolicy(host_keys)
    ssh_config = ssh_config or os.environ.get("MENTO_SSH_CONFIG") or None
    if check_files:
        if not Path(online.ssh.key).is_file():
            raise MissingFile(f"SSH key not found: {online.ssh.key}")
        if ssh_config is not None and not Path(ssh_config).is_file():
            raise MissingFile(f"ssh_config not found: {ssh_config}")
    if not 0 < connect_timeout < 1e9:
        raise BadInput(f"connect timeout must be a positive number, not {connect_timeout!r}")
    interval = max(1, int(defaults.KEEPALIVE_INTERVAL))
    argv = [program]
    if ssh_config is not None:
        argv += ["-F", str(ssh_config)]
    argv += ["-l", online.ssh.user]
    if tty is not None:
        argv.append("-t" if tty else "-T")
    key = online.ssh.key
    if "${" in key:
        raise BadInput(f"OpenSSH cannot take this key path literally: {key!r}")
    argv += [
        "-i", key.replace("%", "%%"),  # ssh expands % tokens in key paths
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "BatchMode=yes",
        "-o", f"StrictHostKeyChecking={STRICT_HOST_KEY_CHECKING[policy]}",
        "-o", f"ConnectTimeout={math.ceil(connect_timeout)}",
        "-o", f"ServerAliveInterval={interval}",
        "-o", f"ServerAliveCountMax={max(1, math.ceil(defaults.DEAD_PEER_TIMEOUT / interval))}",
    ]  # fmt: skip
    if known_hosts is not None:
        argv += ["-o", _file_option("UserKnownHostsFile", Path(known_hosts).expanduser())]
    argv += ["--", chosen[0]]
    if command:
        argv.append(command)
    return argv
