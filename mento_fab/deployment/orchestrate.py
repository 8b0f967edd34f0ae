"""``deploy()``: the steps of :mod:`.phases` in order, and the all-or-none rule.

1. *probe* every node (what is ``current``?): an unchanged tree stops here, and a
   dry run only plans;
2. find nodes that share one target directory, so each directory is staged once,
   and *lock* each directory (:mod:`.lock`): one deploy or rollback at a time;
3. *stage* the release on every node (one archive per node over SFTP, checksum
   verified, unpacked into ``releases/.staging-<name>`` and renamed into place);
4. only when every node has staged, *switch* ``current`` on every node with
   ``ln -s`` to a temporary name and ``mv -T`` (one atomic ``rename(2)``); if a
   switch fails, every node that switched is switched back. Ctrl-C, SIGTERM and
   SIGHUP wait until then (:mod:`.signals`);
5. *commit*: the new release went live everywhere and enters each history;
6. *prune* never-live releases and live ones beyond ``keep``; give the lock back.

If staging fails anywhere, nothing switches and staged releases are removed. A
node lost while switching may be on either release: it is reported ``unknown``,
and the next deploy (or ``releases``) says so and sets it right.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Any

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node
from mento_fab.deployment import lock, phases
from mento_fab.deployment.envfiles import beamtime_files, default_target
from mento_fab.deployment.phases import EventCallback, Plan, Probe, StageOptions
from mento_fab.deployment.remote import remote_dir
from mento_fab.deployment.report import DeployReport, Failure, NodeState, Tally
from mento_fab.deployment.scan import Release, build_release
from mento_fab.deployment.secrets import SecretScan
from mento_fab.deployment.signals import SignalGuard
from mento_fab.errors import BadInput, DeployInterrupted
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.results import NodeResult
from mento_fab.session import Session

__all__ = ["deploy"]

log = logging.getLogger(__name__)

SessionLike = Session | BeamtimeMetadata | str | os.PathLike[str]
Conns = Sequence[fabric.Connection]


def _facts(plan: Plan | None) -> dict[str, Any]:
    if plan is None:
        return {}
    return {
        "bytes": plan.bytes,
        "sent_files": plan.sent_files,
        "reused": plan.reused,
        "base": plan.base,
    }


def _name(link: str) -> str:
    return link.rsplit("/", 1)[-1]


def deploy(
    group: Iterable[fabric.Connection],
    session: SessionLike,
    source: str | os.PathLike[str] = ".",
    target: str | None = None,
    *,
    excludes: Iterable[str] = (),
    install: bool = False,
    pip_args: Sequence[str] = (),
    system_site_packages: bool = False,
    keep: int = defaults.KEEP_RELEASES,
    dry_run: bool = False,
    fanout: int = defaults.FANOUT,
    lock_timeout: float = defaults.LOCK_TIMEOUT,
    on_event: EventCallback | None = None,
    release: Release | None = None,
) -> DeployReport:
    """Deploy ``source`` to ``target`` on every node of ``group``; two-phase, all or none.

    ``session`` is a :class:`~mento_fab.session.Session` (or a metadata file, or a
    :class:`BeamtimeMetadata`, from which one is built): its directory translates
    token paths to what the nodes see. ``install`` builds ``.venv`` in the release
    from ``requirements.txt``/``pyproject.toml`` with ``pip install <pip_args>``
    (e.g. ``--no-index --find-links DIR``) before the switch;
    ``system_site_packages`` lets the venv see the node's own packages. ``keep``
    live releases are kept besides the current one. Another deploy of the same
    target is waited for up to ``lock_timeout`` seconds. ``on_event(node, event)``
    reports progress (events in :data:`~mento_fab.deployment.phases.EventCallback`).
    ``release`` (from :func:`build_release`) skips scanning ``source``.

    Never raises for a node's failure. Raises :class:`~mento_fab.errors.BadInput`
    for bad input (a bad target, a source holding a secret),
    :class:`~mento_fab.errors.DeployLocked` when the lock stays taken, and
    :class:`~mento_fab.errors.DeployInterrupted` (with the report) after a signal.
    """
    start = time.monotonic()
    session = Session.load(session)
    md = session.metadata
    if keep < 0:
        raise BadInput(f"releases to keep must be 0 or more, not {keep}")
    label = target or default_target(md)
    remote = remote_dir(label)
    conns = list(group)
    scan = SecretScan.for_metadata(md)
    if release is None:
        release = build_release(
            source, excludes, extra_files=beamtime_files(session), install=install, secrets=scan
        )
    elif release.checked != scan.identity:
        scan.check(release.files)
        release.checked = scan.identity
    log.info(
        "release %s: %d files, %d bytes from %s",
        release.name,
        len(release.files),
        release.size,
        release.source,
    )
    event = on_event or (lambda node, what: None)
    tally = Tally(
        "deploy",
        [connection_node(c) for c in conns],
        label,
        release.name,
        release.content_hash,
        start,
    )

    # Read only: what is current on each node? Nothing to do, or a node we cannot
    # reach (then no node may switch), ends here.
    probed = phases.probe(conns, remote, fanout)
    for node, value in probed.items():
        if isinstance(value, Failure):
            tally.fail(node, value)
            continue
        event(node, "probed")
        if value.content_hash == release.content_hash:
            tally.ok(
                node, NodeState.UNCHANGED, f"unchanged: already at {value.link}", current=value.link
            )
    failed = sorted(n for n, v in probed.items() if isinstance(v, Failure))
    # Leftovers of a failed or dead run are removed under the lock, also when
    # nothing changed (they may hold the space the next deploy needs).
    leftovers = any(isinstance(v, Probe) and v.leftovers for v in probed.values())
    done = len(tally.results) == len(conns)
    if (done and (failed or dry_run or not leftovers)) or (failed and not dry_run):
        tally.hold_back(f"not switched: {', '.join(failed)} failed; nothing staged")
        return tally.report("aborted" if failed else "unchanged")
    if dry_run:
        todo = [c for c in conns if connection_node(c) not in tally.results]
        current = {n: v.link for n, v in probed.items() if isinstance(v, Probe)}
        return _dry_run(tally, release, todo, remote, current, fanout)

    sharing = phases.find_shared(conns, remote, fanout)
    owner = lock.LockOwner.mine()
    reps = [g[0] for g in sharing.groups]
    # Signals held back from the switch on stay held back until the locks are given back.
    with contextlib.ExitStack() as held:
        return _locked_deploy(
            tally, release, conns, sharing, reps, remote, label, owner, lock_timeout, fanout,
            event, StageOptions(install, pip_args, system_site_packages), keep, held,
        )  # fmt: skip


def _locked_deploy(
    tally: Tally,
    release: Release,
    conns: Conns,
    sharing: phases.Sharing,
    reps: Conns,
    remote: str,
    label: str,
    owner: lock.LockOwner,
    lock_timeout: float,
    fanout: int,
    event: EventCallback,
    options: StageOptions,
    keep: int,
    held: contextlib.ExitStack,
) -> DeployReport:
    """Lock every target directory, run the locked steps, give every lock back."""
    try:
        if sharing.failures:
            tally.results.clear()
            for node, failure in sharing.failures.items():
                tally.fail(node, failure)
            tally.hold_back(
                f"not switched: {', '.join(sorted(sharing.failures))} failed; nothing staged"
            )
            return tally.report("aborted")
        members = {connection_node(g[0]): [connection_node(c) for c in g] for g in sharing.groups}
        tally.shared = [m for m in members.values() if len(m) > 1]
        locked = lock.acquire(
            reps, remote, label, owner, lock_timeout, fanout, event, sharing.nonces
        )
        tally.results.clear()
        tally.details.clear()
        lock_failed = {n: v for n, v in locked.items() if isinstance(v, Failure)}
        if lock_failed:
            for node, failure in lock_failed.items():
                for member in members[node]:
                    tally.fail(member, failure)
            tally.hold_back(
                f"not switched: {', '.join(sorted(lock_failed))} failed; nothing staged"
            )
            return tally.report("aborted")
        probes = {n: Probe.parse(str(text)) for n, text in locked.items()}
        with lock.Heartbeat(reps, remote, owner.run):
            run = _Locked(tally, release, reps, members, probes, remote, fanout, event, held)
            return run.deploy(options, keep)
    finally:
        lock.release(
            [c for c in conns if connection_node(c) not in sharing.failures],
            remote,
            owner.run,
            sharing.nonces,
            fanout,
            final=True,
        )


def _dry_run(
    tally: Tally,
    release: Release,
    todo: Conns,
    remote: str,
    current: dict[str, str],
    fanout: int,
) -> DeployReport:
    """What staging would send where; nothing changes on any node."""
    for node, value in phases.plan(todo, release, remote, current, fanout).items():
        if isinstance(value, Failure):
            tally.fail(node, value)
            continue
        message = (
            f"would send {value.bytes} bytes ({value.sent_files} files, {value.reused} "
            f"reused) to {tally.label}/releases/{release.name}"
        )
        tally.ok(node, NodeState.DRY_RUN, message, **_facts(value))
    return tally.report("dry-run" if all(r.ok for r in tally.results.values()) else "aborted")


class _Locked:
    """The steps that run while this deploy holds the lock of every target directory."""

    def __init__(
        self,
        tally: Tally,
        release: Release,
        reps: Conns,
        members: dict[str, list[str]],
        probes: dict[str, Probe],
        remote: str,
        fanout: int,
        event: EventCallback,
        held: contextlib.ExitStack,
    ) -> None:
        self.tally, self.reps, self.members = tally, list(reps), members
        #: Where the signal guard is entered: it stays until the locks are given back.
        self.held = held
        self.probes, self.remote, self.fanout = probes, remote, fanout
        self.event = event
        self.release = release
        self.new = f"releases/{self.release.name}"
        #: Where each target's ``current`` points now (None: unknown), as the steps report.
        self.position: dict[str, str | None] = {n: p.link for n, p in probes.items()}
        self.in_flight: set[str] = set()

    def each(self, rep: str) -> list[str]:
        return self.members[rep]

    def note(self, rep: str) -> str:
        """What the locked probe found that the user should know (a lost switch)."""
        probe = self.probes[rep]
        if probe.unconfirmed:
            return (
                f"; reconciled: it was on {_name(probe.link)}, which never went live on every node"
            )
        return ""

    def track(self, node: str, what: str) -> None:
        """Keep :attr:`position` true while nodes switch, for an interrupted report."""
        if what in ("switching", "reverting"):
            self.in_flight.add(node)
        else:
            self.in_flight.discard(node)
            if what == "switched":
                self.position[node] = self.new
            elif what == "reverted":
                self.position[node] = self.probes[node].link
            elif what == "unknown":
                self.position[node] = None
        self.event(node, what)

    def deploy(self, options: StageOptions, keep: int) -> DeployReport:
        tally, release = self.tally, self.release
        unchanged = [
            c
            for c in self.reps
            if self.probes[connection_node(c)].content_hash == release.content_hash
        ]
        todo = [c for c in self.reps if c not in unchanged]
        for conn in unchanged:
            rep = connection_node(conn)
            link = self.probes[rep].link
            for member in self.each(rep):
                tally.ok(
                    member,
                    NodeState.UNCHANGED,
                    f"unchanged: already at {link}{self.note(rep)}",
                    current=link,
                )
        if not todo:
            confirm = [c for c in unchanged if self.probes[connection_node(c)].unconfirmed]
            phases.commit(confirm, self.remote, self._names(confirm), self.fanout)
            return tally.report("unchanged")

        staged = phases.stage(
            todo,
            release,
            self.remote,
            dict(self.position),
            options,  # type: ignore[arg-type]
            self.fanout,
            self.event,
        )
        if any(isinstance(v, Failure) for v in staged.values()):
            return self._abort_staging(todo, staged)
        plans = {n: v for n, v in staged.items() if isinstance(v, Plan)}

        guard = SignalGuard()
        switched: dict[str, Failure | None] = {}
        stuck: dict[str, Failure | None] = {}
        committed: dict[str, Failure | None] = {}
        interrupted = False
        self.held.enter_context(guard)
        try:
            switched = phases.switch(todo, self.remote, release.name, self.fanout, self.track)
            if any(switched.values()):
                back = [c for c in todo if switched[connection_node(c)] is None]
                previous = {n: p.link for n, p in self.probes.items()}
                stuck = phases.revert(back, self.remote, previous, self.fanout, self.track)
            else:
                committed = phases.commit(
                    self.reps, self.remote, self._names(self.reps), self.fanout
                )
        except KeyboardInterrupt:  # a second Ctrl-C: stop where we are, say where that is
            interrupted = True
        guard.abortable = False  # from here on, every signal waits for the report
        if interrupted:
            report = self._interrupted(todo, plans)
            raise DeployInterrupted("deploy interrupted while switching", report, signal.SIGINT)
        bad = {n: f for n, f in switched.items() if f is not None}
        warnings = {n: f for n, f in committed.items() if f is not None}
        if not bad and guard.signum is None:
            pruned = phases.prune(self.reps, self.remote, keep, self.fanout)
            warnings.update({n: f for n, f in pruned.items() if f is not None})
        for node, failure in warnings.items():
            log.warning("%s: warning: %s", node, failure.reason)
        self._switch_results(todo, plans, bad, {n: f for n, f in stuck.items() if f}, warnings)
        report = tally.report("aborted" if bad else "switched")
        if guard.signum is not None:
            name = signal.Signals(guard.signum).name
            raise DeployInterrupted(
                f"deploy stopped by {name} once every node was "
                f"{'switched back' if bad else 'switched'}",
                report,
                guard.signum,
            )
        return report

    def _names(self, reps: Conns) -> dict[str, str]:
        """The release each target is on now, to record as live."""
        names = {}
        for conn in reps:
            rep = connection_node(conn)
            link = self.position.get(rep) or self.probes[rep].link
            names[rep] = _name(link)
        return names

    def _abort_staging(self, todo: Conns, staged: dict[str, Plan | Failure]) -> DeployReport:
        """Staging failed somewhere: remove what was staged, switch nothing."""
        answering = [
            c
            for c in todo
            if not isinstance(v := staged[connection_node(c)], Failure) or v.error is None
        ]
        phases.discard(answering, self.remote, self.release, self.fanout)
        blame = ", ".join(sorted(n for n, v in staged.items() if isinstance(v, Failure)))
        for conn in todo:
            rep = connection_node(conn)
            value = staged[rep]
            for member in self.each(rep):
                if isinstance(value, Failure):
                    self.tally.fail(member, value)
                else:
                    message = f"not switched: {blame} failed; the staged copy was removed"
                    self.tally.held(member, NodeState.ABORTED, message, **_facts(value))
        log.warning("deploy aborted: staging failed on %s", blame)
        return self.tally.report("aborted")

    def _switch_results(
        self,
        todo: Conns,
        plans: dict[str, Plan],
        bad: dict[str, Failure],
        stuck: dict[str, Failure],
        warnings: dict[str, Failure],
    ) -> None:
        name = self.release.name
        for conn in todo:
            rep = connection_node(conn)
            facts = _facts(plans.get(rep))
            for member in self.each(rep):
                if member != rep:
                    facts = {**facts, "shared_with": rep}
                if rep in bad and bad[rep].uncertain:
                    self._unknown(member, bad[rep], f"unknown: may be on release {name}", facts)
                elif rep in bad:
                    self.tally.fail(
                        member, bad[rep], current=self.probes[rep].link or None, **facts
                    )
                elif rep in stuck and stuck[rep].uncertain:
                    self._unknown(
                        member, stuck[rep], f"unknown: may still be on release {name}", facts
                    )
                elif rep in stuck:
                    # Still on the new release while the others went back: a failure.
                    self.tally.fail(member, stuck[rep], current=self.new, **facts)
                elif bad:
                    self.tally.held(
                        member,
                        NodeState.REVERTED,
                        f"not switched: switched back, {', '.join(sorted(bad))} failed",
                        current=self.probes[rep].link or None,
                        **facts,
                    )
                else:
                    self._switched(member, rep, warnings.get(rep), facts)

    def _unknown(self, member: str, failure: Failure, message: str, facts: dict[str, Any]) -> None:
        self.tally.set(member, NodeState.UNKNOWN, failure.result(member, message=message), **facts)

    def _switched(
        self, member: str, rep: str, warning: Failure | None, facts: dict[str, Any]
    ) -> None:
        note = "" if member == rep else f" (shared with {rep})"
        message = f"switched to {self.release.name}{note}{self.note(rep)}"
        if warning is not None:
            facts = {**facts, "warning": f"warning: {warning.reason}"}
            message = f"{message}; warning: {warning.reason}"
        stderr = warning.stderr if warning else ""
        self.tally.set(
            member,
            NodeState.SWITCHED,
            NodeResult(member, 0, "", stderr, None, 0.0, message),
            **facts,
        )

    def _interrupted(self, todo: Conns, plans: dict[str, Plan]) -> DeployReport:
        """After a second Ctrl-C: every node's release, as far as anyone can know."""
        name = self.release.name
        for conn in todo:
            rep = connection_node(conn)
            where = None if rep in self.in_flight else self.position.get(rep)
            for member in self.each(rep):
                facts = _facts(plans.get(rep))
                if where is None:
                    result = NodeResult(
                        member,
                        None,
                        error="interrupted while switching",
                        message=f"unknown: may be on release {name}",
                    )
                    self.tally.set(member, NodeState.UNKNOWN, result, **facts)
                elif where == self.new:
                    self.tally.ok(
                        member,
                        NodeState.SWITCHED,
                        f"switched to {name}; then the deploy was interrupted",
                        **facts,
                    )
                else:
                    self.tally.held(
                        member,
                        NodeState.ABORTED,
                        "not switched: interrupted",
                        current=where or None,
                        **facts,
                    )
        return self.tally.report("interrupted")
