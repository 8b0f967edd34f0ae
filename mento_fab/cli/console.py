"""Rendering for the command line: the only place (with the tasks) that prints.

Plain text when piped; on a TTY, rich styling and a progress bar that appears
only for runs that last more than a moment.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from mento_fab import gather
from mento_fab.cli.options import is_tty
from mento_fab.results import RunReport

#: Seconds before a progress bar appears; quick runs never flash one.
PROGRESS_DELAY = 0.4
_print_lock = threading.Lock()


def _header(nodes: str, count: int, label: str = "") -> str:
    title = f"{nodes} ({count}){label}"
    rule = "-" * max(15, len(title))
    return f"{rule}\n{title}\n{rule}"


def print_gathered(report: RunReport, out: TextIO | None = None) -> None:
    """clush -b style: each distinct output once, under its folded node set."""
    out = out or sys.stdout
    for stream, label in (("stdout", ""), ("stderr", " stderr")):
        for nodes, text in gather.gathered(report.results, stream):
            count = len(nodes_of(nodes))
            print(_header(nodes, count, label), file=out)
            print(text, file=out)


def nodes_of(nodeset: str) -> list[str]:
    from ClusterShell.NodeSet import NodeSet

    return list(NodeSet(nodeset))


def print_summary(report: RunReport, err: TextIO | None = None) -> None:
    err = err or sys.stderr
    sys.stdout.flush()  # the summary comes after the output, also on a shared terminal
    for line in [*gather.problems(report), *gather.dropped(report)]:
        print(line, file=err)
    print(gather.summary_line(report), file=err)


def stream_printer(out: TextIO | None = None) -> Callable[[str, str, str], None]:
    """A live line callback: ``cn01: line`` on stdout, stderr lines on stderr."""

    def on_line(node: str, stream: str, line: str) -> None:
        target = out or (sys.stdout if stream == "stdout" else sys.stderr)
        with _print_lock:
            target.write(f"{node}: {line}\n")
            target.flush()

    return on_line


class Progress:
    """A delayed, transient rich progress bar on stderr (a no-op when not on a TTY)."""

    def __init__(
        self, total: int, description: str, enabled: bool | None = None, *, nbytes: bool = False
    ) -> None:
        self.enabled = is_tty() if enabled is None else enabled
        #: Counting bytes (transfers): sizes and a rate instead of "3/4".
        self.nbytes = nbytes
        self.total = total
        self.description = description
        self._bar: Any = None
        self._task: Any = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._done = 0

    def __enter__(self) -> Progress:
        if self.enabled:
            self._timer = threading.Timer(PROGRESS_DELAY, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        with self._lock:
            if self._done >= self.total:
                return
            counts = (
                (DownloadColumn(), TransferSpeedColumn())
                if self.nbytes
                else (MofNCompleteColumn(),)
            )
            self._bar = RichProgress(
                "[progress.description]{task.description}",
                BarColumn(),
                *counts,
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._bar.add_task(
                self.description, total=self.total, completed=self._done
            )
            self._bar.start()

    def advance(self, *_: Any) -> None:
        self.add(1)

    def add(self, amount: int) -> None:
        """Count ``amount`` more done (bytes for a transfer)."""
        with self._lock:
            self._done += amount
            if self._bar is not None:
                self._bar.update(self._task, completed=self._done)

    def set_total(self, total: int) -> None:
        """The total, once known (a transfer learns it after asking the nodes)."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.update(self._task, total=total)

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table: rich on a TTY, aligned plain text otherwise (stable for scripts and tests)."""
    if is_tty(sys.stdout):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [
        max(len(str(x)) for x in [col, *(r[i] for r in rows)]) for i, col in enumerate(columns)
    ]
    print(title)
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
