"""How ``mento-fab top`` looks: one table of nodes under the reservation's end and time left.

On a TTY the table is redrawn in place with ``rich.live`` every interval until
Ctrl-C; otherwise (``--once``, or piped) one plain table is printed.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from mento_fab.cli import console
from mento_fab.workers.report import human_bytes, human_seconds
from mento_fab.workers.top import NodeSample, Snapshot, Top

__all__ = ["COLUMNS", "heading", "live", "print_snapshot", "rows"]

COLUMNS = ["node", "load", "cpu", "memory", "gpu", "disk free", "workers", "note"]


def heading(snapshot: Snapshot, label: str) -> str:
    r = snapshot.reservation
    if r.get("end"):
        when = f"ends {r['end'][:16].replace('T', ' ')} ({human_seconds(r.get('left'))} left)"
    else:
        when = r.get("error") or "no end time"
    name = r.get("name") or "-"
    ok = sum(1 for n in snapshot.nodes if not n.error)
    stamp = snapshot.taken.strftime("%H:%M:%S")
    return f"{label}: reservation {name} {when}; {ok}/{len(snapshot.nodes)} nodes; {stamp}"


def _workers(sample: NodeSample) -> str:
    if not sample.workers:
        return "-"
    counts: dict[str, dict[str, int]] = {}
    for w in sample.workers:
        counts.setdefault(w.name, {}).setdefault(w.state, 0)
        counts[w.name][w.state] += 1
    parts = []
    for name, states in counts.items():
        text = ", ".join(f"{n} {s}" if n > 1 else s for s, n in states.items())
        parts.append(f"{name}: {text}")
    return "; ".join(parts)


def _gpus(sample: NodeSample) -> str:
    if not sample.gpus:
        return "-"
    return " ".join(
        f"{g['util']:.0f}%/{human_bytes(g['mem_used'])}" if g.get("util") is not None else "?"
        for g in sample.gpus
    )


def rows(snapshot: Snapshot) -> list[list[str]]:
    out = []
    for n in snapshot.nodes:
        if n.error and n.load1 is None:
            out.append([n.node, "-", "-", "-", "-", "-", "-", n.error])
            continue
        memory = (
            f"{human_bytes(n.mem_used)} / {human_bytes(n.mem_total)}"
            if n.mem_total is not None
            else "-"
        )
        note = n.error or ("waiting for the node" if n.waiting else "")
        out.append([
            n.node,
            "-" if n.load1 is None else f"{n.load1:.2f}",
            "-" if n.cpu is None else f"{n.cpu:.0f}% of {n.cpus or '?'}",
            memory,
            _gpus(n),
            human_bytes(n.disk_free),
            _workers(n),
            note,
        ])  # fmt: skip
    return out


def print_snapshot(snapshot: Snapshot, label: str) -> None:
    console.print_table(heading(snapshot, label), COLUMNS, rows(snapshot))


def _table(snapshot: Snapshot, label: str) -> Any:
    from rich.table import Table

    table = Table(title=heading(snapshot, label), title_justify="left")
    for column in COLUMNS:
        table.add_column(column, no_wrap=column in ("node", "load"))
    for row in rows(snapshot):
        style = "red" if row[-1] and row[1] == "-" else None
        table.add_row(*row, style=style)
    return table


def live(top: Top, interval: float, label: str) -> None:
    """Redraw every ``interval`` seconds until Ctrl-C; a slow node never holds a refresh."""
    from rich.console import Console
    from rich.live import Live

    snapshot = top.refresh(timeout=min(interval, 1.5))
    try:
        with Live(_table(snapshot, label), console=Console(), auto_refresh=False) as view:
            while True:
                time.sleep(max(0.0, interval - snapshot.seconds))
                snapshot = top.refresh(timeout=min(interval, 1.5))
                view.update(_table(snapshot, label), refresh=True)
    except KeyboardInterrupt:
        sys.stdout.flush()
