"""Turn a RunReport into the text people read: gathered output, problems, a summary line.

Gathering is ClusterShell's MsgTree (what ``clush -b`` uses): nodes whose output
is identical are shown once, under their folded node set. JSON and the summary
numbers are the report's own (:meth:`RunReport.as_json`, :meth:`RunReport.summary`).

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

from ClusterShell.MsgTree import MsgTree
from ClusterShell.NodeSet import NodeSet

from mento_fab.results import NodeResult, RunReport

__all__ = ["gathered", "problems", "summary_line"]


def gathered(results: list[NodeResult], stream: str = "stdout") -> Iterator[tuple[str, str]]:
    """``(node set, text)`` for each distinct output, nodes with the same output folded."""
    tree = MsgTree()
    for result in results:
        text: str = getattr(result, stream)
        if not text:
            continue
        for line in text.rstrip("\n").split("\n"):
            tree.add(result.node, line.encode())
    order = {r.node: i for i, r in enumerate(results)}
    groups = [(sorted(keys, key=order.__getitem__), message) for message, keys in tree.walk()]
    for keys, message in sorted(groups, key=lambda group: order[group[0][0]]):
        yield str(NodeSet.fromlist(keys)), bytes(message).decode("utf-8", "replace")


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
    return (
        f"{count} node{'s' if count != 1 else ''}: {len(report.succeeded)} ok, "
        f"{len(report.failed)} failed{f' ({failed_text})' if failed_text else ''}, "
        f"{len(report.unreachable)} unreachable{f' ({unreachable})' if unreachable else ''}"
    )


def problems(report: RunReport) -> list[str]:
    """One line per distinct error, nodes folded: ``cn[03-04]: connect timed out after 10 s``."""
    grouped = _grouped((r.node, r.error) for r in report.unreachable if r.error)
    return [f"{nodes}: {reason}" for nodes, reason in grouped]

