"""The beamtime objects (the original ``mento.metadata`` dataclasses) and their one constructor.

The dataclasses keep the original's names, fields and defaults. :func:`from_dict`
is the only way mento_fab turns plain data into them: the schemas call it on
freshly validated data and the metadata cache on what it stored, so a cached
object can never be built by rules other than a validated one. It re-checks
every name and path against :mod:`mento_fab.names` (cheap: no marshmallow), so
plain data from anywhere (a cache entry, a caller) cannot smuggle in a name
that a command line would interpret.

>>> md = from_dict({"beamline": "p11", "beamtime": "1", "corefs_path": "/asap3/x",
...                 "tag": "current", "online": None, "asapo": None})
>>> md.beamtime, from_dict(to_dict(md)) == md
('1', True)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mento_fab.errors import BadInput
from mento_fab.names import BEAMLINE_RE, CONTROL_RE, HOSTNAME_RE, IDENTIFIER_RE, USERNAME_RE

__all__ = [
    "TAGS",
    "AsapoInfo",
    "BeamtimeMetadata",
    "OnlineInfo",
    "SSHInfo",
    "SlurmInfo",
    "from_dict",
    "to_dict",
]

#: Session kinds, named after the directory the session lives in.
TAGS = ("current", "commissioning")


@dataclass
class SSHInfo:
    """Contains authentication information for remotely connecting to reserved nodes via SSH."""

    user: str  # Temporary user, only available during beamtime (if reserved)
    key: str  # Absolute path of the private key file; its contents are never read here


@dataclass
class SlurmInfo:
    """Contains details of Slurm resource allocation, including reservation and partition."""

    partition: str
    reservation: str


@dataclass
class AsapoInfo:
    """Contains connection details for ASAPO (token *file paths*, never tokens)."""

    endpoint: str
    token_ro: str
    token_rw: str


@dataclass
class OnlineInfo:
    """Contains SSH, Slurm, temporary beamline filesystem info, names of reserved nodes."""

    ssh: SSHInfo
    slurm: SlurmInfo
    nodes: list = field(default_factory=list)  # Nodes reserved for beamtime duration
    blfs_mountpoint: str | None = None  # Beamline filesystem mounted on reserved nodes


@dataclass
class BeamtimeMetadata:
    """Contains all relevant metadata about current beamtime, and computing resources
    allocated to the beamtime for online processing."""

    beamline: str
    beamtime: str
    corefs_path: str
    tag: str  # 'current' or 'commissioning'
    online: OnlineInfo | None = None
    asapo: AsapoInfo | None = None


def to_dict(md: BeamtimeMetadata) -> dict[str, Any]:
    """The object as plain data (JSON-ready), the form :func:`from_dict` takes."""
    return dataclasses.asdict(md)


def _name(data: Mapping[str, Any], key: str, rule: re.Pattern[str], where: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not rule.match(value):
        raise BadInput(f"{where}{key}: not a valid name")
    return value


def _text(data: Mapping[str, Any], key: str, where: str, *, absolute: bool = False) -> str:
    value = data[key]
    if not isinstance(value, str) or not value or CONTROL_RE.search(value):
        raise BadInput(f"{where}{key}: not a valid text value")
    if absolute and not os.path.isabs(value):
        raise BadInput(f"{where}{key}: not an absolute path")
    return value


def _online(data: Mapping[str, Any]) -> OnlineInfo:
    nodes = data["nodes"]
    if not isinstance(nodes, list) or not nodes:
        raise BadInput("online.nodes: not a non-empty list")
    for node in nodes:
        if not isinstance(node, str) or not HOSTNAME_RE.match(node):
            raise BadInput("online.nodes: not a valid host name")
    ssh, slurm = data["ssh"], data["slurm"]
    mountpoint = data["blfs_mountpoint"]
    return OnlineInfo(
        ssh=SSHInfo(
            user=_name(ssh, "user", USERNAME_RE, "online.ssh."),
            key=_text(ssh, "key", "online.ssh.", absolute=True),
        ),
        slurm=SlurmInfo(
            partition=_name(slurm, "partition", IDENTIFIER_RE, "online.slurm."),
            reservation=_name(slurm, "reservation", IDENTIFIER_RE, "online.slurm."),
        ),
        nodes=list(nodes),
        blfs_mountpoint=None
        if mountpoint is None
        else _text(data, "blfs_mountpoint", "online.", absolute=True),
    )


def _asapo(data: Mapping[str, Any]) -> AsapoInfo:
    return AsapoInfo(
        endpoint=_text(data, "endpoint", "asapo."),
        token_ro=_text(data, "token_ro", "asapo.", absolute=True),
        token_rw=_text(data, "token_rw", "asapo.", absolute=True),
    )


def from_dict(data: Mapping[str, Any]) -> BeamtimeMetadata:
    """Build :class:`BeamtimeMetadata` from plain data shaped as :func:`to_dict` gives it.

    Raises :class:`~mento_fab.errors.BadInput` for a name or path that breaks its
    rule, ``KeyError``/``TypeError`` for data of the wrong shape.
    """
    tag = data["tag"]
    if tag not in TAGS:
        raise BadInput("tag: neither 'current' nor 'commissioning'")
    online, asapo = data["online"], data["asapo"]
    return BeamtimeMetadata(
        beamline=_name(data, "beamline", BEAMLINE_RE, ""),
        beamtime=_name(data, "beamtime", IDENTIFIER_RE, ""),
        corefs_path=_text(data, "corefs_path", ""),
        tag=tag,
        online=None if online is None else _online(online),
        asapo=None if asapo is None else _asapo(asapo),
    )
