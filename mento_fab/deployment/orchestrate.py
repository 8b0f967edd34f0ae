"""``deploy()``: the phases of :mod:`.phases` in order, and the all-or-none rule.

1. *probe* every node (what is ``current``?): an unchanged tree stops here;
2. find nodes that share one target directory, so each directory is staged once;
3. *stage* the release on every node (one archive per node over SFTP, checksum
   verified, unpacked into ``releases/.staging-<name>`` and renamed into place);
4. only when every node has staged, *switch* ``current`` on every node with
   ``ln -s`` to a temporary name and ``mv -T`` (one atomic ``rename(2)``); if a
   switch fails, every node that switched is switched back;
5. *prune* old releases, only once every node is on the new one.

If staging fails anywhere, nothing switches and staged releases are removed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node
from mento_fab.deployment import phases
from mento_fab.deployment.envfiles import beamtime_files, default_target
from mento_fab.deployment.phases import EventCallback, Failure, Plan, Probe, StageOptions
from mento_fab.deployment.remote import remote_dir
from mento_fab.deployment.report import DeployReport, NodeDeploy, NodeState
from mento_fab.deployment.scan import Release, build_release
from mento_fab.deployment.secrets import SecretScan
from mento_fab.errors import BadInput
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.results import NodeResult, RunReport
from mento_fab.session import Session

__all__ = ["deploy"]

log = logging.getLogger(__name__)

SessionLike = Session | BeamtimeMetadata | str | os.PathLike[str]


@dataclass
class _Tally:
    """Per-node results and facts as the phases produce them, in the group's order."""

    nodes: list[str]
    results: dict[str, NodeResult] = field(default_factory=dict)
    details: dict[str, NodeDeploy] = field(default_factory=dict)

    def set(self, node: str, state: NodeState, result: NodeResult, **facts: object) -> None:
        self.results[node] = result
        self.details[node] = NodeDeploy(node, state, **facts)  # type: ignore[arg-type]

    def fail(self, node: str, failure: Failure, seconds: float, **facts: object) -> None:
        self.set(node, NodeState.FAILED, failure.result(node, seconds), **facts)

    def ok(
        self, node: str, state: NodeState, message: str, seconds: float = 0.0, **facts: object
    ) -> None:
        self.set(node, state, NodeResult(node, 0, seconds=seconds, message=message), **facts)

    def report(
        self,
        outcome: str,
        release: Release,
        label: str,
        start: float,
        shared: list[list[str]] | None = None,
    ) -> DeployReport:
        run = RunReport(
            f"deploy {release.name} to {label}",
            [self.results[n] for n in self.nodes],
            time.monotonic() - start,
        )
        details = {n: self.details[n] for n in self.nodes if n in self.details}
        return DeployReport(
            "deploy",
            outcome,
            label,
            release.name,
            release.content_hash,
            run,
            shared or [],
            details,
        )


def _facts(plan: Plan) -> dict[str, object]:
    return {
        "bytes": plan.bytes,
        "sent_files": plan.sent_files,
        "reused": plan.reused,
        "base": plan.base,
    }


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
    on_event: EventCallback | None = None,
    release: Release | None = None,
) -> DeployReport:
    """Deploy ``source`` to ``target`` on every node of ``group``; two-phase, all or none.

    ``session`` is a :class:`~mento_fab.session.Session` (or a metadata file, or a
    :class:`BeamtimeMetadata`, from which one is built): its directory translates
    token paths to what the nodes see. ``install`` builds ``.venv`` in the release
    from ``requirements.txt``/``pyproject.toml`` with ``pip install <pip_args>``
    (e.g. ``--no-index --find-links DIR``) before the switch;
    ``system_site_packages`` lets the venv see the node's own packages.
    ``on_event(node, event)`` is called with ``probed``, ``staging``, ``staged``,
    ``switched``. ``release`` (from :func:`build_release`) skips scanning ``source``.
    Never raises for a node's failure; raises :class:`~mento_fab.errors.BadInput`
    for bad input (a bad target, a source holding a secret).
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
    tally = _Tally([connection_node(c) for c in conns])

    # Phase 0: one read-only command per node: what is current there?
    probed = phases.probe(conns, remote, fanout)
    current: dict[str, str] = {}
    for node, value in probed.items():
        if isinstance(value, Probe):
            current[node] = value.link
            event(node, "probed")
            if value.content_hash == release.content_hash:
                message = f"unchanged: already at {value.link}"
                tally.ok(node, NodeState.UNCHANGED, message, current=value.link)
        else:
            tally.fail(node, value, phases.elapsed(start))
    failed = sorted(n for n, v in probed.items() if isinstance(v, Failure))
    if len(tally.results) == len(conns) or (failed and not dry_run):
        # Nothing to do, or a node we cannot reach: then no node may switch.
        for node in tally.nodes:
            if node not in tally.results:
                tally.ok(node, NodeState.ABORTED, f"not staged: {', '.join(failed)} failed")
        return tally.report("aborted" if failed else "unchanged", release, label, start)
    todo = [c for c in conns if connection_node(c) not in tally.results]

    if dry_run:
        for node, value in phases.plan(todo, release, remote, current, fanout).items():
            if isinstance(value, Failure):
                tally.fail(node, value, phases.elapsed(start))
                continue
            message = (
                f"would send {value.bytes} bytes ({value.sent_files} files, {value.reused} "
                f"reused) to {label}/releases/{release.name}"
            )
            tally.ok(node, NodeState.DRY_RUN, message, **_facts(value))
        outcome = "dry-run" if all(r.ok for r in tally.results.values()) else "aborted"
        return tally.report(outcome, release, label, start)

    # Which nodes share one target directory: stage and switch once per group.
    sharing = phases.find_shared(todo, remote, fanout)
    for node, failure in sharing.failures.items():
        tally.fail(node, failure, phases.elapsed(start))
    reps = [g[0] for g in sharing.groups]
    members = {connection_node(g[0]): [connection_node(c) for c in g] for g in sharing.groups}
    shared = [m for m in members.values() if len(m) > 1]

    # Phase 1: stage on one node per group.
    stage_start = time.monotonic()
    options = StageOptions(install, pip_args, system_site_packages)
    staged = (
        {}
        if sharing.failures
        else phases.stage(reps, release, remote, current, options, fanout, event)
    )
    stage_failed = {n: v for n, v in staged.items() if isinstance(v, Failure)}
    if sharing.failures or stage_failed:
        # Nothing switches anywhere; remove what was staged wherever the connection
        # still works (a dead node's leftovers go with its next deploy).
        answering = [
            c
            for c in reps
            if not isinstance(v := staged.get(connection_node(c)), Failure) or v.error is None
        ]
        phases.discard(answering, remote, release, sharing.nonces, fanout)
        blame = ", ".join(sorted(set(stage_failed) | set(sharing.failures)))
        for rep in reps:
            node = connection_node(rep)
            value = staged.get(node)
            for member in members[node]:
                if isinstance(value, Failure):
                    tally.fail(member, value, phases.elapsed(stage_start))
                elif isinstance(value, Plan):
                    message = f"staged, then removed: not switched ({blame} failed)"
                    tally.ok(member, NodeState.ABORTED, message, **_facts(value))
                else:
                    tally.ok(member, NodeState.ABORTED, "not staged: another node failed")
        log.warning("deploy aborted: staging failed on %s", blame)
        return tally.report("aborted", release, label, start, shared)
    plans: dict[str, Plan] = {n: v for n, v in staged.items() if isinstance(v, Plan)}

    # Phase 2: every group staged: switch everywhere. Nothing is pruned yet, so a
    # failure anywhere can still switch every other node back to what it had.
    switch_start = time.monotonic()
    switched = phases.switch(reps, remote, release, fanout, event)
    bad = {n: f for n, f in switched.items() if f is not None}
    stuck: dict[str, Failure] = {}
    if bad:
        back = [c for c in reps if connection_node(c) not in bad]
        reverted = phases.revert(back, remote, current, fanout)
        stuck = {n: f for n, f in reverted.items() if f is not None}

    # Phase 3: every node is on the new release: prune. A failure leaves an old
    # release behind, a warning only: the nodes are consistent either way.
    warnings: dict[str, Failure] = {}
    if not bad:
        pruned = phases.prune(reps, remote, keep, sharing.nonces, fanout)
        warnings = {n: f for n, f in pruned.items() if f is not None}
        for node, failure in warnings.items():
            log.warning("%s: warning: %s", node, failure.reason)

    new_link = f"releases/{release.name}"
    for rep in reps:
        node = connection_node(rep)
        facts = _facts(plans[node])
        for member in members[node]:
            if member != node:
                facts = {**facts, "shared_with": node}
            if node in bad:
                tally.fail(member, bad[node], phases.elapsed(switch_start), **facts)
            elif node in stuck:
                # Still on the new release while the others went back: a failure.
                tally.fail(
                    member, stuck[node], phases.elapsed(switch_start), current=new_link, **facts
                )
            elif bad:
                message = "switched back: another node failed"
                tally.ok(
                    member, NodeState.REVERTED, message, current=current[node] or None, **facts
                )
            else:
                note = "" if member == node else f" (shared with {node})"
                message = f"switched to {release.name}{note}"
                warning = warnings.get(node)
                if warning is not None:
                    facts = {**facts, "warning": f"warning: {warning.reason}"}
                    message = f"{message}; warning: {warning.reason}"
                tally.set(
                    member,
                    NodeState.SWITCHED,
                    NodeResult(
                        member,
                        0,
                        "",
                        warning.stderr if warning else "",
                        None,
                        phases.elapsed(start),
                        message,
                    ),
                    **facts,
                )
    return tally.report("aborted" if bad else "switched", release, label, start, shared)
