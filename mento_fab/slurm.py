"""Slurm in the beamtime's reservation, driven over the nodes' SSH connections.

Every Slurm client command runs on a *submit node* (the first reachable
reserved node, or one named by the caller) over the same paramiko connection
the rest of the toolkit uses; no ``ssh`` processes, no sockets of our own, and
every argument is built with :func:`shlex.quote`.

Slurm 22.05 without accounting sets the limits of what can be parsed:

- no ``--json`` at all in scontrol (``scontrol: unrecognized option '--json'``):
  ``scontrol -o show job/reservation`` is ``key=value`` text. Values are free
  text (a job name may be ``x JobState=COMPLETED ExitCode=0:0``), so nothing is
  taken from "the first ``Key=``": a job's line is matched against Slurm's fixed
  field order around the name (``JobName=`` ... `` UserId=u(uid) GroupId=``
  ... ``ExitCode=n:m``), and a reservation's keys are looked up in their order;
- ``squeue`` is read with ``--noheader --format``: each record starts with a
  random per-call token and its fields are split by an ASCII unit separator
  (``\\x1f``), the free-text job name last, so a name cannot fake a row;
- no ``sacct``: a job's exit code comes from ``scontrol -o show job`` while
  slurmctld still remembers the job (``MinJobAge``, 300 s by default, 30 s in
  the lab). :meth:`Job.wait` polls far more often than that and a :class:`Job`
  keeps the last state it saw, so a finished job's exit code is not lost once
  seen; a job forgotten before anyone looked ends as state ``UNKNOWN``.

``run_via_slurm`` is ``run-on-nodes --via slurm``: one ``srun`` with one task
per node whose output is split back into the same :class:`RunReport` as the
SSH path. srun only reports the largest exit status, so each task is wrapped to
print a start and an end marker line (a random token, the node's
``SLURMD_NODENAME``, and ``$?``), which also maps ``--label`` task ids to nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import os
import re
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fabric
from ClusterShell.NodeSet import NodeSet, NodeSetParseError

from mento_fab.errors import BadInput, NoSubmitNode, ReservationError, SlurmError
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.nodes import SelectionError, connection_node, fold, nodes_group
from mento_fab.runner import (
    KILL_GRACE,
    LineCallback,
    NodeResult,
    RunReport,
    describe_error,
    ensure_open,
    execute,
)
from mento_fab.session import Session

__all__ = [
    "DEFAULT_IMMEDIATE",
    "DEFAULT_TIME",
    "TERMINAL_STATES",
    "Job",
    "JobInfo",
    "NoSubmitNode",
    "Reservation",
    "ReservationError",
    "Slurm",
    "SlurmError",
    "cancel",
    "default_job_name",
    "jobs",
    "parse_job",
    "parse_key_values",
    "parse_label_output",
    "parse_reservation",
    "parse_squeue",
    "pick_submit_node",
    "reservation",
    "run_via_slurm",
    "sbatch_argv",
    "submit",
]

log = logging.getLogger(__name__)

#: sbatch's --time when the caller gives none (the original toolkit's one day).
DEFAULT_TIME = "1-0"
#: Seconds srun waits for its allocation before giving up (srun --immediate).
DEFAULT_IMMEDIATE = 10
#: Seconds a Slurm client command (sbatch, squeue, scontrol, scancel) may take.
COMMAND_TIMEOUT = 60.0
#: Where uploaded job scripts go, relative to the account's home on the submit node.
UPLOAD_DIR = ".mento_fab/jobs"
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "UNKNOWN",  # forgotten by slurmctld before we saw it end
    }
)
_SEP = "\x1f"
_SQUEUE_FIELDS = ("%i", "%T", "%M", "%D", "%N", "%r", "%j")
#: ``scontrol -o show job`` from JobName= to ExitCode= (22.05's fixed order; only the
#: name is free text there). ``{name}`` is ``.*?`` or ``.*``: see :func:`parse_job`.
_JOB_HEAD = (
    r"JobId=(?P<JobId>\S+) (?:\S+=\S* )*?JobName=(?P<JobName>{name}) "
    r"UserId=(?P<UserId>\S*) GroupId=\S* MCS_label=\S* Priority=\d+ Nice=-?\d+ "
    r"Account=\S* QOS=\S* (?:WCKey=\S* )?JobState=(?P<JobState>[A-Z_]+) "
    r"Reason=(?P<Reason>\S*(?: \S+)*?) Dependency=\S* Requeue=\d+ Restarts=\d+ "
    r"BatchFlag=\d+ Reboot=\d+ ExitCode=(?P<ExitCode>\d+:\d+)(?=\s|$)"
)
_JOB_HEAD_FIRST = re.compile(_JOB_HEAD.format(name=".*?"))
_JOB_HEAD_LAST = re.compile(_JOB_HEAD.format(name=".*"))
#: What follows ExitCode= up to the first free text (Command=, WorkDir=, StdOut=, ...).
_JOB_TAIL_KEYS = ("RunTime", "TimeLimit", "NodeList", "BatchHost")
_RESERVATION_KEYS = (
    "ReservationName", "StartTime", "EndTime", "Duration", "Nodes", "NodeCnt", "CoreCnt",
    "Features", "PartitionName", "Flags", "TRES", "Users", "Groups", "Accounts", "Licenses",
    "State", "BurstBuffer", "Watts", "MaxStartDelay",
)  # fmt: skip
_JOB_ID = re.compile(r"^\d+(?:_\d+)?(?:\.\w+)?$")
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")
_LABEL = re.compile(r"^\s*(\d+): ?(.*)$", re.S)
_MISSING = ("(null)", "None", "Unknown", "N/A", "")


def parse_key_values(text: str, keys: Sequence[str] | None = None) -> dict[str, str]:
    """``scontrol -o show ...`` output as a dict.

    With ``keys`` (the keys Slurm prints, in its order) only those count: each
    is looked for after the previous one found, and a value runs up to the next
    key found, so a value containing ``Word=`` (or a later key) stays whole
    unless it contains the very key that follows it. Without ``keys`` any
    `` Word=`` starts a value and the first occurrence of a key wins: only for
    text whose values Slurm controls.
    """
    if keys is None:
        matches = [(m.group(1), m.start(), m.end()) for m in _KEY.finditer(text)]
    else:
        matches, pos = [], 0
        for key in keys:
            found = re.compile(rf"(?:^|\s)({re.escape(key)})=").search(text, pos)
            if found is not None:
                matches.append((key, found.start(), found.end()))
                pos = found.end()
    values: dict[str, str] = {}
    for i, (key, _start, value_start) in enumerate(matches):
        end = matches[i + 1][1] if i + 1 < len(matches) else len(text)
        values.setdefault(key, text[value_start:end].strip())
    return values


def _time(value: str | None) -> datetime.datetime | None:
    if not value or value in _MISSING:
        return None
    try:
        return datetime.datetime.fromisoformat(value)
    except ValueError:
        return None


def _expand(nodeset: str | None) -> list[str]:
    if not nodeset or nodeset in _MISSING:
        return []
    try:
        return list(NodeSet(nodeset))
    except NodeSetParseError:
        return [nodeset]


def _exit_code(state: str, value: str | None) -> int | None:
    """A finished job's exit status in shell terms: code, else 128+signal, else 1 if not ok."""
    if state not in TERMINAL_STATES or state == "UNKNOWN":
        return None
    code, _, signal = (value or "0:0").partition(":")
    try:
        status, sig = int(code), int(signal or 0)
    except ValueError:
        return None
    if status:
        return status
    if sig:
        return 128 + sig
    return 0 if state == "COMPLETED" else 1


@dataclass
class JobInfo:
    """What Slurm says about one job. ``exit_code`` is set once the job has ended."""

    id: str
    name: str = ""
    state: str = "UNKNOWN"
    nodes: list[str] = field(default_factory=list)
    elapsed: str = ""
    reason: str = ""
    exit_code: int | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["nodeset"] = fold(self.nodes) if self.nodes else ""
        return data


def squeue_format(token: str = "") -> str:
    """The ``--format`` value :func:`parse_squeue` reads; ``token`` starts every record."""
    return token + _SEP.join(_SQUEUE_FIELDS)


def parse_squeue(text: str, token: str = "") -> list[JobInfo]:
    """Records of ``squeue --noheader --format=<squeue_format(token)>``.

    With a ``token`` (random per call) records are split on it, so a job name
    with a newline and a fake row in it stays one name; without, one per line.
    """
    if token:
        records = [r[:-1] if r.endswith("\n") else r for r in text.split(token)[1:]]
    else:
        records = text.splitlines()
    found = []
    for line in records:
        if not line.strip():
            continue
        parts = line.split(_SEP, len(_SQUEUE_FIELDS) - 1)
        if len(parts) != len(_SQUEUE_FIELDS):
            log.warning("unexpected squeue line: %r", line)
            continue
        job_id, state, elapsed, _count, nodelist, reason, name = parts
        found.append(
            JobInfo(
                id=job_id.strip(),
                name=name,
                state=state.strip(),
                nodes=_expand(nodelist.strip()),
                elapsed=elapsed.strip(),
                reason="" if reason in _MISSING else reason,
            )
        )
    return found


def parse_job(text: str, name: str | None = None) -> JobInfo:
    """``scontrol -o show job ID`` output (one job) as a :class:`JobInfo`.

    The name is the only free text before ExitCode=, so the line is matched
    against the fixed fields around it twice, with the shortest and the longest
    possible name. Both agree unless the name itself contains a forged
    `` UserId=... ExitCode=`` sequence; then the ``name`` the caller submitted
    with decides, and without one SlurmError is raised rather than a guess that
    could turn a failed job into a success.
    """
    first, last = _JOB_HEAD_FIRST.match(text), _JOB_HEAD_LAST.match(text)
    if first is None or last is None:
        return _parse_job_loosely(text)
    head = first
    if first.group("JobName") != last.group("JobName"):
        if name is not None and last.group("JobName") == name:
            head = last
        elif name is None or first.group("JobName") != name:
            raise SlurmError(
                f"job {first.group('JobId')}: its name mimics scontrol's fields; cannot "
                "tell them apart (give the name it was submitted with)"
            )
    tail = parse_key_values(text[head.end() :], _JOB_TAIL_KEYS)
    state, reason = head.group("JobState"), head.group("Reason")
    return JobInfo(
        id=head.group("JobId"),
        name=head.group("JobName"),
        state=state,
        nodes=_expand(tail.get("NodeList")),
        elapsed=tail.get("RunTime", ""),
        reason="" if reason in _MISSING else reason,
        exit_code=_exit_code(state, head.group("ExitCode")),
    )


def _parse_job_loosely(text: str) -> JobInfo:
    """A line not in 22.05's shape: the name ends at the first `` UserId=``, and only
    what follows it is searched, so a name cannot set the state or exit code."""
    log.debug("scontrol show job line not in the expected shape: %r", text[:300])
    start = text.find("JobName=")
    user = text.find(" UserId=", start) if start >= 0 else -1
    if start >= 0 and user >= 0:
        name, rest = text[start + len("JobName=") : user], text[user:]
    else:
        name, rest = "", text
    kv = parse_key_values(rest)
    job_id = parse_key_values(text[:start] if start >= 0 else text).get("JobId", "")
    state = (kv.get("JobState") or "UNKNOWN").split()[0]
    reason = kv.get("Reason", "")
    return JobInfo(
        id=job_id,
        name=name,
        state=state,
        nodes=_expand(kv.get("NodeList")),
        elapsed=kv.get("RunTime", ""),
        reason="" if reason in _MISSING else reason,
        exit_code=_exit_code(state, kv.get("ExitCode")),
    )


@dataclass
class Reservation:
    """A Slurm reservation as ``scontrol show reservation`` describes it."""

    name: str
    state: str
    start: datetime.datetime | None
    end: datetime.datetime | None
    nodes: list[str]
    partition: str = ""
    users: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"

    def problem(self, now: datetime.datetime | None = None) -> str | None:
        """Why jobs cannot run in it now (not yet started, over, inactive), or None."""
        now = now or datetime.datetime.now()
        if self.end is not None and self.end <= now:
            return f"reservation {self.name} is over (ended {self.end:%Y-%m-%d %H:%M:%S})"
        if self.start is not None and self.start > now:
            return (
                f"reservation {self.name} is not active yet (starts {self.start:%Y-%m-%d %H:%M:%S})"
            )
        if not self.active:
            return f"reservation {self.name} is {self.state or 'in an unknown state'}"
        return None

    def compare(self, nodes: Iterable[str]) -> tuple[list[str], list[str]]:
        """``(in the metadata only, in the reservation only)`` node lists."""
        expected, actual = set(nodes), set(self.nodes)
        return sorted(expected - actual), sorted(actual - expected)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "nodes": self.nodes,
            "nodeset": fold(self.nodes) if self.nodes else "",
            "partition": self.partition,
            "users": self.users,
            "flags": self.flags,
        }


def parse_reservation(text: str) -> Reservation:
    """``scontrol -o show reservation NAME`` output (22.05 has no ``--json`` for it)."""
    kv = parse_key_values(text, _RESERVATION_KEYS)

    def items(key: str) -> list[str]:
        value = kv.get(key, "")
        return [] if value in _MISSING else value.split(",")

    return Reservation(
        name=kv.get("ReservationName", ""),
        state=kv.get("State", ""),
        start=_time(kv.get("StartTime")),
        end=_time(kv.get("EndTime")),
        nodes=_expand(kv.get("Nodes")),
        partition="" if kv.get("PartitionName") in _MISSING else kv.get("PartitionName", ""),
        users=items("Users"),
        flags=items("Flags"),
    )


# ---------------------------------------------------------------- commands
def default_job_name(md: BeamtimeMetadata) -> str:
    """``mento_<beamline>_<beamtime>``, the original toolkit's default."""
    return f"mento_{md.beamline}_{md.beamtime}"


def _slurm_info(md: BeamtimeMetadata) -> Any:
    if md.online is None:
        raise SelectionError(
            f"beamtime {md.beamtime} has no onlineAnalysis block: no Slurm reservation"
        )
    return md.online.slurm


def sbatch_argv(
    md: BeamtimeMetadata,
    script: str,
    args: Sequence[str] = (),
    *,
    job_name: str | None = None,
    time: str | None = DEFAULT_TIME,
    dependency: str | None = None,
    output: str | None = None,
    error: str | None = None,
    nodes: int | str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The sbatch argv for the beamtime's partition and reservation (quote with shlex.join)."""
    slurm = _slurm_info(md)
    argv = [
        "sbatch",
        "--parsable",
        f"--partition={slurm.partition}",
        f"--reservation={slurm.reservation}",
        f"--job-name={job_name or default_job_name(md)}",
    ]
    if time:
        argv.append(f"--time={time}")
    if dependency:
        argv.append(f"--dependency={dependency}")
    if output:
        argv.append(f"--output={output}")
    if error:
        argv.append(f"--error={error}")
    if nodes is not None:
        argv.append(f"--nodes={nodes}")
    return [*argv, *extra, script, *map(str, args)]


def parse_job_id(stdout: str) -> str:
    """The job id from ``sbatch --parsable`` (``ID`` or ``ID;cluster``)."""
    text = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = text.split(";", 1)[0].strip()
    if not _JOB_ID.match(job_id):
        raise SlurmError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return job_id


def _check_job_id(job_id: str | int) -> str:
    job_id = str(job_id).strip()
    if not _JOB_ID.match(job_id):
        raise BadInput(f"not a Slurm job id: {job_id!r}")
    return job_id


def _complaint(result: NodeResult) -> str:
    """Slurm's own message for a failed command, one line."""
    if result.error:
        return f"{result.node}: {result.error}"
    lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
    text = "; ".join(lines[-3:]) or "no message"
    return f"{text} (exit {result.exit} on {result.node})"


def pick_submit_node(
    connections: Iterable[fabric.Connection], submit_node: str | None = None
) -> fabric.Connection:
    """The named node's Connection, else the first one that connects (opened on return)."""
    conns = list(connections)
    if submit_node is not None:
        chosen = [c for c in conns if connection_node(c) == submit_node]
        if not chosen:
            raise SelectionError(f"submit node {submit_node} is not one of the reserved nodes")
        conns = chosen
    errors = []
    for conn in conns:
        try:
            ensure_open(conn)
            return conn
        except Exception as exc:
            errors.append(f"{connection_node(conn)}: {describe_error(exc, conn.connect_timeout)}")
            log.info("not submitting from %s: %s", connection_node(conn), errors[-1])
    raise NoSubmitNode("no node to run Slurm commands on: " + "; ".join(errors))


class Slurm:
    """Slurm commands for one beamtime, run on one submit node's open Connection.

    Build one with :meth:`open` (from metadata) or from an existing Connection.
    The Connection is re-opened by itself if it drops between calls.
    """

    def __init__(self, conn: fabric.Connection, metadata: BeamtimeMetadata) -> None:
        self.conn = conn
        self.md = metadata
        self.info = _slurm_info(metadata)
        self._own: list[fabric.Connection] = []
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
        *,
        submit_node: str | None = None,
        root_dir: str | os.PathLike[str] | None = None,
        **group_options: Any,
    ) -> Slurm:
        """Connect to the submit node (``submit_node`` or the first reachable reserved node)."""
        md = Session.load(metadata, root_dir).metadata
        return cls.from_group(nodes_group(md, **group_options), md, submit_node=submit_node)

    @classmethod
    def from_group(
        cls,
        group: Iterable[fabric.Connection],
        metadata: BeamtimeMetadata,
        *,
        submit_node: str | None = None,
    ) -> Slurm:
        """Take over a nodes group: keep (and own) the submit node's Connection, close the rest.

        For callers that build the group themselves (the CLI tasks, with their own
        option defaults), so picking and owning the submit node lives in one place.
        """
        conns = list(group)
        try:
            conn = pick_submit_node(conns, submit_node)
        except BaseException:
            for other in conns:
                other.close()
            raise
        for other in conns:
            if other is not conn:
                other.close()
        slurm = cls(conn, metadata)
        slurm._own = [conn]
        return slurm

    @property
    def node(self) -> str:
        """The submit node."""
        return connection_node(self.conn)

    def close(self) -> None:
        """Close the Connection if :meth:`open` made it."""
        for conn in self._own:
            conn.close()

    def __enter__(self) -> Slurm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing
    def call(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = COMMAND_TIMEOUT,
        check: bool = True,
    ) -> NodeResult:
        """Run one Slurm client command on the submit node; raise SlurmError if it fails."""
        line = shlex.join(argv)
        log.debug("%s: %s", self.node, line)
        # one thread at a time re-opens a dropped connection
        with self._lock, contextlib.suppress(Exception):
            ensure_open(self.conn)
        result = execute(self.conn, line, timeout=timeout)
        if check and not result.ok:
            raise SlurmError(f"{argv[0]} failed: {_complaint(result)}")
        return result

    def upload(self, local: str | os.PathLike[str]) -> str:
        """Copy a local job script to the submit node; returns its absolute path there.

        The name carries a hash of the content, so re-submitting an edited script
        never races a queued job still reading the old one.
        """
        path = Path(local)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:12]
        with self._lock:
            ensure_open(self.conn)
        sftp = self.conn.sftp()
        home = sftp.normalize(".")
        remote_dir = f"{home}/{UPLOAD_DIR}"
        current = home
        for part in UPLOAD_DIR.split("/"):
            current = f"{current}/{part}"
            try:
                sftp.stat(current)
            except FileNotFoundError:
                sftp.mkdir(current, mode=0o700)
        remote = f"{remote_dir}/{digest}-{path.name}"
        with sftp.open(remote, "wb") as handle:
            handle.write(data)
        sftp.chmod(remote, 0o700)
        log.info("uploaded %s to %s:%s", path, self.node, remote)
        return remote

    # -- jobs
    def submit(
        self,
        script: str | os.PathLike[str],
        args: Sequence[str] = (),
        *,
        job_name: str | None = None,
        time: str | None = DEFAULT_TIME,
        dependency: str | None = None,
        output: str | None = None,
        error: str | None = None,
        nodes: int | str | None = None,
        upload: bool | None = None,
        extra: Sequence[str] = (),
    ) -> Job:
        """sbatch ``script`` in the reservation and return the :class:`Job`.

        ``upload=None`` uploads ``script`` when it is a local file and otherwise
        takes it as a path on the submit node; ``output=None`` keeps Slurm's
        default (``slurm-%j.out`` in the home directory).
        """
        local = Path(script)
        if upload is None:
            upload = local.is_file()
        remote = self.upload(local) if upload else str(script)
        argv = sbatch_argv(
            self.md, remote, args, job_name=job_name, time=time, dependency=dependency,
            output=output, error=error, nodes=nodes, extra=extra,
        )  # fmt: skip
        result = self.call(argv)
        job = Job(parse_job_id(result.stdout), self, name=job_name or default_job_name(self.md))
        log.info("submitted job %s (%s) from %s", job.id, remote, self.node)
        return job

    def job(self, job_id: str | int) -> Job:
        """A handle on an existing job."""
        return Job(_check_job_id(job_id), self)

    def show_job(self, job_id: str | int, name: str | None = None) -> JobInfo | None:
        """``scontrol show job``: None when slurmctld does not know (or no longer knows) it.

        ``name``, the name the job was submitted with, settles a name that mimics
        scontrol's own fields (see :func:`parse_job`).
        """
        job_id = _check_job_id(job_id)
        result = self.call(["scontrol", "-o", "show", "job", job_id], check=False)
        if result.error:
            raise SlurmError(f"scontrol failed: {_complaint(result)}")
        if result.exit != 0:
            if "Invalid job id" in result.stderr:
                return None
            raise SlurmError(f"scontrol failed: {_complaint(result)}")
        lines = result.stdout.strip().splitlines()
        return parse_job(lines[0] if lines else "", name)

    def jobs(self, *, everyone: bool = False) -> list[JobInfo]:
        """The reservation's queued and running jobs of the beamtime account (or everyone's)."""
        token = "MENTO" + secrets.token_hex(8)
        argv = [
            "squeue",
            "--noheader",
            f"--reservation={self.info.reservation}",
            f"--format={squeue_format(token)}",
        ]
        if not everyone and self.md.online is not None:
            argv.insert(2, f"--user={self.md.online.ssh.user}")
        return parse_squeue(self.call(argv).stdout, token)

    def cancel(self, job_ids: Iterable[str | int] = (), *, all: bool = False) -> list[str]:
        """scancel the given jobs, or with ``all`` every job of :meth:`jobs`; returns the ids."""
        ids = [_check_job_id(j) for j in job_ids]
        if all:
            ids += [j.id for j in self.jobs() if j.id not in ids]
        if not ids:
            return []
        self.call(["scancel", *ids])
        log.info("cancelled %s", ", ".join(ids))
        return ids

    def reservation(self) -> Reservation:
        """The beamtime's reservation; ReservationError when Slurm does not know it."""
        name = self.info.reservation
        result = self.call(["scontrol", "-o", "show", "reservation", name], check=False)
        if result.error:
            raise SlurmError(f"scontrol failed: {_complaint(result)}")
        text = result.stdout.strip()
        if result.exit != 0 or not text or "not found" in text:
            raise ReservationError(
                f"reservation {name} not found on {self.node} (not created yet, or over "
                "and removed); ask the cluster admins"
            )
        return parse_reservation(text.splitlines()[0])

    # -- srun fan-out
    def run(
        self,
        nodes: Sequence[str],
        command: str,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_line: LineCallback | None = None,
        immediate: int = DEFAULT_IMMEDIATE,
        job_name: str | None = None,
    ) -> RunReport:
        """One srun in the reservation, one task per node; a RunReport like the SSH path's."""
        return _SrunFanOut(self, list(nodes), command, timeout, env, on_line, immediate,
                           job_name).run()  # fmt: skip


class Job:
    """A submitted batch job. Keeps the last state it saw, so its exit code outlives
    slurmctld's memory (``MinJobAge``) once observed."""

    def __init__(self, job_id: str, slurm: Slurm, *, name: str = "") -> None:
        self.id = _check_job_id(job_id)
        self.slurm = slurm
        self.name = name
        self.last: JobInfo | None = None

    def __repr__(self) -> str:
        state = self.last.state if self.last else "?"
        return f"Job({self.id!r}, state={state})"

    def info(self) -> JobInfo:
        """Ask slurmctld now; a forgotten job keeps its last seen end, else is UNKNOWN."""
        if self.last is not None and self.last.finished:
            return self.last
        seen = self.slurm.show_job(self.id, self.name or None)
        if seen is None:
            seen = JobInfo(id=self.id, name=self.name, state="UNKNOWN")
            if self.last is not None:
                seen.nodes = self.last.nodes
                seen.elapsed = self.last.elapsed
        self.last = seen
        return seen

    def state(self) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or UNKNOWN."""
        return self.info().state

    @property
    def exit_code(self) -> int | None:
        return self.last.exit_code if self.last else None

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 0.25,
        max_poll: float = 2.0,
        on_state: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """Follow the job to its end; TimeoutError after ``timeout`` seconds.

        Polling starts at ``poll`` and backs off to ``max_poll`` seconds, well
        under any sensible MinJobAge, so the exit code is read before it is lost.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        previous = None
        while True:
            info = self.info()
            if on_state is not None and info.state != previous:
                on_state(info)
            previous = info.state
            if info.finished:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} still {info.state} after {timeout:g} s")
            pause = poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            poll = min(max_poll, poll * 1.5)

    def cancel(self) -> None:
        self.slurm.cancel([self.id])


# -------------------------------------------------------------- srun fan-out
def parse_label_output(
    lines: Iterable[tuple[str, str]], token: str
) -> tuple[dict[int, str], dict[int, dict[str, list[str]]], dict[int, int], list[str]]:
    """Split ``srun --label`` output back per task (a helper for tests and re-parsing).

    Takes ``(stream, line)`` pairs; returns ``(task→node, task→stream→pieces,
    task→exit, unlabelled lines)``.
    """
    splitter = _LabelSplitter(token)
    for stream, line in lines:
        splitter.feed(stream, line)
    return splitter.node_of, splitter.pieces, splitter.exits, splitter.loose


class _LabelSplitter:
    """Turns labelled srun lines into per-task output, exit codes and node names."""

    def __init__(
        self,
        token: str,
        on_line: LineCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token = token
        self.on_line = on_line
        self.clock = clock
        self.node_of: dict[int, str] = {}
        self.pieces: dict[int, dict[str, list[str]]] = {}
        self.exits: dict[int, int] = {}
        self.ended_at: dict[int, float] = {}
        self.loose: list[str] = []
        self._held: dict[int, list[tuple[str, str]]] = {}
        self._lock = threading.Lock()

    def feed(self, stream: str, line: str) -> None:
        with self._lock:
            match = _LABEL.match(line)
            if match is None:
                self.loose.append(line)
                return
            task, text = int(match.group(1)), match.group(2)
            streams = self.pieces.setdefault(task, {"stdout": [], "stderr": []})
            at = text.find(self.token) if stream == "stdout" else -1
            if at < 0:
                streams[stream].append(text + "\n")
                self._emit(task, stream, text)
                return
            before, marker = text[:at], text[at + len(self.token) :].split()
            if before:  # the command's last line had no newline: it stays without one
                streams[stream].append(before)
                self._emit(task, stream, before)
            if len(marker) >= 2 and marker[0] == "start":
                self.node_of[task] = marker[1]
                for held_stream, held in self._held.pop(task, []):
                    self._emit(task, held_stream, held)
            elif len(marker) >= 3 and marker[0] == "end":
                self.node_of.setdefault(task, marker[1])
                try:
                    self.exits[task] = int(marker[2])
                except ValueError:
                    log.warning("bad end marker from task %d: %r", task, text)
                self.ended_at[task] = self.clock()

    def _emit(self, task: int, stream: str, text: str) -> None:
        if self.on_line is None:
            return
        node = self.node_of.get(task)
        if node is None:  # stderr can overtake the start marker on stdout: hold it
            self._held.setdefault(task, []).append((stream, text))
            return
        try:
            self.on_line(node, stream, text)
        except Exception:
            log.exception("line callback failed")

    def flush(self, fallback: Mapping[int, str]) -> None:
        """Emit lines still held for tasks whose start marker never came."""
        with self._lock:
            for task, held in self._held.items():
                self.node_of.setdefault(task, fallback.get(task, f"task{task}"))
                for stream, text in held:
                    self._emit(task, stream, text)
            self._held.clear()


class _SrunFanOut:
    def __init__(
        self,
        slurm: Slurm,
        nodes: list[str],
        command: str,
        timeout: float | None,
        env: Mapping[str, str] | None,
        on_line: LineCallback | None,
        immediate: int,
        job_name: str | None,
    ) -> None:
        if not nodes:
            raise SelectionError("no nodes selected")
        if timeout is not None and timeout <= 0:
            raise BadInput("timeout must be positive")
        self.slurm, self.nodes, self.command = slurm, nodes, command
        self.timeout, self.env, self.on_line = timeout, env, on_line
        self.immediate = max(1, int(immediate))
        self.job_name = job_name or default_job_name(slurm.md)
        self.token = "MENTO-" + secrets.token_hex(8)

    def argv(self) -> list[str]:
        inner = f'"${{SHELL:-/bin/sh}}" -c {shlex.quote(self.command)}'
        if self.timeout is not None:
            inner = f"timeout -k {KILL_GRACE / 2:g} {self.timeout:g} {inner}"
        node = '"${SLURMD_NODENAME:-$(hostname -s)}"'
        wrapper = (
            f"printf '%s start %s\\n' {self.token} {node}; "
            f"{inner} </dev/null; rc=$?; "
            f"printf '%s end %s %s\\n' {self.token} {node} \"$rc\""
        )
        info = self.slurm.info
        argv = [
            "srun",
            f"--partition={info.partition}",
            f"--reservation={info.reservation}",
            f"--job-name={self.job_name}",
            f"--nodelist={fold(self.nodes)}",
            f"--nodes={len(self.nodes)}",
            f"--ntasks={len(self.nodes)}",
            "--ntasks-per-node=1",
            f"--immediate={self.immediate}",
            "--label",
            "--kill-on-bad-exit=0",
        ]
        if self.timeout is not None:
            argv.append(f"--time={math.ceil(self.timeout / 60) + 1}")
        return [*argv, "/bin/sh", "-c", wrapper]

    def run(self) -> RunReport:
        start = time.monotonic()
        splitter = _LabelSplitter(self.token, self.on_line)
        outer = None
        if self.timeout is not None:
            outer = self.timeout + self.immediate + 10 * KILL_GRACE
        with self.slurm._lock, contextlib.suppress(Exception):
            ensure_open(self.slurm.conn)
        log.debug("srun on %s from %s", fold(self.nodes), self.slurm.node)
        result = execute(
            self.slurm.conn,
            shlex.join(self.argv()),
            timeout=outer,
            env=self.env,
            on_line=lambda _node, stream, line: splitter.feed(stream, line),
        )
        # A partial last line reaches on_line at EOF through execute's splitter close.
        fallback = dict(enumerate(self.nodes))
        splitter.flush(fallback)
        report = RunReport(command=self.command, seconds=time.monotonic() - start)
        by_node = {node: task for task, node in splitter.node_of.items()}
        failure = self._failure(result, splitter.loose)
        for node in self.nodes:
            task = by_node.get(node)
            res = NodeResult(node=node)
            if task is not None:
                streams = splitter.pieces.get(task, {"stdout": [], "stderr": []})
                res.stdout = "".join(streams["stdout"])
                res.stderr = "".join(streams["stderr"])
                res.seconds = splitter.ended_at.get(task, time.monotonic()) - start
            else:
                res.seconds = report.seconds
            status = splitter.exits.get(task) if task is not None else None
            if status is None:
                res.error = failure
            elif self.timeout is not None and status in (124, 137) and res.seconds >= self.timeout:
                res.error = f"timed out after {self.timeout:g} s (remote command killed)"
            else:
                res.exit = status
            report.results.append(res)
        for line in splitter.loose:
            if line.startswith("srun: error"):
                log.warning("%s: %s", self.slurm.node, line)
        return report

    def _failure(self, result: NodeResult, loose: list[str]) -> str:
        """Why a node has no end marker: srun's own error, else what the run says."""
        errors = [ln.strip() for ln in loose if "error" in ln.lower() and ln.strip()]
        if errors:
            # "srun: error: Unable to allocate resources: ..." is the useful one
            allocation = [e for e in errors if "allocat" in e.lower() or "reservation" in e]
            return (allocation or errors)[0]
        if result.error:
            return f"srun on {result.node}: {result.error}"
        return f"task did not report back (srun exit {result.exit} on {result.node})"


def run_via_slurm(
    group: Iterable[fabric.Connection],
    md: BeamtimeMetadata,
    command: str,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    submit_node: str | None = None,
    immediate: int = DEFAULT_IMMEDIATE,
) -> RunReport:
    """``run-on-nodes --via slurm``: the group's nodes as one srun in the reservation.

    The submit node is ``submit_node`` or the first of the group that connects;
    when none does, every node ends with that error (no exception).
    """
    conns = list(group)
    nodes = [connection_node(c) for c in conns]
    start = time.monotonic()
    try:
        conn = pick_submit_node(conns, submit_node)
    except SlurmError as exc:
        results = [NodeResult(node=n, error=str(exc)) for n in nodes]
        return RunReport(command=command, results=results, seconds=time.monotonic() - start)
    report = Slurm(conn, md).run(
        nodes, command, timeout=timeout, env=env, on_line=on_line, immediate=immediate
    )
    report.seconds = time.monotonic() - start
    return report


# ------------------------------------------------------- one-call functions
def submit(
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
    submit_node: str | None = None,
    group_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> Job:
    """Submit ``script`` from the beamtime's submit node (see :meth:`Slurm.submit`).

    The returned Job keeps its Slurm connection for ``state()``/``wait()``;
    ``job.slurm.close()`` closes it.
    """
    slurm = Slurm.open(metadata, submit_node=submit_node, **dict(group_options or {}))
    try:
        return slurm.submit(script, args, **options)
    except BaseException:
        slurm.close()
        raise


def jobs(
    *,
    metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
    submit_node: str | None = None,
    **group_options: Any,
) -> list[JobInfo]:
    """The reservation's jobs of the beamtime account."""
    with Slurm.open(metadata, submit_node=submit_node, **group_options) as slurm:
        return slurm.jobs()


def cancel(
    job_ids: Iterable[str | int] = (),
    *,
    all: bool = False,
    metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
    submit_node: str | None = None,
    **group_options: Any,
) -> list[str]:
    """Cancel jobs by id, or all of the account's jobs in the reservation."""
    with Slurm.open(metadata, submit_node=submit_node, **group_options) as slurm:
        return slurm.cancel(job_ids, all=all)


def reservation(
    *,
    metadata: BeamtimeMetadata | str | os.PathLike[str] | None = None,
    submit_node: str | None = None,
    **group_options: Any,
) -> Reservation:
    """The beamtime's reservation as Slurm sees it."""
    with Slurm.open(metadata, submit_node=submit_node, **group_options) as slurm:
        return slurm.reservation()
