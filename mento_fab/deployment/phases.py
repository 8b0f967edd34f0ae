"""The steps of a deploy, one function each: probe, find shared targets, plan, stage,
discard, switch, revert, commit, prune (the lock is :mod:`.lock`).

Each step takes the connections it works on and plain inputs, and returns one
value per node: what the step found or did, or a :class:`Failure` (never an
exception: one node's failure is data). :mod:`.orchestrate` decides from these
what happens next, so the all-or-none rule lives in one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fabric

from mento_fab.connection import connection_node, describe_error, ensure_open, open_channel
from mento_fab.deployment import remote as sh
from mento_fab.deployment.report import Failure
from mento_fab.deployment.scan import Release
from mento_fab.errors import StepFailed
from mento_fab.results import NodeResult
from mento_fab.runner import execute, map_nodes

__all__ = [
    "CHUNK",
    "COMMAND_TIMEOUT",
    "INSTALL_TIMEOUT",
    "REMOVE_TIMEOUT",
    "STAGE_MIN_RATE",
    "STAGE_TIMEOUT",
    "EventCallback",
    "Plan",
    "Probe",
    "Sharing",
    "StageOptions",
    "StepFailed",
    "commit",
    "discard",
    "display",
    "find_shared",
    "plan",
    "probe",
    "prune",
    "revert",
    "run_step",
    "stage",
    "switch",
]

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
#: Bound on every short remote command (probe, list, switch, revert): a node that
#: vanishes mid-deploy turns into a "timed out" result instead of a hang.
COMMAND_TIMEOUT = 60.0
#: Removing releases (prune, cleanup of a staged copy) may walk many files.
REMOVE_TIMEOUT = 600.0
#: Staging: a fixed allowance plus the archive at no less than STAGE_MIN_RATE bytes/s
#: (checksum, hard links, unpack); an ``install`` adds INSTALL_TIMEOUT for pip.
STAGE_TIMEOUT = 300.0
STAGE_MIN_RATE = 1_000_000
INSTALL_TIMEOUT = 1800.0
#: Events passed to ``on_event``: (node, event) — for progress and for tests:
#: ``probed``, ``waiting for the lock``, ``staging``, ``staged``, ``switching``,
#: ``switched``, ``not switched``, ``unknown``, ``reverting``, ``reverted``,
#: ``not reverted``.
EventCallback = Callable[[str, str], None]
#: What a failing remote command says when a disk is full.
NO_SPACE = "No space left on device"


# ------------------------------------------------------------------- results


def failure_of(value: BaseException) -> Failure:
    """The :class:`Failure` for an exception a step raised on a node."""
    if isinstance(value, StepFailed):
        return value.failure
    return Failure(error=describe_error(value))


def display(remote: str) -> str:
    """A target as the user wrote it: home-relative ones with ``~/`` again."""
    return remote if remote.startswith("/") else f"~/{remote}"


def run_step(conn: fabric.Connection, command: str, what: str, timeout: float) -> NodeResult:
    """Run one step's command; raise :class:`StepFailed` unless it succeeded."""
    result = execute(conn, command, timeout=timeout)
    if result.error:
        raise StepFailed(Failure(error=result.error, stderr=result.stderr))
    if result.exit != 0:
        lines = [x for x in result.stderr.strip().splitlines() if "previous errors" not in x]
        detail = "; ".join(lines[-3:]) or f"exit {result.exit}"
        raise StepFailed(Failure(f"{what} failed: {detail}", result.exit, result.stderr))
    return result


def _split(
    outcome: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Failure]]:
    done = {n: v for n, v in outcome.items() if not isinstance(v, BaseException)}
    failed = {n: failure_of(v) for n, v in outcome.items() if isinstance(v, BaseException)}
    return done, failed


def _failures(outcome: dict[str, Any]) -> dict[str, Failure | None]:
    """node -> its Failure, or None where the step succeeded (in node order)."""
    return {n: failure_of(v) if isinstance(v, BaseException) else None for n, v in outcome.items()}


# ---------------------------------------------------------------------- probe


@dataclass
class Probe:
    """What a node has now: ``current``'s link (``releases/<name>`` or "") and content hash.

    ``live`` is the last release that went live there (None: the target keeps no history).
    """

    link: str
    content_hash: str
    live: str | None = None
    #: A dead or failed run left uploads or staging directories behind.
    leftovers: bool = False

    @classmethod
    def parse(cls, text: str) -> Probe:
        return cls(*sh.parse_probe(text), sh.parse_live(text), sh.parse_leftovers(text))

    @property
    def unconfirmed(self) -> bool:
        """``current`` is a release that never went live on every node (a lost switch)."""
        name = self.link.rsplit("/", 1)[-1]
        return bool(name) and self.live is not None and name != self.live


def probe(
    conns: Sequence[fabric.Connection], remote: str, fanout: int
) -> dict[str, Probe | Failure]:
    """One read-only command per node: where does ``current`` point, with what content?"""

    def one(conn: fabric.Connection) -> Probe:
        res = run_step(conn, sh.probe_command(remote), "probe", COMMAND_TIMEOUT)
        return Probe.parse(res.stdout)

    done, failed = _split(map_nodes(conns, one, fanout=fanout))
    return {
        connection_node(c): done.get(connection_node(c)) or failed[connection_node(c)]
        for c in conns
    }


# ------------------------------------------------------------- shared targets


@dataclass
class Sharing:
    """Nodes grouped by the target directory they see; the first of a group stages it."""

    groups: list[list[fabric.Connection]]
    failures: dict[str, Failure]
    #: This run's nonce files (removed by :func:`prune` or :func:`discard`).
    nonces: list[str]


def find_shared(conns: Sequence[fabric.Connection], remote: str, fanout: int) -> Sharing:
    """Group nodes that see the same target directory (a cluster home) by nonce files.

    Every node writes its own nonce file, then every node lists which it sees: two
    parallel round trips however many nodes there are.
    """
    run_id = secrets.token_hex(6)
    nonce = {connection_node(c): f".probe-{run_id}-{i}" for i, c in enumerate(conns)}

    def write(conn: fabric.Connection) -> None:
        command = sh.nonce_write_command(remote, nonce[connection_node(conn)])
        run_step(conn, command, "creating the target", COMMAND_TIMEOUT)

    _, failures = _split(map_nodes(conns, write, fanout=fanout))
    alive = [c for c in conns if connection_node(c) not in failures]

    def look(conn: fabric.Connection) -> frozenset[str]:
        res = run_step(conn, sh.nonce_list_command(remote, run_id), "probe", COMMAND_TIMEOUT)
        return frozenset(line for line in res.stdout.split() if line.startswith(".probe-"))

    seen: dict[frozenset[str], list[fabric.Connection]] = {}
    looked, failed = _split(map_nodes(alive, look, fanout=fanout))
    failures.update(failed)
    for conn in alive:
        node = connection_node(conn)
        if node in looked:
            key = looked[node] if nonce[node] in looked[node] else frozenset({nonce[node]})
            seen.setdefault(key, []).append(conn)
    return Sharing(list(seen.values()), failures, list(nonce.values()))


# --------------------------------------------------------------- plan, stage


@dataclass
class Plan:
    """What staging sends to a node: the archive's size, files sent and reused, the base."""

    bytes: int
    sent_files: int
    reused: int
    base: str | None


@dataclass
class StageOptions:
    """How a release is made ready on a node beyond unpacking it."""

    install: bool = False
    pip_args: Sequence[str] = ()
    system_site_packages: bool = False


def read_manifest(conn: fabric.Connection, remote: str) -> list[list[Any]] | None:
    """The entries of the node's current release, or None (then everything is sent)."""
    res = execute(conn, sh.manifest_command(remote), timeout=COMMAND_TIMEOUT)
    if not res.ok:
        if res.error:
            raise StepFailed(Failure(error=res.error))
        return None
    try:
        entries = json.loads(res.stdout)["entries"]
        return [list(e) for e in entries if isinstance(e, list) and len(e) == 4]
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable manifest in the current release", connection_node(conn))
        return None


def _delta(
    conn: fabric.Connection, release: Release, remote: str, link: str
) -> tuple[bytes, list[str], list[list[Any]] | None]:
    base = read_manifest(conn, remote) if link else None
    data, reused = release.archive(base)
    return data, reused, base


def plan(
    reps: Sequence[fabric.Connection],
    release: Release,
    remote: str,
    current: dict[str, str],
    fanout: int,
) -> dict[str, Plan | Failure]:
    """What :func:`stage` would send to each node (``current``: node -> link); changes nothing."""

    def one(conn: fabric.Connection) -> Plan:
        link = current[connection_node(conn)]
        data, reused, _ = _delta(conn, release, remote, link)
        sent = len(release.user_files) - len(reused)
        return Plan(len(data), sent, len(reused), link or None)

    done, failed = _split(map_nodes(reps, one, fanout=fanout))
    return {**done, **failed}


def _upload(sftp: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` with pipelined SFTP writes, and check that all arrived.

    paramiko checks pipelined writes before the final flush only, and never the
    answer to closing the file: flush first, then compare the size on the node.
    """
    view = memoryview(data)
    with sftp.open(path, "wb") as handle:
        handle.set_pipelined(True)
        for start in range(0, len(view), CHUNK):
            handle.write(view[start : start + CHUNK])
        handle.flush()
    size = sftp.stat(path).st_size
    if size != len(data):
        raise OSError(f"{path}: {size} of {len(data)} bytes written")


def _free_bytes(conn: fabric.Connection, path: str) -> int | None:
    """Bytes available to the account on the filesystem holding ``path``, if known."""
    res = execute(conn, f"df -P -k -- {shlex.quote(path)} | tail -n 1", timeout=COMMAND_TIMEOUT)
    fields = res.stdout.split()
    try:
        return int(fields[3]) * 1024 if res.ok else None
    except (IndexError, ValueError):
        return None


def _stage_timeout(size: int, install: bool) -> float:
    """Seconds a stage command may take: generous, but bounded (a vanished node)."""
    seconds = STAGE_TIMEOUT + size / STAGE_MIN_RATE
    return seconds + INSTALL_TIMEOUT if install else seconds


def stage(
    reps: Sequence[fabric.Connection],
    release: Release,
    remote: str,
    current: dict[str, str],
    options: StageOptions,
    fanout: int,
    event: EventCallback,
) -> dict[str, Plan | Failure]:
    """Upload and unpack the release on each node (one per shared target); nothing switches."""

    def one(conn: fabric.Connection) -> Plan:
        node = connection_node(conn)
        event(node, "staging")
        link = current[node]
        data, reused, base_manifest = _delta(conn, release, remote, link)
        base_dir = link.rsplit("/", 1)[-1] if base_manifest is not None and reused else None
        uploads = [(f"{remote}/releases/.{release.name}.tar", data)]
        if base_dir:
            drop = release.dropped(base_manifest or [])
            listing = b"\0".join(p.encode("utf-8", "surrogateescape") for p in drop)
            uploads.append((f"{remote}/releases/.{release.name}.drop", listing))
        no_space = f"no space left on {node}:{display(remote)}"
        try:
            sftp = ensure_open(conn).open_sftp_client()
            # A stalled transfer (vanished node) raises instead of waiting forever.
            sftp.get_channel().settimeout(COMMAND_TIMEOUT)
            try:
                for path, payload in uploads:
                    _upload(sftp, path, payload)
            finally:
                sftp.close()
        except OSError as exc:
            # paramiko's SFTP errors are IOErrors: the node's failure, not bad input.
            # A partial upload must not stay behind (on a full disk it holds the space).
            _remove_uploads(conn, [path for path, _ in uploads])
            # SFTP (version 3) has no "disk full" status: ask the node how much is free.
            free = _free_bytes(conn, f"{remote}/releases")
            if free is not None and free < len(data):
                # The node answered: its failure (exit 1), not a connection problem.
                raise StepFailed(Failure(no_space, exit=1)) from None
            what = exc.strerror or str(exc) or type(exc).__name__
            raise StepFailed(Failure(error=f"upload of {uploads[0][0]} failed: {what}")) from None
        checksum = hashlib.sha256(data).hexdigest()
        command = sh.stage_command(
            remote,
            release,
            checksum,
            base_dir,
            options.install,
            options.pip_args,
            options.system_site_packages,
        )
        try:
            run_step(conn, command, "staging", _stage_timeout(len(data), options.install))
        except StepFailed as exc:
            if NO_SPACE in exc.failure.stderr:
                exc.failure.message = no_space
            raise
        event(node, "staged")
        return Plan(len(data), len(release.user_files) - len(reused), len(reused), link or None)

    done, failed = _split(map_nodes(reps, one, fanout=fanout))
    return {**done, **failed}


def _remove_uploads(conn: fabric.Connection, paths: Sequence[str]) -> None:
    """Best effort: remove what a failed upload left (the node may be gone)."""
    command = "rm -f -- " + " ".join(shlex.quote(p) for p in paths)
    try:
        execute(conn, command, timeout=COMMAND_TIMEOUT)
    except Exception as exc:  # the failure being reported matters more
        log.debug("%s: could not remove a partial upload: %s", connection_node(conn), exc)


def discard(conns: Sequence[fabric.Connection], remote: str, release: Release, fanout: int) -> None:
    """Remove a staged release (and its uploads) wherever the node still answers."""
    command = sh.discard_command(remote, release.name)
    map_nodes(conns, lambda c: execute(c, command, timeout=REMOVE_TIMEOUT), fanout=fanout)


# ------------------------------------------------------------ switch, revert


def _switch_one(
    conn: fabric.Connection, command: str, what: str, event: EventCallback, verb: str, remote: str
) -> None:
    """Run a switch command; a failure after the command reached the node is uncertain.

    The session channel is opened first: when that fails, nothing reached the node
    and it is certainly where it was.
    """
    node = connection_node(conn)
    try:
        channel = open_channel(conn)
    except Exception as exc:
        event(node, f"not {verb}")
        raise StepFailed(Failure(error=describe_error(exc, conn.connect_timeout))) from None
    event(node, verb.replace("switched", "switching").replace("reverted", "reverting"))
    result = execute(conn, command, timeout=COMMAND_TIMEOUT, channel=channel)
    if result.error:
        event(node, "unknown")
        raise StepFailed(Failure(error=result.error, stderr=result.stderr, uncertain=True))
    if result.exit != 0:
        event(node, f"not {verb}")
        lines = result.stderr.strip().splitlines()
        detail = "; ".join(lines[-3:]) or f"exit {result.exit}"
        message = f"{what} failed: {detail}"
        if NO_SPACE in result.stderr:
            message = f"no space left on {node}:{display(remote)}"
        raise StepFailed(Failure(message, result.exit, result.stderr))
    event(node, verb)


def switch(
    reps: Sequence[fabric.Connection],
    remote: str,
    name: str,
    fanout: int,
    event: EventCallback,
) -> dict[str, Failure | None]:
    """Point ``current`` at release ``name`` on each node; None where that succeeded.

    A :class:`Failure` with ``uncertain`` set marks a node lost after the command
    was sent: it may be on either release.
    """
    tmp = f".current-{secrets.token_hex(6)}"
    command = sh.switch_command(remote, f"releases/{name}", tmp)

    def one(conn: fabric.Connection) -> None:
        _switch_one(conn, command, "switching current", event, "switched", remote)

    return _failures(map_nodes(reps, one, fanout=fanout))


def revert(
    conns: Sequence[fabric.Connection],
    remote: str,
    previous: dict[str, str],
    fanout: int,
    event: EventCallback | None = None,
) -> dict[str, Failure | None]:
    """Switch ``conns`` back to ``previous[node]`` (a link; "" removes ``current``).

    None where that succeeded; a :class:`Failure` marks a node still on the new
    release (or, ``uncertain``, maybe).
    """
    tmp = f".current-{secrets.token_hex(6)}"
    tell = event or (lambda node, what: None)

    def one(conn: fabric.Connection) -> None:
        link = previous[connection_node(conn)]
        if link:
            command = sh.switch_command(remote, link, tmp)
        else:
            command = sh.unlink_current_command(remote)
        _switch_one(conn, command, "switching back", tell, "reverted", remote)

    outcome = _failures(map_nodes(conns, one, fanout=fanout))
    for node, failure in outcome.items():
        if failure is not None:
            log.warning("%s: could not switch back: %s", node, failure.reason)
    return outcome


def commit(
    reps: Sequence[fabric.Connection], remote: str, names: dict[str, str], fanout: int
) -> dict[str, Failure | None]:
    """Record ``names[node]`` as live in each node's history (every node is on it now)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def one(conn: fabric.Connection) -> None:
        command = sh.commit_command(remote, names[connection_node(conn)], when)
        run_step(conn, command, "recording the live release", COMMAND_TIMEOUT)

    return _failures(map_nodes(reps, one, fanout=fanout))


def prune(
    reps: Sequence[fabric.Connection], remote: str, keep: int, fanout: int
) -> dict[str, Failure | None]:
    """Remove never-live releases and live ones beyond ``keep``; a failure is only a warning."""
    command = sh.prune_command(remote, keep)

    def one(conn: fabric.Connection) -> None:
        run_step(conn, command, "pruning old releases", REMOVE_TIMEOUT)

    return _failures(map_nodes(reps, one, fanout=fanout))


def elapsed(start: float) -> float:
    return time.monotonic() - start
