"""What a deploy or rollback did: one :class:`NodeState` and typed facts per node.

The shared per-node shape (exit, stderr, error, the tool's ``message``) is the
:class:`~mento_fab.results.RunReport` in :attr:`DeployReport.run`; what only a
deploy knows (the state, bytes sent, files reused, which node staged a shared
target) is a :class:`NodeDeploy` in :attr:`DeployReport.details`.

A node that did nothing wrong but was held back by the all-or-none rule (not
staged, switched back) reports exit 0 and says so in its message; the run's exit
status comes from the nodes that failed.

>>> NodeState.SWITCHED == "switched", NodeDeploy("cn01", NodeState.ABORTED).as_dict()
(True, {'state': 'aborted'})
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

from mento_fab.results import RunReport

__all__ = ["DeployReport", "NodeDeploy", "NodeReleases", "NodeState"]


class NodeState(enum.StrEnum):
    """Where a node ended up; the value is what ``--json`` shows."""

    #: Already had this content; nothing was sent.
    UNCHANGED = "unchanged"
    #: Planned only (``dry_run``): nothing was changed.
    DRY_RUN = "dry-run"
    #: ``current`` points at the new release.
    SWITCHED = "switched"
    #: Switched, then switched back because another node failed.
    REVERTED = "reverted"
    #: Left as it was because another node failed (staged copies removed).
    ABORTED = "aborted"
    #: This node's own failure; it is on the release it had, or says otherwise.
    FAILED = "failed"
    #: The node was lost while switching: it may be on either release.
    UNKNOWN = "unknown"


@dataclass
class NodeDeploy:
    """One node's part of a deploy: its state and what it took to get there."""

    node: str
    state: NodeState
    #: The release ``current`` points at afterwards, when it is not the new one.
    current: str | None = None
    #: Archive bytes sent (or that would be sent, for a dry run).
    bytes: int | None = None
    sent_files: int | None = None
    reused: int | None = None
    #: The release the archive was a delta against.
    base: str | None = None
    #: On a shared target: the node that staged and switched it for this one.
    shared_with: str | None = None
    #: Something that did not fail the deploy but needs a look (a failed prune).
    warning: str | None = None
    #: The release the node was switched to or back to (rollback).
    to: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The set fields, ``node`` left out (the caller keys by node)."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "node" and value is not None:
                data[f.name] = str(value) if f.name == "state" else value
        return data


@dataclass
class DeployReport:
    """What a deploy (or rollback) did, per node; ``run`` has the shared per-node shape."""

    action: str  # "deploy" | "rollback"
    outcome: str  # "switched", "unchanged", "aborted", "dry-run"
    target: str
    release: str | None
    content_hash: str | None
    run: RunReport
    shared: list[list[str]] = field(default_factory=list)  # nodes sharing one target directory
    details: dict[str, NodeDeploy] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.run.ok

    @property
    def exit_status(self) -> int:
        return self.run.exit_status

    def state(self, node: str) -> NodeState:
        return self.details[node].state

    def json_extra(self) -> dict[str, Any]:
        """The operation's own keys next to ``RunReport.as_json``'s."""
        return {
            "action": self.action,
            "outcome": self.outcome,
            "target": self.target,
            "release": self.release,
            "content_hash": self.content_hash,
            "shared": self.shared,
            "details": {node: d.as_dict() for node, d in self.details.items()},
        }


@dataclass
class NodeReleases:
    """The releases one node has (oldest first) and the one ``current`` points at."""

    node: str
    current: str | None
    releases: list[str]
    error: str | None = None
