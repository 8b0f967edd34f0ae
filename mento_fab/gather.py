"""Turn a RunReport into the text people read: gathered output, problems, a summary line.

Gathering works like ``clush -b``: nodes whose output is identical are shown once,
under their folded node set. Outputs are compared whole, by their text (no per-line
tree as ClusterShell's MsgTree builds, which costs several hundred bytes per line:
16 MiB of short lines took 300 MB). JSON and the summary numbers are the report's
own (:meth:`RunReport.as_json`, :meth:`RunReport.summary`).

>>> from mento_fab.results import NodeResult, RunReport
>>> report = RunReport("hostname -s | cut -c1-2", [NodeResult("cn01", exit=0, stdout="cn\\n"),
...     NodeResult("cn02", exit=0, stdout="cn\\n"), NodeResult("cn03", error="connect timed out")])
>>> list(gathered(report.results))
[('cn[01-02]', 'cn')]
>>> summary_line(report)
'3 nodes: 2 ok, 0 failed, 1 unreachable (cn03)'
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

from ClusterShell.NodeSet import NodeSet

from mento_fab.results import NodeResult, RunReport

__all__ = ["dropped", "gathered", "human_size", "problems", "summary_line"]


def gathered(results: list[NodeResult], stream: str = "stdout") -> Iterator[tuple[str, str]]:
    """``(node set, text)`` for each distinct output (trailing newlines aside), in node
    order, nodes with the same output folded."""
    by_text: dict[str, list[str]] = {}
    for result in results:
        text: str = getattr(result, stream)
        if text:
            by_text.setdefault(text.rstrip("\n"), []).append(result.node)
    for text, nodes in by_text.items():
        yield str(NodeSet.fromlist(nodes)), text


def _grouped(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for node, reason in pairs:
        by_reason[reason].append(node)
    return [(str(NodeSet.fromlist(nodes)), reason) for reason, nodes in by_reason.items()]


def summary_line(report: RunReport) -> str:
    """``4 nodes: 3 ok, 1 failed (cn02 exit 1), 0 unreachable``."""
    failed = _grouped((r.node, f"exit {r.exit}") for r in report.failed)
    failed_text = ", ".join(f"{nodes} {why}" for nodes, why in failed)
    unreachable = str(NodeSet.fromlist([r.node for r in report.unreachable]))
    count = len(report.results)
    held = NodeSet.fromlist([r.node for r in report.held_back])
    return (
        f"{count} node{'s' if count != 1 else ''}: {len(report.succeeded)} ok, "
        f"{len(report.failed)} failed{f' ({failed_text})' if failed_text else ''}, "
        f"{len(report.unreachable)} unreachable{f' ({unreachable})' if unreachable else ''}"
        + (f", {len(held)} held back ({held})" if len(held) else "")
    )


def problems(report: RunReport) -> list[str]:
    """One line per distinct error, nodes folded: ``cn[03-04]: connect timed out after 10 s``."""
    grouped = _grouped((r.node, r.error) for r in report.unreachable if r.error)
    return [f"{nodes}: {reason}" for nodes, reason in grouped]



def human_size(count: int) -> str:
    """``512 B``, ``3.2 KiB``, ``16 MiB``, ``1.5 GiB``."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{count} B" if unit == "B" else f"{size:.1f} {unit}".replace(".0 ", " ")


def dropped(report: RunReport) -> list[str]:
    """One line per stream and amount of output over the limit, nodes folded:
    ``cn[01-02]: 84 MiB of stdout not kept (over the output limit)``."""
    pairs = [
        (result.node, f"{human_size(count)} of {stream} not kept (over the output limit)")
        for stream in ("stdout", "stderr")
        for result in report.results
        if (count := getattr(result, f"{stream}_dropped"))
    ]
    return [f"{nodes}: {reason}" for nodes, reason in _grouped(pairs)]
