"""What Slurm 22.05's client commands print, read back into data (pure: no I/O).

22.05 without accounting sets the limits of what can be parsed:

- no ``--json`` in scontrol (``scontrol: unrecognized option '--json'``):
  ``scontrol -o show job/reservation`` is ``key=value`` text. Values are free
  text (a job name may be ``x JobState=COMPLETED ExitCode=0:0``, or hold a
  newline), so nothing is taken from "the first ``Key=``": a job's line is
  matched against Slurm's fixed field order around the name (``JobName=`` ...
  `` UserId=u(uid) GroupId=`` ... ``ExitCode=n:m``), and a reservation's keys
  are looked up in their order;
- ``squeue`` is read with ``--noheader --format``: each record starts with a
  random per-call token and its fields are split by an ASCII unit separator
  (``\\x1f``), the free-text job name last, so a name cannot fake a row;
- a job is *followed* with ``squeue --jobs=ID --Format`` of fields that hold no
  free text at all (:func:`status_format`), so its name cannot matter there;
- no ``sacct``: a job's exit code is known only while slurmctld remembers the
  job (``MinJobAge``, 300 s by default, 30 s in the lab).

>>> parse_job_status(status_record("12", "FAILED", "768", "0:02", "cn01"), "12").exit_code
3
>>> controller_unreachable("slurm_load_jobs error: Unable to contact slurm controller")
True
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ClusterShell.NodeSet import NodeSet, NodeSetParseError

from mento_fab.errors import BadInput, SlurmError

__all__ = [
    "TERMINAL_STATES",
    "JobInfo",
    "Reservation",
    "check_job_id",
    "controller_unreachable",
    "parse_job",
    "parse_job_id",
    "parse_job_status",
    "parse_key_values",
    "parse_reservation",
    "parse_scancel",
    "parse_squeue",
    "squeue_format",
    "status_format",
    "status_record",
]

log = logging.getLogger(__name__)

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
#: ``squeue --Format`` fields that follow a job by id: none holds free text.
_STATUS_FIELDS = ("JobID", "State", "exit_code", "TimeUsed", "NodeList", "Reason")
#: ``scontrol -o show job`` from JobName= to ExitCode= (22.05's fixed order; only the
#: name is free text there, and may span lines). ``{name}`` is lazy or greedy.
_JOB_HEAD = (
    r"JobId=(?P<JobId>\S+) (?:\S+=\S* )*?JobName=(?P<JobName>{name}) "
    r"UserId=(?P<UserId>\S*) GroupId=\S* MCS_label=\S* Priority=\d+ Nice=-?\d+ "
    r"Account=\S* QOS=\S* (?:WCKey=\S* )?JobState=(?P<JobState>[A-Z_]+) "
    r"Reason=(?P<Reason>\S*(?: \S+)*?) Dependency=\S* Requeue=\d+ Restarts=\d+ "
    r"BatchFlag=\d+ Reboot=\d+ ExitCode=(?P<ExitCode>\d+:\d+)(?=\s|$)"
)
_JOB_HEAD_FIRST = re.compile(_JOB_HEAD.format(name=r"[\s\S]*?"))
_JOB_HEAD_LAST = re.compile(_JOB_HEAD.format(name=r"[\s\S]*"))
#: What follows ExitCode= up to the first free text (Command=, WorkDir=, StdOut=, ...).
_JOB_TAIL_KEYS = ("RunTime", "TimeLimit", "NodeList", "BatchHost")
_RESERVATION_KEYS = (
    "ReservationName", "StartTime", "EndTime", "Duration", "Nodes", "NodeCnt", "CoreCnt",
    "Features", "PartitionName", "Flags", "TRES", "Users", "Groups", "Accounts", "Licenses",
    "State", "BurstBuffer", "Watts", "MaxStartDelay",
)  # fmt: skip
_JOB_ID = re.compile(r"^\d+(?:_\d+)?(?:\.\w+)?$")
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")
_SCANCEL_ERROR = re.compile(r"Kill job error on job id (\S+): (.+)$", re.M)
#: How Slurm's clients say that slurmctld did not answer (slurm_strerror texts).
_UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out on send/recv operation",
    "Slurm backup controller in standby mode",
)
_MISSING = ("(null)", "None", "Unknown", "N/A", "")


def controller_unreachable(text: str) -> bool:
    """Whether a Slurm client's message says slurmctld could not be reached."""
    return any(phrase in text for phrase in _UNREACHABLE)


def check_job_id(job_id: str | int) -> str:
    """A Slurm job id (``12``, ``12_3``, ``12.batch``) as text; BadInput for anything else."""
    job_id = str(job_id).strip()
    if not _JOB_ID.match(job_id):
        raise BadInput(f"not a Slurm job id: {job_id!r}")
    return job_id


def parse_job_id(stdout: str) -> str:
    """The job id from ``sbatch --parsable`` (``ID`` or ``ID;cluster``)."""
    text = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = text.split(";", 1)[0].strip()
    if not _JOB_ID.match(job_id):
        raise SlurmError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return job_id


def parse_scancel(stderr: str) -> dict[str, str]:
    """``scancel --verbose`` complaints per job id (``{"99": "Invalid job id specified"}``).

    scancel exits 0 and says nothing without ``--verbose`` when a job does not exist.
    """
    return {m.group(1): m.group(2).strip() for m in _SCANCEL_ERROR.finditer(stderr)}


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


def _fold(nodes: Iterable[str]) -> str:
    return str(NodeSet.fromlist(list(nodes)))


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
        data["nodeset"] = _fold(self.nodes) if self.nodes else ""
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


def status_format() -> str:
    """The ``squeue --Format`` value :func:`parse_job_status` reads (no padding, no name)."""
    return ",".join(f"{name}:{_SEP}" for name in _STATUS_FIELDS)


def status_record(
    job_id: str, state: str, status: str, elapsed: str = "", nodes: str = "", reason: str = ""
) -> str:
    """One record as ``squeue --Format=<status_format()>`` prints it (for tests and docs)."""
    return "".join(f"{v}{_SEP}" for v in (job_id, state, status, elapsed, nodes, reason)) + "\n"


def parse_job_status(text: str, job_id: str) -> JobInfo | None:
    """Job ``job_id`` from ``squeue --noheader --jobs=ID --states=all --Format=<status_format()>``.

    ``exit_code`` there is the raw wait status (``768`` is exit 3, ``15`` signal
    15); the name is not asked for, so it is left empty. None when the job is not
    in the output.
    """
    for line in text.splitlines():
        parts = line.split(_SEP)
        if len(parts) < len(_STATUS_FIELDS) or parts[0].strip() != job_id:
            continue
        _id, state, status, elapsed, nodelist, reason = (p.strip() for p in parts[:6])
        try:
            raw = int(status)
            code = f"{(raw >> 8) & 0xFF}:{raw & 0x7F}"
        except ValueError:
            code = None
        state = state.split()[0] if state else "UNKNOWN"
        return JobInfo(
            id=job_id,
            state=state,
            nodes=_expand(nodelist),
            elapsed=elapsed,
            reason="" if reason in _MISSING else reason,
            exit_code=_exit_code(state, code),
        )
    return None


def parse_job(text: str, name: str | None = None) -> JobInfo:
    """``scontrol -o show job ID`` output (one job, possibly over several lines) as a JobInfo.

    The name is the only free text before ExitCode=, so the text is matched
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
            "nodeset": _fold(self.nodes) if self.nodes else "",
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
