"""``put`` and ``get``: a file or a directory to every selected node, or back from each one.

Both return a :class:`~mento_fab.results.RunReport` with one
:class:`~mento_fab.results.NodeResult` per node (``exit`` 0 when done; the remote
``tar``'s status and stderr when it failed; ``error`` when the node could not be
reached or went away, 255 by the exit rule); what mento_fab has to say about a node
is in its ``message``.

``put`` first asks every node where the copy goes (``cp``/``scp`` rules: into an
existing directory, else as the new name) and leaves a nonce file there; nodes that
see each other's nonce share that directory (a cluster home) and it is written
once. ``get`` first lists what the remote path or pattern names on each node, so a
pattern that names nothing, or a local file that would be replaced, is bad input
before anything is written; each node's files land in ``LOCAL_DIR/<node>/``.

Data travels as one tar stream per node over an SSH exec channel
(:mod:`mento_fab.tarstream`, :mod:`mento_fab.remotefs`), with bounded memory.

>>> from mento_fab import nodes_group
>>> group = nodes_group(md, nodes="max-p3a[001-004]")          # doctest: +SKIP
>>> put(group, "analysis.cfg", "/srv/local/run42/").exit_status  # doctest: +SKIP
0
>>> get(group, "/srv/local/run42/*.h5", "results").results[0].message  # doctest: +SKIP
'2 files, 104.9 MB -> results/max-p3a001'
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node, describe_error
from mento_fab.errors import BadPath, LocalExists, NodeError, RemoteNotFound, UnsafeSourceError
from mento_fab.execstream import COMMAND_TIMEOUT, EndedEarly, ExecStream, run_bytes
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.remotefs import (
    PROBE_PREFIX,
    Listed,
    PutTarget,
    list_command,
    nonce_command,
    parse_listing,
    parse_probe,
    probe_command,
    receive_command,
    send_command,
    split_pattern,
)
from mento_fab.results import NodeResult, RunReport
from mento_fab.runner import execute, map_nodes
from mento_fab.session import Session
from mento_fab.tarstream import Entry, UnsafeArchive, extract, scan, write_tar

__all__ = ["get", "human_size", "put"]

#: Receive window of a ``get`` channel: enough to keep a fast link busy.
GET_WINDOW = 4 * 1024 * 1024

MetadataLike = Session | BeamtimeMetadata | str | os.PathLike[str]
OnBytes = Callable[[str, int], object]
OnTotal = Callable[[int], object]


def human_size(n: float) -> str:
    """``104.9 MB``: decimal units, as ``df -H`` and progress bars show them."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _lost(stream: ExecStream | None, exc: BaseException) -> BaseException:
    """A failure once the stream was open is the connection's: say so plainly."""
    if stream is None or isinstance(exc, NodeError):
        return exc
    if isinstance(exc, EOFError | OSError) or not stream.transport.is_active():
        return NodeError("connection lost during the transfer")
    return exc


def _failure(node: str, exc: BaseException, start: float, conn: Any = None) -> NodeResult:
    timeout = getattr(conn, "connect_timeout", None)
    return NodeResult(node, error=describe_error(exc, timeout), seconds=time.monotonic() - start)


# ------------------------------------------------------------------- secrets


def secret_digests(metadata: MetadataLike | None) -> dict[int, dict[str, str]]:
    """The beamtime's key and token files by size and SHA-256 (nothing if unreadable here)."""
    if metadata is None:
        return {}
    md = Session.load(metadata).metadata
    named: list[tuple[str, str]] = []
    if md.online is not None:
        named.append((md.online.ssh.key, "the SSH private key"))
    if md.asapo is not None:
        named += [(md.asapo.token_ro, "an ASAPO token"), (md.asapo.token_rw, "an ASAPO token")]
    found: dict[int, dict[str, str]] = {}
    for path, what in named:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        if data:  # an empty token would match every empty file
            found.setdefault(len(data), {})[hashlib.sha256(data).hexdigest()] = what
    return found


def _refuse_secrets(entries: Iterable[Entry], digests: Mapping[int, Mapping[str, str]]) -> None:
    for entry in entries:
        wanted = digests.get(entry.size)
        if entry.is_dir or not wanted:
            continue
        try:
            digest = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
        except OSError:
            continue
        if digest in wanted:
            raise UnsafeSourceError(
                f"{entry.path}: same content as {wanted[digest]}; refusing to copy it"
            )


# ------------------------------------------------------------------------ put


def _shared_groups(
    conns: list[fabric.Connection], targets: Mapping[str, PutTarget], run: str, fanout: int
) -> tuple[list[list[fabric.Connection]], dict[str, BaseException]]:
    """Nodes that see each other's nonce files write into one directory: one group each."""

    def look(conn: fabric.Connection) -> frozenset[str]:
        res = execute(conn, nonce_command(targets[connection_node(conn)].into, run),
                      timeout=COMMAND_TIMEOUT)  # fmt: skip
        if res.error:
            raise NodeError(res.error)
        return frozenset(line for line in res.stdout.split() if line.startswith(PROBE_PREFIX))

    groups: dict[frozenset[str], list[fabric.Connection]] = {}
    errors: dict[str, BaseException] = {}
    for conn, (node, value) in zip(conns, map_nodes(conns, look, fanout=fanout).items(),
                                   strict=True):  # fmt: skip
        if isinstance(value, BaseException):
            errors[node] = value
        else:
            groups.setdefault(value or frozenset({node}), []).append(conn)
    return list(groups.values()), errors


def _send(
    conn: fabric.Connection,
    entries: list[Entry],
    target: PutTarget,
    command: str,
    on_bytes: OnBytes | None,
) -> NodeResult:
    node = connection_node(conn)
    start = time.monotonic()
    stream = None
    try:
        stream = ExecStream(conn, command)
        progress = (lambda n: on_bytes(node, n)) if on_bytes else None
        renamed = [Entry(target.name + e.name[len(entries[0].name):], e.path, e.is_dir, e.size,
                         e.mode, e.mtime) for e in entries]  # fmt: skip
        try:
            warnings = write_tar(renamed, stream.send, progress)
            stream.channel.shutdown_write()
        except EndedEarly:
            warnings = []
        status = stream.finish()
    except Exception as exc:
        return _failure(node, _lost(stream, exc), start, conn)
    finally:
        if stream is not None:
            stream.close()
    result = NodeResult(node, exit=status, stderr=stream.stderr_text,
                        seconds=time.monotonic() - start)  # fmt: skip
    where = f"{target.physical.rstrip('/')}/{target.name}"
    if status == 0:
        files = sum(not e.is_dir for e in entries)
        size = human_size(sum(e.size for e in entries))
        result.message = f"{files} file{'s' if files != 1 else ''}, {size} -> {where}"
        if warnings:
            result.message += "; " + "; ".join(warnings)
    else:
        result.message = f"not written: tar on the node failed ({where})"
    return result


def put(
    group: Iterable[fabric.Connection],
    local: str | os.PathLike[str],
    remote: str,
    *,
    metadata: MetadataLike | None = None,
    fanout: int = defaults.FANOUT,
    on_total: OnTotal | None = None,
    on_bytes: OnBytes | None = None,
) -> RunReport:
    """Copy ``local`` (a file or a directory) to ``remote`` on every node of ``group``.

    ``remote`` as in ``scp``: an existing directory receives ``local`` under its own
    name, anything else is the new name (a trailing ``/`` creates the directory).
    With ``metadata``, a file with the beamtime key's or a token's content is refused.
    ``on_total(bytes)`` is called once before data flows, ``on_bytes(node, n)`` as it does.
    """
    start = time.monotonic()
    conns = list(group)
    local_path = os.fspath(local)
    name = os.path.basename(os.path.abspath(local_path))
    entries, skipped = scan(local_path, name)
    _refuse_secrets(entries, secret_digests(metadata))
    is_dir = entries[0].is_dir
    run = secrets.token_hex(6)
    nonces = {connection_node(c): f"{PROBE_PREFIX}{run}-{i}" for i, c in enumerate(conns)}
    results: dict[str, NodeResult] = {}
    targets: dict[str, PutTarget] = {}
    refused: dict[str, PutTarget] = {}

    def probe(conn: fabric.Connection) -> NodeResult:
        node = connection_node(conn)
        return execute(conn, probe_command(remote, name, nonces[node]), timeout=COMMAND_TIMEOUT)

    missing = 0
    for node, value in map_nodes(conns, probe, fanout=fanout).items():
        if isinstance(value, BaseException) or value.error or value.exit:
            results[node] = (_failure(node, value, start) if isinstance(value, BaseException)
                             else value)  # fmt: skip
            continue
        target = parse_probe(value.stdout, remote, name)
        if target is None:
            missing += 1
            results[node] = NodeResult(node, exit=1, message=f"{remote}: no such directory")
        elif not target.writable:
            results[node] = NodeResult(node, exit=1, message=f"{target.physical}: not writable")
        elif (target.there == "dir") != is_dir and target.there != "none":
            kind = "a directory" if target.there == "dir" else "not a directory"
            where = f"{target.physical.rstrip('/')}/{target.name}"
            results[node] = NodeResult(node, exit=1, message=f"{where} exists and is {kind}")
            refused[node] = target  # its nonce file is removed at the end
        else:
            targets[node] = target
    if missing == len(conns):
        raise RemoteNotFound(f"{remote}: no such directory on any selected node")
    alive = [c for c in conns if connection_node(c) in targets]
    groups, errors = _shared_groups(alive, targets, run, fanout)
    for node, exc in errors.items():
        results[node] = _failure(node, exc, start)
    size = sum(e.size for e in entries)
    if on_total is not None:
        on_total(size * len(groups))
    by_first = {connection_node(g[0]): g for g in groups}

    def send_group(first: fabric.Connection) -> None:
        members = by_first[connection_node(first)]
        tried: list[str] = []
        for conn in members:  # if one goes away, another sees the same directory
            node = connection_node(conn)
            target = targets[node]
            merge = is_dir and target.there == "dir"
            command = receive_command(target, f"{run}-{len(tried)}", merge, probes=run)
            results[node] = _send(conn, entries, target, command, on_bytes)
            tried.append(node)
            if results[node].error is None:  # tar ran: its answer holds for the group
                break
        done = results[tried[-1]]
        if done.error is not None:
            return  # every member went away: each has its own error
        for conn in members:
            node = connection_node(conn)
            if node not in tried:
                note = "same directory as" if done.ok else "not written: failed on"
                results[node] = NodeResult(
                    node, exit=done.exit, message=f"{note} {tried[-1]} (shared, written once)"
                )

    for node, value in map_nodes([g[0] for g in groups], send_group, fanout=fanout).items():
        if isinstance(value, BaseException):  # a bug, not a node's failure: still one line
            for conn in by_first[node]:
                member = connection_node(conn)
                results.setdefault(member, _failure(member, value, start))
    if refused:  # nodes left out after the probe: their nonce files go

        def tidy(conn: fabric.Connection) -> None:
            into = refused[connection_node(conn)].into
            execute(conn, nonce_command(into, run, remove=True), timeout=COMMAND_TIMEOUT)

        map_nodes([c for c in conns if connection_node(c) in refused], tidy, fanout=fanout)
    if skipped:
        for result in results.values():
            if result.ok:
                result.message = f"{result.message}; skipped: {'; '.join(skipped[:3])}"
    ordered = [results[connection_node(c)] for c in conns]
    return RunReport(f"put {local_path} {remote}", ordered, seconds=time.monotonic() - start)


# ------------------------------------------------------------------------ get


def _conflicts(node_dir: Path, listed: list[Listed], overwrite: bool) -> list[str]:
    """Local paths a node's files would replace (or cannot be written as)."""
    found = []
    for item in listed:
        path = node_dir / item.name
        if not os.path.lexists(path):
            continue
        is_dir = path.is_dir() and not path.is_symlink()
        if item.kind == "d" and not is_dir:
            found.append(f"{path} (not a directory)")
        elif item.kind == "f" and (is_dir or not overwrite):
            found.append(f"{path}{' (a directory)' if is_dir else ''}")
    return found


def _receive(
    conn: fabric.Connection,
    command: str,
    node_dir: Path,
    overwrite: bool,
    refuse: Mapping[int, Mapping[str, str]],
    on_bytes: OnBytes | None,
) -> NodeResult:
    node = connection_node(conn)
    start = time.monotonic()
    stream = None
    message = None
    try:
        stream = ExecStream(conn, command, window=GET_WINDOW)
        progress = (lambda n: on_bytes(node, n)) if on_bytes else None
        try:
            stats = extract(stream, node_dir, overwrite=overwrite, on_bytes=progress,
                            refuse=refuse)  # fmt: skip
        except tarfile.ReadError:  # the stream broke off: the node went away, or tar died
            if not stream.transport.is_active():
                raise NodeError("connection lost during the transfer") from None
            status = stream.finish()
            return NodeResult(node, exit=status or 1, stderr=stream.stderr_text,
                              message="the node's stream broke off",
                              seconds=time.monotonic() - start)  # fmt: skip
        except (UnsafeArchive, LocalExists, OSError) as exc:
            if isinstance(exc, OSError) and not stream.transport.is_active():
                raise NodeError("connection lost during the transfer") from None
            text = str(exc) if not isinstance(exc, OSError) else f"{exc.filename}: {exc.strerror}"
            stream.close()
            return NodeResult(node, exit=1, stderr=stream.stderr_text, message=f"stopped: {text}",
                              seconds=time.monotonic() - start)  # fmt: skip
        status = stream.finish()
    except Exception as exc:
        return _failure(node, _lost(stream, exc), start, conn)
    finally:
        if stream is not None:
            stream.close()
    files = f"{stats.files} file{'s' if stats.files != 1 else ''}"
    message = f"{files}, {human_size(stats.bytes)} -> {node_dir}"
    if stats.skipped:
        message += "; skipped: " + "; ".join(stats.skipped[:3])
        if len(stats.skipped) > 3:
            message += f" (and {len(stats.skipped) - 3} more)"
    exit_status = status if status or not any("not written" in s for s in stats.skipped) else 1
    return NodeResult(node, exit=exit_status, stderr=stream.stderr_text, message=message,
                      seconds=time.monotonic() - start)  # fmt: skip


def get(
    group: Iterable[fabric.Connection],
    remote: str,
    local_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    metadata: MetadataLike | None = None,
    fanout: int = defaults.FANOUT,
    on_total: OnTotal | None = None,
    on_bytes: OnBytes | None = None,
) -> RunReport:
    """Copy what ``remote`` (a path or a pattern) names on each node to ``local_dir/<node>/``.

    Below ``local_dir/<node>/``, each file keeps its path relative to the last
    directory of ``remote`` without a wildcard. Links are followed. Existing local
    files are not replaced unless ``overwrite``; with ``metadata``, a file with the
    beamtime key's or a token's content is not written.
    """
    start = time.monotonic()
    conns = list(group)
    base, pattern = split_pattern(remote)
    root = Path(local_dir)
    if root.exists() and not root.is_dir():
        raise BadPath(f"{root}: not a directory")
    results: dict[str, NodeResult] = {}
    listings: dict[str, list[Listed]] = {}

    def look(conn: fabric.Connection) -> tuple[int, bytes, str]:
        return run_bytes(conn, list_command(base, pattern))

    nothing = 0
    for node, value in map_nodes(conns, look, fanout=fanout).items():
        if isinstance(value, BaseException):
            results[node] = _failure(node, value, start)
            continue
        status, out, err = value
        if status in (3, 4):
            nothing += 1
            what = f"{base}: no such directory" if status == 3 else f"{remote}: nothing matches"
            results[node] = NodeResult(node, exit=1, message=what)
        elif status:
            results[node] = NodeResult(node, exit=status, stderr=err, message="listing failed")
        else:
            listings[node] = parse_listing(out)
    if nothing == len(conns):
        raise RemoteNotFound(f"{remote}: no such file or directory on any selected node")
    conflicts = [c for n, items in listings.items() for c in _conflicts(root / n, items, overwrite)]
    if conflicts:
        more = f" and {len(conflicts) - 1} more" if len(conflicts) > 1 else ""
        raise LocalExists(
            f"{conflicts[0]}{more} would be replaced: use --overwrite, or another LOCAL_DIR"
        )
    if on_total is not None:
        on_total(sum(i.size for items in listings.values() for i in items if i.kind == "f"))
    refuse = secret_digests(metadata)
    command = send_command(base, pattern)
    lock = threading.Lock()

    def fetch(conn: fabric.Connection) -> None:
        node = connection_node(conn)
        outcome = _receive(conn, command, root / node, overwrite, refuse, on_bytes)
        with lock:
            results[node] = outcome

    fetched = map_nodes([c for c in conns if connection_node(c) in listings], fetch, fanout=fanout)
    for node, value in fetched.items():
        if isinstance(value, BaseException):
            results[node] = _failure(node, value, start)
    ordered = [results[connection_node(c)] for c in conns]
    return RunReport(f"get {remote} {root}", ordered, seconds=time.monotonic() - start)
