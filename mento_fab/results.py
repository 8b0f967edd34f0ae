"""What happened on each node, and the one rule that turns it into an exit status.

Every operation that touches nodes (run, check, deploy, rollback, Slurm fan-out,
transfers, workers) reports a :class:`RunReport` of :class:`NodeResult`; renderers
(:mod:`mento_fab.gather`, the command line) only read them.

``stdout``/``stderr`` are the command's own output and nothing else; the tool's
words about a node ("not switched: cn03 failed") go into ``message``, so a
script reading ``--json`` never mistakes them for output.

>>> report = RunReport("true", [NodeResult("cn01", exit=0), NodeResult("cn02", exit=3),
...                             NodeResult("cn03", error="connect timed out after 10 s")])
>>> report.exit_status, [r.node for r in report.failed], [r.node for r in report.unreachable]
(255, ['cn02'], ['cn03'])
>>> report.summary()["ok"]
1
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from mento_fab.defaults import UNREACHABLE_EXIT

__all__ = ["NodeResult", "RunReport", "exit_status"]


def exit_status(statuses: list[int | None]) -> int:
    """The exit rule: 0 when every node succeeded, else the largest status, a node
    that never ran or never ended (``None``) counting as 255."""
    return max(
        (UNREACHABLE_EXIT if s is None else s for s in statuses if s != 0), default=0
    )


@dataclass
class NodeResult:
    """What happened on one node. ``exit`` is None when the command never ran to an end."""

    node: str
    exit: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    seconds: float = 0.0
    #: The tool's own words about this node (never command output).
    message: str | None = None
    #: Bytes of stdout/stderr dropped beyond the output limit.
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    #: Held back by an all-or-none rule because another node failed (a deploy's node
    #: left unswitched): not ok, yet its status is 0, the exit comes from the failures.
    held_back: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit == 0 and not self.held_back

    @property
    def status(self) -> int:
        """The node's share of the exit status rule: its exit, or 255 when it never ended
        (0 for a node held back: it did nothing wrong)."""
        if self.held_back and self.error is None:
            return 0
        if self.error is not None and self.exit in (None, 0):
            return UNREACHABLE_EXIT
        return self.exit if self.exit is not None else UNREACHABLE_EXIT

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "node": self.node,
            "exit": self.exit,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "error": self.error,
            "message": self.message,
            "seconds": round(self.seconds, 4),
        }
        if self.stdout_dropped or self.stderr_dropped:
            data["dropped"] = {"stdout": self.stdout_dropped, "stderr": self.stderr_dropped}
        return data


@dataclass
class RunReport:
    """The results of one command over a set of nodes, in node order."""

    command: str
    results: list[NodeResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def succeeded(self) -> list[NodeResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[NodeResult]:
        """Nodes where the command ran and exited non-zero."""
        return [r for r in self.results if r.error is None and r.exit not in (None, 0)]

    @property
    def held_back(self) -> list[NodeResult]:
        """Nodes that did nothing wrong but were held back because another node failed."""
        return [r for r in self.results if r.held_back and r.error is None]

    @property
    def unreachable(self) -> list[NodeResult]:
        """Nodes where the command never ran or never finished (connect, auth, timeout)."""
        return [r for r in self.results if r.error is not None]

    @property
    def exit_status(self) -> int:
        """0 when every node succeeded, else the largest status (255 for unreachable)."""
        return max((r.status for r in self.results if not r.ok), default=0)

    def __getitem__(self, node: str) -> NodeResult:
        for result in self.results:
            if result.node == node:
                return result
        raise KeyError(node)

    def summary(self) -> dict[str, Any]:
        """Counts by outcome; ``held_back`` only appears when a node was held back."""
        held = {"held_back": len(self.held_back)} if self.held_back else {}
        return {
            "nodes": len(self.results),
            "ok": len(self.succeeded),
            "failed": len(self.failed),
            "unreachable": len(self.unreachable),
            **held,
            "exit_status": self.exit_status,
            "seconds": round(self.seconds, 4),
        }

    def as_json(self, **extra: Any) -> dict[str, Any]:
        """The shared JSON shape: ``{"command", "nodes": [...], "summary": {...}}`` + ``extra``."""
        return {
            "command": self.command,
            **extra,
            "nodes": [r.as_dict() for r in self.results],
            "summary": self.summary(),
        }

    def _repr_html_(self) -> str:
        """A table per node for Jupyter."""
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    r.node,
                    "" if r.exit is None else r.exit,
                    r.error or r.message or "",
                    r.stdout[-2000:],
                    r.stderr[-2000:],
                    f"{r.seconds:.2f}",
                )
            )
            + "</tr>"
            for r in self.results
        )
        head = "".join(
            f"<th>{h}</th>" for h in ("node", "exit", "error", "stdout", "stderr", "seconds")
        )
        s = self.summary()
        caption = html.escape(
            f"{self.command}: {s['nodes']} nodes, {s['ok']} ok, {s['failed']} failed, "
            f"{s['unreachable']} unreachable (exit {s['exit_status']})"
        )
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{rows}</table>"
