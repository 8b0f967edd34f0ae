"""The result of ``start``, ``ps`` and ``stop``: worker rows plus what happened per node.

``run`` is the usual :class:`~mento_fab.results.RunReport` (a node that could not be
reached is an error there, the tool's words about a node are its ``message``);
``workers`` holds one :class:`~.spec.WorkerRow` per instance and node.

>>> from mento_fab.results import NodeResult, RunReport
>>> from mento_fab.workers.spec import WorkerRow
>>> report = WorkersReport("ps", RunReport("ps", [NodeResult("cn01", exit=0)]),
...                        [WorkerRow("cn01", "w", 0, "running", pid=42)])
>>> report.exit_status, report.summary()["states"]
(0, {'running': 1})
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mento_fab.results import RunReport
from mento_fab.workers.spec import WorkerRow

__all__ = ["WorkersReport", "human_bytes", "human_seconds"]

#: ``ps`` exits with this when a selected worker is not running (all nodes answered).
NOT_RUNNING_EXIT = 1


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)  # pragma: no cover


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass
class WorkersReport:
    """What ``start``/``ps``/``stop`` found: per node (``run``) and per worker (``workers``)."""

    action: str
    run: RunReport
    workers: list[WorkerRow] = field(default_factory=list)
    name: str | None = None
    #: What else was done or went wrong (e.g. a Slurm job cancelled), one line each.
    notes: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """The exit rule over the nodes; for ``ps`` also 1 when a worker is not running."""
        status = self.run.exit_status
        if self.action == "ps" and any(not w.running for w in self.workers):
            status = max(status, NOT_RUNNING_EXIT)
        return status

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def __iter__(self) -> Any:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def summary(self) -> dict[str, Any]:
        states = Counter(w.state for w in self.workers)
        return {
            "nodes": len(self.run.results),
            "workers": len(self.workers),
            "states": dict(sorted(states.items())),
            "running": states.get("running", 0),
            "failed_nodes": len(self.run.failed),
            "unreachable": len(self.run.unreachable),
            "exit_status": self.exit_status,
            "seconds": round(self.run.seconds, 4),
        }

    def as_json(self) -> dict[str, Any]:
        """``{"command", "name", "workers": [...], "nodes": [...], "summary": {...}}``."""
        return {
            "command": self.action,
            "name": self.name,
            "workers": [w.as_dict() for w in self.workers],
            "nodes": [r.as_dict() for r in self.run.results],
            "notes": self.notes,
            "summary": self.summary(),
        }

    def rows(self) -> list[list[str]]:
        """Table cells, one row per worker (what the command line and Jupyter show)."""
        out = []
        for w in self.workers:
            uptime = w.uptime
            out.append([
                w.node,
                w.name if w.index == 0 and not self._several(w) else f"{w.name}[{w.index}]",
                w.state,
                "-" if w.pid is None else str(w.pid),
                human_seconds(uptime),
                str(w.restarts),
                "-" if w.exit is None else str(w.exit),
                "-" if w.cpu is None else f"{w.cpu:.1f}",
                human_bytes(w.rss),
                (f"slurm job {w.job}; " if w.kind == "slurm" else "") + (w.message or ""),
            ])  # fmt: skip
        return out

    COLUMNS = ("node", "worker", "state", "pid", "uptime", "restarts", "exit", "cpu %",
               "memory", "notes")  # fmt: skip

    def _several(self, row: WorkerRow) -> bool:
        return any(w.name == row.name and w.index > 0 for w in self.workers)

    def _repr_html_(self) -> str:
        """A table of workers, then the nodes that failed, for Jupyter."""
        head = "".join(f"<th>{h}</th>" for h in self.COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self.rows()
        )
        problems = "".join(
            f"<li>{html.escape(r.node)}: "
            f"{html.escape(r.error or r.message or f'exit {r.exit}')}</li>"
            for r in self.run.results
            if not r.ok
        )
        s = self.summary()
        states = ", ".join(f"{n} {state}" for state, n in s["states"].items()) or "no workers"
        caption = html.escape(
            f"{self.action}{' ' + self.name if self.name else ''}: {s['workers']} workers on "
            f"{s['nodes']} nodes ({states}), {s['unreachable']} unreachable "
            f"(exit {s['exit_status']})"
        )
        table = f"<table><caption>{caption}</caption><tr>{head}</tr>{body}</table>"
        return table + (f"<ul>{problems}</ul>" if problems else "")
