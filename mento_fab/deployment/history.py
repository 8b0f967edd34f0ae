"""The releases a target holds, and going back to one: ``releases()`` and ``rollback()``.

A rollback is two-phase like a deploy: first every node must have the same
release to go to (same content hash); only then does any node switch, and a node
that fails makes every other switch back.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Iterable

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node
from mento_fab.deployment import phases
from mento_fab.deployment import remote as sh
from mento_fab.deployment.envfiles import default_target
from mento_fab.deployment.phases import Failure
from mento_fab.deployment.report import DeployReport, NodeDeploy, NodeReleases, NodeState
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.results import NodeResult, RunReport
from mento_fab.runner import execute, map_nodes
from mento_fab.session import Session

__all__ = ["releases", "rollback"]

SessionLike = Session | BeamtimeMetadata | str | os.PathLike[str]


def releases(
    group: Iterable[fabric.Connection],
    session: SessionLike,
    target: str | None = None,
    *,
    fanout: int = defaults.FANOUT,
) -> tuple[RunReport, dict[str, NodeReleases]]:
    """What each node has under ``target``: releases (oldest first) and the current one."""
    start = time.monotonic()
    md = Session.load(session).metadata
    label = target or default_target(md)
    remote = sh.remote_dir(label)
    command = sh.list_command(remote)
    outcome = map_nodes(
        list(group), lambda c: execute(c, command, timeout=phases.COMMAND_TIMEOUT), fanout=fanout
    )
    found: dict[str, NodeReleases] = {}
    results = []
    for node, value in outcome.items():
        if isinstance(value, NodeResult):
            res = dataclasses.replace(value, stdout="")
        else:
            res = phases.failure_of(value).result(node)
        results.append(res)
        if not res.ok:
            found[node] = NodeReleases(node, None, [], res.error or res.stderr.strip())
            continue
        assert isinstance(value, NodeResult)
        current, names = sh.parse_list(value.stdout)
        found[node] = NodeReleases(node, current, names)
    run = RunReport(f"releases {label}", results, time.monotonic() - start)
    return run, found


def rollback(
    group: Iterable[fabric.Connection],
    session: SessionLike,
    target: str | None = None,
    *,
    to: str | None = None,
    fanout: int = defaults.FANOUT,
) -> DeployReport:
    """Switch every node back to the release before ``current`` (or to release ``to``)."""
    start = time.monotonic()
    md = Session.load(session).metadata
    label = target or default_target(md)
    remote = sh.remote_dir(label)
    conns = list(group)
    listing, found = releases(conns, md, label, fanout=fanout)
    results: dict[str, NodeResult] = {}
    choice: dict[str, str] = {}
    for res in listing.results:
        node, info = res.node, found[res.node]
        if not res.ok:
            results[node] = res
        elif to is not None:
            if to in info.releases:
                choice[node] = to
            else:
                results[node] = NodeResult(node, 1, message=f"no release {to} here")
        elif info.current is None or info.current not in info.releases:
            results[node] = NodeResult(node, 1, message="nothing to roll back: no current release")
        elif older := [r for r in info.releases if r < info.current]:
            choice[node] = older[-1]
        else:
            results[node] = NodeResult(node, 1, message=f"no release before {info.current}")
    hashes = {name.rsplit("-", 1)[-1] for name in choice.values()}
    if not results and len(hashes) > 1:
        for node, name in choice.items():
            message = f"nodes disagree on the previous release (here {name}); name one to go to"
            results[node] = NodeResult(node, 1, message=message)
    details = {n: NodeDeploy(n, NodeState.FAILED) for n in results}
    chosen = next(iter(choice.values()), None)

    def finish(outcome: str) -> DeployReport:
        run = RunReport(
            f"rollback {label}",
            [results[connection_node(c)] for c in conns],
            time.monotonic() - start,
        )
        ordered = {connection_node(c): details[connection_node(c)] for c in conns}
        return DeployReport("rollback", outcome, label, chosen, None, run, details=ordered)

    if results:
        for node, name in choice.items():
            if node not in results:
                results[node] = NodeResult(node, 0, message="not switched: another node failed")
                details[node] = NodeDeploy(node, NodeState.ABORTED, to=name)
        return finish("aborted")
    tmp = f".current-{secrets.token_hex(6)}-"

    def switch(conn: fabric.Connection) -> None:
        node = connection_node(conn)
        command = sh.switch_command(remote, f"releases/{choice[node]}", tmp + node)
        phases.run_step(conn, command, "switching current", phases.COMMAND_TIMEOUT)

    switched = map_nodes(conns, switch, fanout=fanout)
    bad = {n: phases.failure_of(v) for n, v in switched.items() if isinstance(v, BaseException)}
    stuck: dict[str, Failure] = {}
    if bad:
        previous = {n: f"releases/{found[n].current}" for n in choice}
        back = [c for c in conns if connection_node(c) not in bad]
        stuck = {n: f for n, f in phases.revert(back, remote, previous, fanout).items() if f}
    seconds = time.monotonic() - start
    for node in switched:
        name = choice[node]
        if node in bad or node in stuck:
            results[node] = (bad.get(node) or stuck[node]).result(node, seconds)
            state = NodeState.FAILED
        elif bad:
            message = "switched, then back: another node failed"
            results[node] = NodeResult(node, 0, seconds=seconds, message=message)
            state = NodeState.REVERTED
        else:
            results[node] = NodeResult(node, 0, seconds=seconds, message=f"switched back to {name}")
            state = NodeState.SWITCHED
        details[node] = NodeDeploy(node, state, to=name)
    return finish("aborted" if bad else "switched")
