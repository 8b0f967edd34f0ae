"""What a deploy or rollback did: one :class:`NodeState` and typed facts per node.

The shared per-node shape (exit, stderr, error, the tool's ``message``) is the
:class:`~mento_fab.results.RunReport` in :attr:`DeployReport.run`; what only a
deploy knows (the state, bytes sent, files reused, which node staged a shared
target) is a :class:`NodeDeploy` in :attr:`DeployReport.details`.

A node that did nothing wrong but was held back by the all-or-none rule (not
staged, switched back) is not ok: it reports ``exit`` None, ``held_back`` and a
message starting "not switched: ", and counts as held back in the summary; the
run's exit status comes from the nodes that failed.

>>> NodeState.SWITCHED == "switched", NodeDeploy("cn01", NodeState.ABORTED).as_dict()
(True, {'state': 'aborted'})
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, fields
from typing import Any

from mento_fab.results import NodeResult, RunReport

__all__ = ["DeployReport", "Failure", "NodeDeploy", "NodeReleases", "NodeState", "Tally"]


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
class Failure:
    """Why a step failed on one node, in the shared per-node shape."""

    #: The tool's words ("staging failed: checksum mismatch after upload"); None when
    #: ``error`` says it all.
    message: str | None = None
    #: The remote command's exit status; None when it never ran or never ended.
    exit: int | None = None
    #: The remote command's own stderr.
    stderr: str = ""
    #: A connection-level problem (unreachable, lost, timed out).
    error: str | None = None
    #: The command reached the node but its answer did not come back: it may have run.
    uncertain: bool = False

    def result(self, node: str, seconds: float = 0.0, message: str | None = None) -> NodeResult:
        return NodeResult(
            node, self.exit, "", self.stderr, self.error, seconds, message or self.message
        )

    @property
    def reason(self) -> str:
        return self.error or self.message or f"exit {self.exit}"


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
    """The releases one node has (oldest first), the one ``current`` points at, and
    which went live when (``history``: ``[(UTC time, name)]``, None when the target
    keeps none: then every release counts as live)."""

    node: str
    current: str | None
    releases: list[str]
    error: str | None = None
    history: list[tuple[str, str]] | None = None

    @property
    def live(self) -> list[str]:
        """Releases here that went live on every node, oldest first."""
        if self.history is None:
            return list(self.releases)
        went_live = {name for _, name in self.history}
        return [r for r in self.releases if r in went_live]

    @property
    def unconfirmed(self) -> bool:
        """``current`` never went live on every node: a deploy lost this node while switching."""
        if self.history is None or self.current is None:
            return False
        return not self.history or self.history[-1][1] != self.current

    def as_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "releases": self.releases,
            "live": self.live,
            "unconfirmed": self.unconfirmed,
            "history": [list(h) for h in self.history] if self.history is not None else None,
        }


@dataclass
class Tally:
    """Per-node results and facts as the steps produce them, in the group's order."""

    action: str
    nodes: list[str]
    label: str
    release: str | None
    content_hash: str | None
    start: float
    results: dict[str, NodeResult] = field(default_factory=dict)
    details: dict[str, NodeDeploy] = field(default_factory=dict)
    shared: list[list[str]] = field(default_factory=list)

    def set(self, node: str, state: NodeState, result: NodeResult, **facts: Any) -> None:
        result.seconds = result.seconds or time.monotonic() - self.start
        self.results[node] = result
        self.details[node] = NodeDeploy(node, state, **facts)

    def fail(self, node: str, failure: Failure, **facts: Any) -> None:
        self.set(node, NodeState.FAILED, failure.result(node), **facts)

    def ok(self, node: str, state: NodeState, message: str, **facts: Any) -> None:
        self.set(node, state, NodeResult(node, 0, message=message), **facts)

    def held(self, node: str, state: NodeState, message: str, **facts: Any) -> None:
        """``node`` did nothing wrong, but is not on the new release: another node failed."""
        self.set(node, state, NodeResult(node, None, message=message, held_back=True), **facts)

    def hold_back(self, message: str) -> None:
        """Every node without a result yet stays as it was: another node failed."""
        for node in self.nodes:
            if node not in self.results:
                self.held(node, NodeState.ABORTED, message)

    def report(self, outcome: str) -> DeployReport:
        command = (
            f"{self.action} {self.release} to {self.label}"
            if self.release
            else (f"{self.action} {self.label}")
        )
        run = RunReport(
            command, [self.results[n] for n in self.nodes], time.monotonic() - self.start
        )
        details = {n: self.details[n] for n in self.nodes if n in self.details}
        return DeployReport(
            self.action,
            outcome,
            self.label,
            self.release,
            self.content_hash,
            run,
            self.shared,
            details,
        )
