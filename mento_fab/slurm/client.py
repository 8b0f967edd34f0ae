"""The Slurm client: Slurm commands for one beamtime, run on a submit node over SSH.

Every Slurm client command runs on a *submit node* (the first reachable
reserved node, or one named by the caller) over the same paramiko connection
the rest of the toolkit uses; no ``ssh`` processes, no sockets of our own, and
every argument is built with :func:`shlex.quote`. What the commands print is
read by :mod:`mento_fab.slurm.parse`.

Example (a lab started with ``inv lab.up --slurm`` and its exports)::

    from mento_fab.slurm import Slurm

    with Slurm.open() as slurm:          # the active beamtime's metadata
        job = slurm.submit("job.sh", ["scan 42"])
        print(job.wait().exit_code)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shlex
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import fabric

from mento_fab import defaults
from mento_fab.connection import connection_node, describe_error, ensure_open
from mento_fab.errors import (
    MissingFile,
    NodeError,
    NoOnlineAnalysis,
    NoSubmitNode,
    ReservationError,
    SelectionError,
    SlurmError,
    SlurmUnavailable,
    UnknownJob,
)
from mento_fab.metadata import BeamtimeMetadata, SlurmInfo
from mento_fab.nodes import nodes_group
from mento_fab.results import NodeResult
from mento_fab.runner import LineCallback, execute
from mento_fab.session import Session
from mento_fab.slurm.job import Job
from mento_fab.slurm.parse import (
    JobInfo,
    Reservation,
    check_job_id,
    controller_unreachable,
    parse_job,
    parse_job_id,
    parse_job_status,
    parse_reservation,
    parse_scancel,
    parse_squeue,
    squeue_format,
    status_format,
)

__all__ = ["COMMAND_TIMEOUT", "Slurm", "default_job_name", "pick_submit_node", "sbatch_argv"]

log = logging.getLogger(__name__)

#: Seconds a Slurm client command (sbatch, squeue, scontrol, scancel) may take.
COMMAND_TIMEOUT = 60.0
#: Where uploaded job scripts go, relative to the account's home on the submit node.
UPLOAD_DIR = ".mento_fab/jobs"


def default_job_name(md: BeamtimeMetadata) -> str:
    """``mento_<beamline>_<beamtime>``, the original toolkit's default."""
    return f"mento_{md.beamline}_{md.beamtime}"


def slurm_info(md: BeamtimeMetadata) -> SlurmInfo:
    """The metadata's partition and reservation; bad input without an onlineAnalysis block."""
    if md.online is None:
        raise NoOnlineAnalysis(md.beamtime, "compute nodes or Slurm reservation")
    return md.online.slurm


def sbatch_argv(
    md: BeamtimeMetadata,
    script: str,
    args: Sequence[str] = (),
    *,
    job_name: str | None = None,
    time: str | None = defaults.SLURM_TIME,
    dependency: str | None = None,
    output: str | None = None,
    error: str | None = None,
    nodes: int | str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The sbatch argv for the beamtime's partition and reservation (quote with shlex.join)."""
    info = slurm_info(md)
    argv = [
        "sbatch",
        "--parsable",
        f"--partition={info.partition}",
        f"--reservation={info.reservation}",
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


def complaint(result: NodeResult) -> str:
    """Slurm's own message for a failed command, one line."""
    if result.error:
        return f"{result.node}: {result.error}"
    lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
    text = "; ".join(lines[-3:]) or "no message"
    return f"{text} (exit {result.exit} on {result.node})"


def raise_failure(command: str, result: NodeResult) -> NoReturn:
    """SlurmUnavailable when slurmctld did not answer, else SlurmError with Slurm's words.

    A result with ``error`` set means the submit node itself failed (lost, unreachable,
    timed out): :class:`NoSubmitNode` (exit 255, as ssh), not a Slurm refusal.
    """
    if result.error is not None:
        raise NoSubmitNode(f"{command} not completed: submit node {complaint(result)}")
    if result.error is None:
        said = [ln.strip() for ln in f"{result.stderr}\n{result.stdout}".splitlines()]
        down = [ln for ln in said if controller_unreachable(ln)]
        if down:
            raise SlurmUnavailable(
                f"Slurm controller cannot be reached from {result.node}: {down[-1]}"
            )
    raise SlurmError(f"{command} failed: {complaint(result)}")


def _looks_local(text: str) -> bool:
    """Whether a script path that is not a local file was meant as one (a typo).

    ``./job.sh``, ``~/job.sh``, or ``scripts/job.sh`` where ``scripts`` exists here:
    sending those to sbatch on the node would only fail there with a vaguer message.
    Absolute paths and plain names may well name a script on the submit node.
    """
    if text.startswith(("./", "../", "~")):  # as typed: Path("./x") drops the "./"
        return True
    path = Path(text)
    return not path.is_absolute() and len(path.parts) > 1 and Path(path.parts[0]).is_dir()


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

    Build one with :meth:`open` (from metadata), :meth:`from_group`, or from an
    existing Connection (``own=True`` makes :meth:`close` close it). The
    Connection is re-opened by itself if it drops between calls.
    """

    def __init__(
        self, conn: fabric.Connection, metadata: BeamtimeMetadata, *, own: bool = False
    ) -> None:
        self.conn = conn
        self.md = metadata
        self.info = slurm_info(metadata)
        self.owns_connection = own
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
        """Connect to the submit node (``submit_node`` or the first reachable reserved node).

        ``group_options`` go to :func:`mento_fab.nodes.nodes_group` (``ssh_config``,
        ``connect_timeout``, ``host_keys``...).
        """
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
        return cls(conn, metadata, own=True)

    @property
    def node(self) -> str:
        """The submit node."""
        return connection_node(self.conn)

    def close(self) -> None:
        """Close the Connection if this client owns it."""
        if self.owns_connection:
            self.conn.close()

    def __enter__(self) -> Slurm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing
    def connect(self) -> fabric.Connection:
        """The open Connection (re-opened if it dropped; one thread at a time)."""
        with self._lock:
            ensure_open(self.conn)
        return self.conn

    def call(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = COMMAND_TIMEOUT,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        on_line: LineCallback | None = None,
    ) -> NodeResult:
        """Run one command on the submit node; with ``check``, SlurmError if it fails
        (SlurmUnavailable when it says slurmctld cannot be reached).

        A failure to re-open the connection shows in the result (``error``).
        """
        line = shlex.join(argv)
        log.debug("%s: %s", self.node, line)
        with contextlib.suppress(Exception):
            self.connect()
        result = execute(self.conn, line, timeout=timeout, env=env, on_line=on_line)
        if check and not result.ok:
            raise_failure(argv[0], result)
        return result

    def upload(self, local: str | os.PathLike[str]) -> str:
        """Copy a local job script to the submit node; returns its absolute path there.

        The name carries a hash of the content, so re-submitting an edited script
        never races a queued job still reading the old one.
        """
        path = Path(local)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:12]
        sftp = self.connect().sftp()
        current = remote = UPLOAD_DIR
        try:  # SFTP reports failures as bare OSErrors, without the node's name
            home = sftp.normalize(".")
            remote_dir = f"{home}/{UPLOAD_DIR}"
            current = home
            for part in UPLOAD_DIR.split("/"):
                current = f"{current}/{part}"
                try:
                    sftp.stat(current)
                except FileNotFoundError:
                    sftp.mkdir(current, mode=0o700)
            current = remote = f"{remote_dir}/{digest}-{path.name}"
            with sftp.open(remote, "wb") as handle:
                handle.write(data)
            sftp.chmod(remote, 0o700)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise NodeError(
                f"{self.node}: cannot upload {path.name} to {current}: {reason}"
            ) from None
        log.info("uploaded %s to %s:%s", path, self.node, remote)
        return remote

    # -- jobs
    def submit(
        self,
        script: str | os.PathLike[str],
        args: Sequence[str] = (),
        *,
        job_name: str | None = None,
        time: str | None = defaults.SLURM_TIME,
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
            if not upload and _looks_local(os.fspath(script)):
                raise MissingFile(
                    f"{script}: no such local file (a script already on the submit node "
                    "is named by its absolute path, or by a plain name in the home directory)"
                )
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
        return Job(check_job_id(job_id), self)

    def show_job(self, job_id: str | int, name: str | None = None) -> JobInfo | None:
        """``scontrol show job``: None when slurmctld does not know (or no longer knows) it.

        ``name``, the name the job was submitted with, settles a name that mimics
        scontrol's own fields (see :func:`~mento_fab.slurm.parse.parse_job`).
        """
        job_id = check_job_id(job_id)
        result = self.call(["scontrol", "-o", "show", "job", job_id], check=False)
        if not result.ok:
            if result.error is None and "Invalid job id" in result.stderr:
                return None
            raise_failure("scontrol", result)
        # one job, one record; a name with a newline spreads it over several lines
        return parse_job(result.stdout.strip("\n"), name)

    def job_status(self, job_id: str | int) -> JobInfo | None:
        """A job's state, exit code, nodes and elapsed time, asked for by id alone.

        ``squeue --Format`` of fields without free text: the job's name (left
        empty here) cannot matter. None when slurmctld does not (or no longer) know it.
        """
        job_id = check_job_id(job_id)
        argv = ["squeue", "--noheader", f"--jobs={job_id}", "--states=all",
                f"--Format={status_format()}"]  # fmt: skip
        result = self.call(argv, check=False)
        if not result.ok:
            if result.error is None and "Invalid job id" in result.stderr:
                return None
            raise_failure("squeue", result)
        return parse_job_status(result.stdout, job_id)

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
        """scancel the given jobs, or with ``all`` every job of :meth:`jobs`.

        Returns the ids Slurm accepted to cancel; a job that had already ended is
        left out. A named id Slurm does not know raises UnknownJob (after the
        others were cancelled, which the message names); any other refusal
        (another user's job) raises SlurmError.
        """
        named = list(dict.fromkeys(check_job_id(j) for j in job_ids))
        ids = named + ([j.id for j in self.jobs() if j.id not in named] if all else [])
        if not ids:
            return []
        # Without --verbose, scancel says nothing and exits 0 for a job it does not know.
        result = self.call(["scancel", "--verbose", *ids], check=False)
        refused = parse_scancel(result.stderr)
        if result.error is not None or (result.exit != 0 and not refused):
            raise_failure("scancel", result)
        if any(controller_unreachable(why) for why in refused.values()):
            raise_failure("scancel", result)
        cancelled = [i for i in ids if i not in refused]
        unknown = [i for i in named if "Invalid job id" in refused.get(i, "")]
        other = {
            i: why
            for i, why in refused.items()
            if i in named and i not in unknown and "already completing or completed" not in why
        }
        if cancelled:
            log.info("cancelled %s", ", ".join(cancelled))
        if not (unknown or other):
            return cancelled
        problems = [f"unknown job {i} (Slurm does not know it)" for i in unknown]
        problems += [f"scancel refused job {i}: {why}" for i, why in other.items()]
        if cancelled:
            problems.append(f"cancelled {', '.join(cancelled)}")
        kind = UnknownJob if not other else SlurmError
        raise kind(
            "; ".join(problems), {"cancelled": cancelled, "unknown": unknown, "refused": other}
        )

    def reservation(self) -> Reservation:
        """The beamtime's reservation; ReservationError when Slurm does not know it,
        SlurmUnavailable when slurmctld cannot be reached."""
        name = self.info.reservation
        result = self.call(["scontrol", "-o", "show", "reservation", name], check=False)
        text = result.stdout.strip()
        if result.ok and text.startswith("ReservationName="):
            return parse_reservation(text)
        said = f"{result.stdout}\n{result.stderr}"
        missing = "not found" in said or (result.ok and not text)
        if result.error is None and missing and not controller_unreachable(said):
            raise ReservationError(
                f"reservation {name} not found on {self.node} (not created yet, or over "
                "and removed); ask the cluster admins"
            )
        raise_failure("scontrol", result)
