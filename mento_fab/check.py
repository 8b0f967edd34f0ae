"""Is the beamtime ready? Metadata, key file and every node, checked in one pass.

Each node is asked once: connect and log in, one shell line that tests the home
directory and the beamline filesystem mount, then one timed round trip on the
open connection. Each node's outcome is a :class:`NodeCheck`, a
:class:`~mento_fab.results.NodeResult` with the check's own findings, so the
summary and the exit status follow the same rule as every other command:

- exit 0: logged in, home writable (the node is ready);
- exit 1: logged in but not ready (``message`` says why);
- no exit, ``error`` set: never reached or never logged in (counts as 255).

A key file others can read makes the whole report fail (exit 1) even when
every node is ready: ssh itself would refuse such a key.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from typing import Any

import fabric
import paramiko

from mento_fab import defaults
from mento_fab.connection import connection_node, describe_error, ensure_open, key_problem
from mento_fab.errors import NoOnlineAnalysis
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.results import NodeResult, RunReport, exit_status
from mento_fab.runner import execute, map_nodes

__all__ = ["CheckReport", "NodeCheck", "check_beamtime", "key_problem"]

_PROBE = (
    'f=$(mktemp "$HOME/.mento-check.XXXXXX" 2>/dev/null) && rm -f "$f" && echo home=ok; '
    "test -d {blfs} && echo blfs=ok; exit 0"
)
#: Seconds the probe line may take on a logged-in node.
PROBE_TIMEOUT = 30.0


@dataclass
class NodeCheck(NodeResult):
    """One node's check: a NodeResult plus what was found on the node."""

    reachable: bool = False
    login: bool = False
    rtt: float | None = None  # seconds for one command on the open connection
    home_writable: bool | None = None
    blfs_mounted: bool | None = None

    @property
    def ready(self) -> bool:
        return self.login and bool(self.home_writable)

    @property
    def warnings(self) -> list[str]:
        return ["beamline filesystem not mounted"] if self.blfs_mounted is False else []

    def as_dict(self) -> dict[str, Any]:
        """The shared per-node JSON plus the checks."""
        return {
            **super().as_dict(),
            "reachable": self.reachable,
            "login": self.login,
            "rtt": self.rtt,
            "home_writable": self.home_writable,
            "blfs_mounted": self.blfs_mounted,
            "warnings": self.warnings,
        }


@dataclass
class CheckReport(RunReport):
    """The per-node checks of one beamtime, and the key file's verdict."""

    metadata_file: str = ""
    key: str = ""
    key_problem: str | None = None
    blfs_mountpoint: str = ""

    @property
    def nodes(self) -> list[NodeCheck]:
        return [r for r in self.results if isinstance(r, NodeCheck)]

    @property
    def ready(self) -> bool:
        return self.key_problem is None and self.ok

    @property
    def exit_status(self) -> int:
        """The exit rule over the nodes, with a bad key file counting as a failure (1)."""
        return exit_status([r.status for r in self.results] + [1 if self.key_problem else 0])

    def as_dict(self) -> dict[str, Any]:
        """The shared JSON shape (``nodes``, ``summary``) plus the beamtime-wide checks."""
        return self.as_json(
            metadata_file=self.metadata_file,
            key=self.key,
            key_problem=self.key_problem,
            blfs_mountpoint=self.blfs_mountpoint,
            ready=self.ready,
        )


def _check_node(conn: fabric.Connection, blfs: str) -> NodeCheck:
    started = time.monotonic()
    check = _probe_node(conn, blfs)
    check.seconds = time.monotonic() - started
    return check


def _probe_node(conn: fabric.Connection, blfs: str) -> NodeCheck:
    check = NodeCheck(node=connection_node(conn))
    try:
        ensure_open(conn)
    except paramiko.AuthenticationException as exc:
        check.reachable = True
        check.error = describe_error(exc)
        return check
    except Exception as exc:
        check.error = describe_error(exc, conn.connect_timeout)
        return check
    check.reachable = check.login = True
    probe = execute(conn, _PROBE.format(blfs=shlex.quote(blfs)), timeout=PROBE_TIMEOUT)
    if probe.error:
        check.error = probe.error
        return check
    # Timed second: the first session on a new connection carries sshd's set-up cost.
    start = time.monotonic()
    ping = execute(conn, "true")
    check.rtt = time.monotonic() - start
    if ping.error:
        check.error = ping.error
        return check
    lines = set(probe.stdout.split())
    check.home_writable = "home=ok" in lines
    check.blfs_mounted = "blfs=ok" in lines
    check.exit = 0 if check.home_writable else 1
    notes = ([] if check.home_writable else ["home directory not writable"]) + check.warnings
    check.message = "; ".join(notes) or None
    return check


def check_beamtime(
    md: BeamtimeMetadata,
    group: Any,
    *,
    metadata_file: str = "",
    fanout: int = defaults.FANOUT,
) -> CheckReport:
    """Check the key file and every Connection of ``group`` (opened and left open)."""
    if md.online is None:
        raise NoOnlineAnalysis(md.beamtime)
    start = time.monotonic()
    blfs = md.online.blfs_mountpoint or f"/beamline/{md.beamline.lower()}"
    report = CheckReport(
        command="check",
        metadata_file=metadata_file,
        key=md.online.ssh.key,
        key_problem=key_problem(md.online.ssh.key),
        blfs_mountpoint=blfs,
    )
    outcome = map_nodes(group, lambda conn: _check_node(conn, blfs), fanout=fanout)
    for node, value in outcome.items():
        if isinstance(value, NodeCheck):
            report.results.append(value)
        else:
            report.results.append(NodeCheck(node=node, error=describe_error(value)))
    report.seconds = time.monotonic() - start
    return report
