"""Is the beamtime ready? Metadata, key file and every node, checked in one pass.

Each node is asked once: connect and log in, one shell line that tests the home
directory and the beamline filesystem mount, then one timed round trip on the
open connection. Failures are data in the :class:`CheckReport`.
"""

from __future__ import annotations

import os
import shlex
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import fabric
import paramiko

from mento_fab.errors import BadInput
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.nodes import connection_node
from mento_fab.runner import DEFAULT_FANOUT, describe_error, ensure_open, execute, map_nodes

__all__ = ["CheckReport", "NodeCheck", "check_beamtime", "key_problem"]

_PROBE = (
    'f=$(mktemp "$HOME/.mento-check.XXXXXX" 2>/dev/null) && rm -f "$f" && echo home=ok; '
    "test -d {blfs} && echo blfs=ok; exit 0"
)


@dataclass
class NodeCheck:
    node: str
    reachable: bool = False
    login: bool = False
    rtt: float | None = None  # seconds for one command on the open connection
    home_writable: bool | None = None
    blfs_mounted: bool | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return self.login and bool(self.home_writable)

    @property
    def exit(self) -> int | None:
        """The shared per-node contract: 0 ready, 1 reached but not ready, None never in."""
        if not self.login:
            return None
        return 0 if self.ready else 1

    @property
    def warnings(self) -> list[str]:
        return ["beamline filesystem not mounted"] if self.blfs_mounted is False else []


@dataclass
class CheckReport:
    metadata_file: str
    key: str
    key_problem: str | None
    blfs_mountpoint: str
    nodes: list[NodeCheck] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.key_problem is None and all(n.ready for n in self.nodes)

    @property
    def exit_status(self) -> int:
        """0 ready; 255 when a node cannot be reached or logged into; 1 otherwise."""
        if self.ready:
            return 0
        if any(not n.login for n in self.nodes):
            return 255
        return 1

    def as_dict(self) -> dict[str, Any]:
        """design.md's per-node JSON (node, exit, stdout, stderr, error, seconds) plus checks."""
        nodes = [
            {
                **asdict(n),
                "exit": n.exit,
                "stdout": "",
                "stderr": "",
                "seconds": round(n.seconds, 4),
                "warnings": n.warnings,
            }
            for n in self.nodes
        ]
        return {
            "metadata_file": self.metadata_file,
            "key": self.key,
            "key_problem": self.key_problem,
            "blfs_mountpoint": self.blfs_mountpoint,
            "ready": self.ready,
            "nodes": nodes,
            "summary": {
                "nodes": len(self.nodes),
                "ok": sum(n.ready for n in self.nodes),
                "failed": sum(n.login and not n.ready for n in self.nodes),
                "unreachable": sum(not n.login for n in self.nodes),
                "exit_status": self.exit_status,
            },
        }


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
    probe = execute(conn, _PROBE.format(blfs=shlex.quote(blfs)), timeout=30)
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
    if not check.home_writable:
        check.error = "home directory not writable"
    return check


def check_beamtime(
    md: BeamtimeMetadata,
    group: Any,
    *,
    metadata_file: str = "",
    fanout: int = DEFAULT_FANOUT,
) -> CheckReport:
    """Check the key file and every Connection of ``group`` (opened and left open)."""
    if md.online is None:
        raise BadInput(f"beamtime {md.beamtime} has no reserved nodes (no onlineAnalysis)")
    blfs = md.online.blfs_mountpoint or f"/beamline/{md.beamline.lower()}"
    report = CheckReport(
        metadata_file=metadata_file,
        key=md.online.ssh.key,
        key_problem=key_problem(md.online.ssh.key),
        blfs_mountpoint=blfs,
    )
    outcome = map_nodes(group, lambda conn: _check_node(conn, blfs), fanout=fanout)
    for node, value in outcome.items():
        if isinstance(value, NodeCheck):
            report.nodes.append(value)
        else:
            report.nodes.append(NodeCheck(node=node, error=describe_error(value)))
    return report
