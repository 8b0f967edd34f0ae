"""The releases a target holds, which went live, and going back: ``releases()``, ``rollback()``.

A rollback holds the target's lock (:mod:`.lock`) like a deploy and is two-phase:
first every node must have the same release to go to (same content hash), and
only a release that was live is a target; then every node switches, a node that
fails makes every other switch back, and the release goes live again (history).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterable

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node
from mento_fab.deployment import lock, phases
from mento_fab.deployment import remote as sh
from mento_fab.deployment.envfiles import default_target
from mento_fab.deployment.report import DeployReport, Failure, NodeReleases, NodeState, Tally
from mento_fab.deployment.signals import SignalGuard
from mento_fab.errors import DeployInterrupted
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.results import NodeResult, RunReport
from mento_fab.runner import execute, map_nodes
from mento_fab.session import Session

__all__ = ["releases", "rollback"]

SessionLike = Session | BeamtimeMetadata | str | os.PathLike[str]


def _listing(
    conns: list[fabric.Connection], label: str, fanout: int, start: float
) -> tuple[RunReport, dict[str, NodeReleases]]:
    remote = sh.remote_dir(label)
    command = sh.list_command(remote)
    outcome = map_nodes(
        conns, lambda c: execute(c, command, timeout=phases.COMMAND_TIMEOUT), fanout=fanout
    )
    found: dict[str, NodeReleases] = {}
    results = []
    for node, value in outcome.items():
        if isinstance(value, NodeResult):
            res = dataclasses.replace(value, stdout="")
        else:
            res = phases.failure_of(value).result(node)
        if not res.ok:
            found[node] = NodeReleases(node, None, [], res.error or res.stderr.strip())
            results.append(res)
            continue
        assert isinstance(value, NodeResult)
        current, names, history = sh.parse_list(value.stdout)
        info = NodeReleases(node, current, names, history=history)
        found[node] = info
        if info.unconfirmed:
            res.message = (
                f"on {current}, which never went live on every node (a deploy lost this "
                "node while switching): deploy again or roll back to set it right"
            )
        results.append(res)
    return RunReport(f"releases {label}", results, time.monotonic() - start), found


def releases(
    group: Iterable[fabric.Connection],
    session: SessionLike,
    target: str | None = None,
    *,
    fanout: int = defaults.FANOUT,
) -> tuple[RunReport, dict[str, NodeReleases]]:
    """What each node has under ``target``: releases (oldest first), current, live history.

    A node whose ``current`` never went live on every node (a deploy lost it while
    switching) gets a message saying so; the next deploy sets it right.
    """
    md = Session.load(session).metadata
    label = target or default_target(md)
    return _listing(list(group), label, fanout, time.monotonic())


def _choose(
    found: dict[str, NodeReleases], to: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """The release each node goes back to, or why it cannot (node -> message)."""
    choice: dict[str, str] = {}
    refused: dict[str, str] = {}
    for node, info in found.items():
        live = info.live
        if to is not None:
            if to not in info.releases:
                refused[node] = f"no release {to} here"
            elif to not in live:
                refused[node] = f"release {to} never went live on every node; not switching to it"
            else:
                choice[node] = to
        elif info.current is None or info.current not in info.releases:
            refused[node] = "nothing to roll back: no current release"
        elif older := [r for r in live if r < info.current]:
            choice[node] = older[-1]
        else:
            refused[node] = f"no live release before {info.current}"
    if not refused and len({name.rsplit("-", 1)[-1] for name in choice.values()}) > 1:
        for node, name in choice.items():
            refused[node] = (
                f"nodes disagree on the previous release (here {name}); name one to go to"
            )
    return choice, refused


def rollback(
    group: Iterable[fabric.Connection],
    session: SessionLike,
    target: str | None = None,
    *,
    to: str | None = None,
    fanout: int = defaults.FANOUT,
    lock_timeout: float = defaults.LOCK_TIMEOUT,
) -> DeployReport:
    """Switch every node back to the live release before ``current`` (or to release ``to``).

    Raises :class:`~mento_fab.errors.DeployLocked` when another deploy keeps the
    target locked beyond ``lock_timeout`` seconds, and
    :class:`~mento_fab.errors.DeployInterrupted` after a signal (once no node is
    left half-way).
    """
    start = time.monotonic()
    md = Session.load(session).metadata
    label = target or default_target(md)
    remote = sh.remote_dir(label)
    conns = list(group)
    tally = Tally("rollback", [connection_node(c) for c in conns], label, None, None, start)
    owner = lock.LockOwner.mine()
    try:
        locked = lock.acquire(conns, remote, label, owner, lock_timeout, fanout, tidy=False)
        failed = {n: v for n, v in locked.items() if isinstance(v, Failure)}
        if failed:
            for node, failure in failed.items():
                tally.fail(node, failure)
            tally.hold_back("not switched: another node failed")
            return tally.report("aborted")
        with lock.Heartbeat(conns, remote, owner.run):
            return _switch_back(conns, remote, label, to, fanout, tally)
    finally:
        lock.release(conns, remote, owner.run, (), fanout, final=True)


def _switch_back(
    conns: list[fabric.Connection],
    remote: str,
    label: str,
    to: str | None,
    fanout: int,
    tally: Tally,
) -> DeployReport:
    listing, found = _listing(conns, label, fanout, tally.start)
    reachable = {n: i for n, i in found.items() if listing[n].ok}
    choice, refused = _choose(reachable, to)
    for res in listing.results:
        if not res.ok:
            tally.set(res.node, NodeState.FAILED, res)
    for node, message in refused.items():
        tally.set(node, NodeState.FAILED, NodeResult(node, 1, message=message))
    tally.release = next(iter(choice.values()), None)
    if tally.results:
        for node, name in choice.items():
            if node not in tally.results:
                tally.held(node, NodeState.ABORTED, "not switched: another node failed", to=name)
        return tally.report("aborted")

    previous = {n: f"releases/{found[n].current}" for n in choice}
    guard = SignalGuard()
    with guard:
        switched = _switch_each(conns, remote, choice, fanout)
        bad = {n: f for n, f in switched.items() if f is not None}
        stuck: dict[str, Failure] = {}
        if bad:
            back = [c for c in conns if connection_node(c) not in bad]
            stuck = {n: f for n, f in phases.revert(back, remote, previous, fanout).items() if f}
        else:
            phases.commit(conns, remote, dict(choice), fanout)
    for node, name in choice.items():
        if node in bad or node in stuck:
            failure = bad.get(node) or stuck[node]
            if failure.uncertain:
                message = f"unknown: may be on release {name}"
                tally.set(node, NodeState.UNKNOWN, failure.result(node, message=message), to=name)
            else:
                tally.fail(node, failure, to=name)
        elif bad:
            message = f"not switched: switched back, {', '.join(sorted(bad))} failed"
            tally.held(node, NodeState.REVERTED, message, to=name)
        else:
            tally.ok(node, NodeState.SWITCHED, f"switched back to {name}", to=name)
    report = tally.report("aborted" if bad else "switched")
    if guard.signum is not None:
        name = signal.Signals(guard.signum).name
        raise DeployInterrupted(f"rollback stopped by {name}", report, guard.signum)
    return report


def _switch_each(
    conns: list[fabric.Connection], remote: str, targets: dict[str, str], fanout: int
) -> dict[str, Failure | None]:
    """Each node to its own target release (names may differ, contents do not)."""
    outcome: dict[str, Failure | None] = {}
    by_target: dict[str, list[fabric.Connection]] = {}
    for conn in conns:
        by_target.setdefault(targets[connection_node(conn)], []).append(conn)
    for name, group in by_target.items():
        outcome.update(phases.switch(group, remote, name, fanout, lambda node, what: None))
    return outcome
