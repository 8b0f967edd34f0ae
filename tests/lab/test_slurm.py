"""Slurm in the lab's reservation: sbatch/wait, dependencies, jobs/cancel, reservations, srun.

The parsers are tested on Slurm 22.05's real output shapes first (no lab needed);
the rest runs against the lab's slurmctld and one slurmd per node.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mento_fab.nodes import nodes_group
from mento_fab.runner import run
from mento_fab.slurm import (
    Job,
    LabelSplitter,
    ReservationError,
    Slurm,
    SlurmError,
    parse_job,
    parse_key_values,
    parse_reservation,
    parse_squeue,
    run_via_slurm,
    sbatch_argv,
)
from mento_fab.slurm import parse as slurm_parse

WAIT = 60  # seconds any job in these tests may take at most


def mento(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mento_fab", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------- parsers
RESERVATION_TEXT = (
    "ReservationName=11019999 StartTime=2026-11-24T22:32:19 EndTime=2027-11-24T22:32:19 "
    "Duration=365-00:00:00 Nodes=cn[01-04] NodeCnt=4 CoreCnt=8 Features=(null) "
    "PartitionName=lab Flags=IGNORE_JOBS,SPEC_NODES TRES=cpu=8 Users=mentolab Groups=(null) "
    "Accounts=(null) Licenses=(null) State=ACTIVE BurstBuffer=(null) Watts=n/a "
    "MaxStartDelay=(null)"
)


def test_reservation_key_values_are_parsed() -> None:
    res = parse_reservation(RESERVATION_TEXT)
    assert res.name == "11019999"
    assert res.state == "ACTIVE" and res.active
    assert res.nodes == ["cn01", "cn02", "cn03", "cn04"]
    assert res.start == datetime.datetime(2026, 11, 24, 22, 32, 19)
    assert res.partition == "lab" and res.users == ["mentolab"]
    assert res.flags == ["IGNORE_JOBS", "SPEC_NODES"]
    assert res.problem(now=datetime.datetime(2027, 1, 1)) is None
    assert "not active yet" in res.problem(now=datetime.datetime(2026, 1, 1))
    assert "is over" in res.problem(now=datetime.datetime(2028, 1, 1))
    assert res.compare(["cn01", "cn02", "cn05"]) == (["cn05"], ["cn03", "cn04"])


def job_line(name: str, state: str = "FAILED", code: str = "3:0", tail: str = "") -> str:
    """``scontrol -o show job`` as Slurm 22.05 prints it (copied from the lab)."""
    reason = "NonZeroExitCode" if state == "FAILED" else "None"
    return (
        f"JobId=7 JobName={name} UserId=mentolab(1001) GroupId=mentolab(1001) MCS_label=N/A "
        "Priority=4294901759 Nice=0 Account=(null) QOS=(null) "
        f"JobState={state} Reason={reason} Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
        f"Reboot=0 ExitCode={code} RunTime=00:00:02 TimeLimit=1-00:00:00 TimeMin=N/A "
        "SubmitTime=2026-11-24T23:17:19 Partition=lab AllocNode:Sid=localhost:18 "
        "ReqNodeList=(null) ExcNodeList=(null) NodeList=cn[01-02] BatchHost=cn01 NumNodes=2 "
        "TRES=cpu=2,node=2,billing=2 Features=(null) Reservation=11019999 "
        f"Command=/tmp/j.sh a b WorkDir=/home/mentolab StdErr=/dev/null StdOut=/dev/null{tail}"
    )


def test_job_name_with_spaces_and_equals_like_text_survives() -> None:
    text = job_line("my job|x")
    kv = parse_key_values(text)
    assert kv["JobName"] == "my job|x"
    assert kv["Command"] == "/tmp/j.sh a b"
    job = parse_job(text)
    assert (job.name, job.state, job.exit_code) == ("my job|x", "FAILED", 3)
    assert (job.nodes, job.elapsed) == (["cn01", "cn02"], "00:00:02")


@pytest.mark.parametrize(
    "name",
    [
        "x JobState=COMPLETED ExitCode=0:0",
        "run x=1",
        "a=b c=d NodeList=cn99 RunTime=9",
        " lead and trail ",
        "UserId=evil",
        "x JobState=COMPLETED ExitCode=0:0 UserId=u(1) GroupId=g(1)",
    ],
)
def test_a_job_name_cannot_override_slurms_fields(name: str) -> None:
    job = parse_job(job_line(name, tail=" Comment=JobState=COMPLETED ExitCode=0:0"))
    assert (job.name, job.state, job.exit_code) == (name, "FAILED", 3)
    assert (job.nodes, job.elapsed) == (["cn01", "cn02"], "00:00:02")


def test_a_name_forging_the_whole_field_sequence_is_refused_unless_known() -> None:
    forged = (
        "x UserId=a(1) GroupId=a(1) MCS_label=N/A Priority=1 Nice=0 Account=(null) "
        "QOS=(null) JobState=COMPLETED Reason=None Dependency=(null) Requeue=1 Restarts=0 "
        "BatchFlag=1 Reboot=0 ExitCode=0:0"
    )
    text = job_line(forged)
    with pytest.raises(SlurmError, match="mimics"):
        parse_job(text)
    job = parse_job(text, name=forged)
    assert (job.name, job.state, job.exit_code) == (forged, "FAILED", 3)
    with pytest.raises(SlurmError):
        parse_job(text, name="something else")


def test_a_job_line_of_another_shape_still_keeps_the_name_out() -> None:
    text = (
        "JobId=9 JobName=x JobState=COMPLETED ExitCode=0:0 UserId=u(1) JobState=FAILED ExitCode=2:0"
    )
    job = parse_job(text)
    assert (job.id, job.name, job.state, job.exit_code) == (
        "9", "x JobState=COMPLETED ExitCode=0:0", "FAILED", 2,
    )  # fmt: skip


def test_a_reservation_name_cannot_override_its_fields() -> None:
    text = RESERVATION_TEXT.replace(
        "ReservationName=11019999", "ReservationName=r State=GONE Nodes=x"
    )
    res = parse_reservation(text)
    assert (res.name, res.state, res.nodes[:1]) == ("r State=GONE Nodes=x", "ACTIVE", ["cn01"])


@pytest.mark.parametrize(
    ("state", "code", "expected"),
    [
        ("COMPLETED", "0:0", 0),
        ("FAILED", "3:0", 3),
        ("CANCELLED", "0:15", 143),
        ("TIMEOUT", "0:0", 1),  # ended badly without a code: still not 0
        ("RUNNING", "0:0", None),
    ],
)
def test_exit_codes_from_scontrol(state: str, code: str, expected: int | None) -> None:
    assert parse_job(job_line("j", state, code)).exit_code == expected


def test_squeue_rows_split_on_the_unit_separator_only() -> None:
    row = "\x1f".join(["12", "RUNNING", "1:02", "2", "cn[01-02]", "None", "a|b c\x1fd"])
    (job,) = parse_squeue(row + "\n\n")
    assert job.id == "12" and job.state == "RUNNING" and job.elapsed == "1:02"
    assert job.nodes == ["cn01", "cn02"] and job.reason == ""
    assert job.name == "a|b c\x1fd"  # the name is last: it may contain anything


def test_squeue_records_start_with_the_token_so_a_name_cannot_fake_a_row() -> None:
    fake = "\x1f".join(["13", "RUNNING", "0:01", "1", "cn09", "None", "fake"])
    row = "\x1f".join(["12", "PENDING", "0:00", "1", "", "Priority", f"a\n{fake}"])
    (job,) = parse_squeue(f"TOK{row}\n", "TOK")
    assert (job.id, job.state, job.name) == ("12", "PENDING", f"a\n{fake}")


def test_a_job_is_followed_by_fields_without_free_text() -> None:
    fmt = slurm_parse.status_format()
    assert "Name" not in fmt and "exit_code" in fmt
    text = slurm_parse.status_record("12", "FAILED", "768", "0:02", "cn[01-02]", "NonZeroExitCode")
    job = slurm_parse.parse_job_status(text, "12")
    assert (job.id, job.state, job.exit_code, job.nodes) == ("12", "FAILED", 3, ["cn01", "cn02"])
    assert (job.name, job.elapsed, job.reason) == ("", "0:02", "NonZeroExitCode")
    cancelled = slurm_parse.status_record("13", "CANCELLED", "15")
    assert slurm_parse.parse_job_status(cancelled, "13").exit_code == 143
    running = slurm_parse.status_record("14", "RUNNING", "0", "0:05", "cn01", "None")
    info = slurm_parse.parse_job_status(running, "14")
    assert (info.state, info.exit_code, info.reason, info.finished) == ("RUNNING", None, "", False)
    assert slurm_parse.parse_job_status(running, "15") is None


def test_a_job_line_split_by_a_newline_in_the_name_parses_whole() -> None:
    name = "two\nlines JobState=COMPLETED ExitCode=0:0"
    job = parse_job(job_line(name))
    assert (job.name, job.state, job.exit_code) == (name, "FAILED", 3)


def test_scancel_complaints_and_an_unreachable_controller_are_recognised() -> None:
    stderr = (
        "scancel: Terminating job 2\n"
        "scancel: error: Kill job error on job id 12: Invalid job id specified\n"
        "scancel: error: Kill job error on job id 1: Job/step already completing or completed\n"
    )
    assert slurm_parse.parse_scancel(stderr) == {
        "12": "Invalid job id specified",
        "1": "Job/step already completing or completed",
    }
    down = "slurm_load_reservations error: Unable to contact slurm controller (connect failure)"
    assert slurm_parse.controller_unreachable(down)
    assert not slurm_parse.controller_unreachable("Reservation x not found")


def test_label_output_maps_tasks_to_nodes_and_keeps_a_missing_newline() -> None:
    token = "MENTO-abc"
    lines = [
        ("stderr", " 1: early err"),  # before task 1's start marker arrived
        ("stdout", " 0: MENTO-abc start cn07"),
        ("stdout", " 1: MENTO-abc start cn09"),
        ("stdout", " 0: line one"),
        ("stdout", " 0: "),
        ("stdout", " 0: lastMENTO-abc end cn07 0"),
        ("stdout", "10: MENTO-abc end cn09 5"),
        ("stderr", "srun: error: cn09: task 1: Exited with exit code 5"),
    ]
    splitter = LabelSplitter(token)
    for stream, line in lines:
        splitter.feed(stream, line)
    node_of, pieces, exits = splitter.node_of, splitter.pieces, splitter.exits
    loose = splitter.loose
    assert node_of == {0: "cn07", 1: "cn09", 10: "cn09"}
    assert "".join(pieces[0]["stdout"]) == "line one\n\nlast"
    assert "".join(pieces[1]["stderr"]) == "early err\n"
    assert exits == {0: 0, 10: 5}
    assert loose == ["srun: error: cn09: task 1: Exited with exit code 5"]


def test_sbatch_argv_quotes_arguments_with_spaces(lab_metadata_obj) -> None:
    argv = sbatch_argv(
        lab_metadata_obj, "/x/job.sh", ["a b", "$HOME", "it's"], dependency="afterok:3"
    )
    line = shlex.join(argv)
    assert shlex.split(line) == argv
    assert "--reservation=11019999" in argv and "--dependency=afterok:3" in argv
    assert "--job-name=mento_p11_11019999" in argv and "--time=1-0" in argv


@pytest.fixture
def lab_metadata_obj():
    from mento_fab.metadata import BeamtimeMetadata, OnlineInfo, SlurmInfo, SSHInfo

    return BeamtimeMetadata(
        beamline="p11",
        beamtime="11019999",
        corefs_path="/asap3/petra3/gpfs/p11/2026/data/11019999",
        tag="current",
        online=OnlineInfo(
            ssh=SSHInfo("mentolab", "/nonexistent"),
            slurm=SlurmInfo("lab", "11019999"),
            nodes=["cn01"],
        ),
    )


# ------------------------------------------------------------------- the lab
@pytest.fixture
def slurm(slurm_lab, slurm_session: Path) -> Iterator[Slurm]:
    with Slurm.open(slurm_session, ssh_config=slurm_lab.ssh_config) as client:
        yield client
        client.cancel(all=True)


@pytest.fixture
def workdir(slurm_lab) -> Iterator[str]:
    """A fresh directory in the lab user's (shared) home, as a path on the nodes."""
    path = slurm_lab.home / f"mento-test-{uuid.uuid4().hex[:8]}"
    slurm_lab.ssh("cn01", f"mkdir -p {path}")
    yield str(path)
    slurm_lab.ssh("cn01", f"rm -rf {path}")


def script(tmp_path: Path, body: str, name: str = "job.sh") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_submit_uploads_a_local_script_and_wait_gives_its_success(slurm, tmp_path, workdir):
    job = slurm.submit(
        script(tmp_path, 'echo "args: $1|$2" > "$3"; hostname >> "$3"'),
        ["a b", "it's", f"{workdir}/out"],
        output="/dev/null",
    )
    info = job.wait(timeout=WAIT)
    assert (info.state, info.exit_code) == ("COMPLETED", 0)
    out = slurm.call(["cat", f"{workdir}/out"]).stdout.splitlines()
    assert out[0] == "args: a b|it's"
    assert out[1] in slurm.md.online.nodes


def test_a_failing_job_propagates_its_exit_code(slurm, tmp_path) -> None:
    job = slurm.submit(script(tmp_path, "exit 7"), output="/dev/null")
    info = job.wait(timeout=WAIT)
    assert info.state == "FAILED" and info.exit_code == 7
    assert job.state() == "FAILED"  # kept, also once slurmctld forgets the job


HOSTILE_NAMES = [
    "x JobState=COMPLETED ExitCode=0:0",
    "run x=1",
    "x UserId=a(1) GroupId=a(1) MCS_label=N/A Priority=1 Nice=0 Account=(null) QOS=(null) "
    "JobState=COMPLETED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0",
]


def test_hostile_job_names_cannot_turn_a_failure_into_success(slurm, tmp_path) -> None:
    path = script(tmp_path, "sleep 2; exit 3")
    submitted = [slurm.submit(path, output="/dev/null", job_name=name) for name in HOSTILE_NAMES]
    listed = {j.id: j for j in slurm.jobs()}
    assert [listed[j.id].name for j in submitted] == HOSTILE_NAMES
    for job, name in zip(submitted, HOSTILE_NAMES, strict=True):
        info = job.wait(timeout=WAIT)
        assert (info.state, info.exit_code, info.name) == ("FAILED", 3, name)
    with pytest.raises(SlurmError, match="mimics"):  # no name to tell the forgery apart
        slurm.show_job(submitted[2].id)


def test_a_handle_from_a_bare_id_follows_a_job_with_a_hostile_name(slurm, tmp_path) -> None:
    path = script(tmp_path, "sleep 1; exit 3")
    submitted = slurm.submit(path, output="/dev/null", job_name=HOSTILE_NAMES[2])
    info = slurm.job(submitted.id).wait(timeout=WAIT)  # the name cannot be read: not needed
    assert (info.state, info.exit_code) == ("FAILED", 3)
    plain = slurm.submit(path, output="/dev/null", job_name="plain")
    assert slurm.job(plain.id).wait(timeout=WAIT).name == "plain"  # read once, best effort


def test_waiting_too_long_is_a_job_timeout(slurm, tmp_path) -> None:
    from mento_fab.errors import JobTimeout

    job = slurm.submit(script(tmp_path, "sleep 30"), output="/dev/null")
    try:
        with pytest.raises(JobTimeout, match=f"job {job.id} still") as caught:
            job.wait(timeout=0.5)
        assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, SlurmError)
    finally:
        job.cancel()


def test_cli_submit_wait_with_a_hostile_name_exits_with_the_job_exit_code(
    slurm_lab, slurm_session, tmp_path
) -> None:
    path = script(tmp_path, "exit 3")
    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config)}
    proc = mento("submit", str(path), "--metadata", str(slurm_session), "--output", "/dev/null",
                 "--job-name", HOSTILE_NAMES[0], "--wait", env=env)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "FAILED" in proc.stderr


def test_cli_submit_wait_exits_with_the_job_exit_code(slurm_lab, slurm_session, tmp_path):
    path = script(tmp_path, "exit 5")
    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config)}
    proc = mento("submit", str(path), "--metadata", str(slurm_session), "--output",
                 "/dev/null", "--wait", env=env)  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.strip().isdigit()
    assert "FAILED" in proc.stderr


def test_dependency_orders_jobs(slurm, tmp_path, workdir) -> None:
    first = slurm.submit(
        script(tmp_path, f"sleep 2; echo first >> {workdir}/log", "a.sh"), output="/dev/null"
    )
    second = slurm.submit(
        script(tmp_path, f"echo second >> {workdir}/log", "b.sh"),
        dependency=f"afterok:{first.id}",
        output="/dev/null",
    )
    pending = second.info()
    assert pending.state == "PENDING"
    assert second.wait(timeout=WAIT).exit_code == 0
    assert first.info().state == "COMPLETED"
    assert slurm.call(["cat", f"{workdir}/log"]).stdout == "first\nsecond\n"


def test_dependency_that_can_never_be_met_stays_pending_until_cancelled(slurm, tmp_path):
    failing = slurm.submit(script(tmp_path, "exit 1", "f.sh"), output="/dev/null")
    assert failing.wait(timeout=WAIT).exit_code == 1
    after = slurm.submit(script(tmp_path, "true", "t.sh"), dependency=f"afterok:{failing.id}")
    time.sleep(1)
    assert after.state() == "PENDING"
    after.cancel()
    info = after.wait(timeout=WAIT)
    assert info.state == "CANCELLED" and info.exit_code != 0


def test_jobs_lists_and_cancel_all_removes_this_accounts_jobs(slurm, tmp_path) -> None:
    path = script(tmp_path, "sleep 120")
    submitted = [slurm.submit(path, output="/dev/null", job_name=f"sleeper {i}") for i in range(2)]
    listed = {j.id: j for j in slurm.jobs()}
    for job in submitted:
        assert job.id in listed
        assert listed[job.id].state in ("PENDING", "RUNNING", "CONFIGURING")
    assert {listed[j.id].name for j in submitted} == {"sleeper 0", "sleeper 1"}
    cancelled = slurm.cancel(all=True)
    assert {j.id for j in submitted} <= set(cancelled)
    for job in submitted:
        assert job.wait(timeout=WAIT).state == "CANCELLED"
    assert not [j for j in slurm.jobs() if j.id in cancelled and j.state == "RUNNING"]


def test_cli_jobs_json_and_cancel(slurm_lab, slurm_session, slurm, tmp_path) -> None:
    job = slurm.submit(script(tmp_path, "sleep 120"), output="/dev/null")
    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config), "MENTO_METADATA": str(slurm_session)}
    listed = mento("jobs", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert job.id in [j["id"] for j in json.loads(listed.stdout)["jobs"]]
    cancelled = mento("cancel", "--job", job.id, env=env)
    assert cancelled.returncode == 0 and job.id in cancelled.stdout
    assert job.wait(timeout=WAIT).state == "CANCELLED"
    assert mento("cancel", "--job", "12;rm", env=env).returncode == 2  # not a job id: refused


def test_reservation_is_active_and_matches_the_metadata(slurm, slurm_lab) -> None:
    res = slurm.reservation()
    assert res.name == slurm_lab.reservation and res.active
    assert set(slurm.md.online.nodes) <= set(res.nodes)
    assert res.problem() is None


def test_cli_reservation_shows_the_nodes_the_metadata_lacks(slurm_lab, slurm_session):
    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config), "MENTO_METADATA": str(slurm_session)}
    proc = mento("reservation", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ACTIVE" in proc.stdout
    # the session has cn01..cn04, the lab's reservation holds every node
    assert "in the reservation but not in the metadata: cn[05-" in proc.stdout
    data = json.loads(mento("reservation", "--json", env=env).stdout)
    assert data["only_in_metadata"] == [] and "cn05" in data["only_in_reservation"]


def test_missing_reservation_is_a_clear_error(slurm_lab, tmp_path) -> None:
    md = slurm_lab.make_session(
        tmp_path, slurm_lab.nodes[:2], onlineAnalysis={"slurmReservation": "no_such_resv"}
    )
    with (
        Slurm.open(md, ssh_config=slurm_lab.ssh_config) as client,
        pytest.raises(ReservationError, match="no_such_resv not found"),
    ):
        client.reservation()
    proc = mento("reservation", "--metadata", str(md),
                 env={"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config)})  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no_such_resv not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reservation_not_active_yet_exits_2(slurm_lab, tmp_path) -> None:
    from lab.slurm import client_env

    name = f"future{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["scontrol", "create", "reservation", f"ReservationName={name}", "StartTime=now+1day",
         "Duration=60", f"Users={slurm_lab.user}", "Nodes=cn01",
         f"PartitionName={slurm_lab.partition}", "Flags=OVERLAP"],
        env=client_env(slurm_lab), check=True, capture_output=True,
    )  # fmt: skip
    try:
        md = slurm_lab.make_session(
            tmp_path, slurm_lab.nodes[:1], onlineAnalysis={"slurmReservation": name}
        )
        proc = mento("reservation", "--metadata", str(md),
                     env={"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config)})  # fmt: skip
        assert proc.returncode == 2
        assert "INACTIVE" in proc.stdout
        assert f"reservation {name} is not active yet" in proc.stderr
    finally:
        subprocess.run(["scontrol", "delete", f"ReservationName={name}"],
                       env=client_env(slurm_lab), check=False)  # fmt: skip


# --------------------------------------------------------------- srun fan-out
COMMAND = (
    'printf "out %s\\n\\nno newline" "$(hostname)"; echo "err $(hostname)" >&2; '
    "case $(hostname) in cn02) exit 3;; cn04) exit 9;; esac"
)


def test_via_slurm_matches_the_ssh_path_on_every_node(slurm_lab, slurm_session) -> None:
    group = nodes_group(slurm_session, ssh_config=slurm_lab.ssh_config)
    try:
        over_ssh = run(group, COMMAND)
        seen: list[tuple[str, str, str]] = []
        over_slurm = run_via_slurm(
            group, slurm_session_md(slurm_session), COMMAND, on_line=lambda *a: seen.append(a)
        )
    finally:
        group.close()
    assert [r.node for r in over_slurm.results] == ["cn01", "cn02", "cn03", "cn04"]
    for a, b in zip(over_ssh.results, over_slurm.results, strict=True):
        assert (b.node, b.exit, b.error) == (a.node, a.exit, None)
        assert b.stdout == a.stdout == f"out {a.node}\n\nno newline"
        assert b.stderr == a.stderr == f"err {a.node}\n"
    assert over_slurm.exit_status == over_ssh.exit_status == 9
    assert ("cn03", "stderr", "err cn03") in seen and ("cn02", "stdout", "no newline") in seen


def slurm_session_md(path: Path):
    from mento_fab.metadata import parse_metadata_file

    return parse_metadata_file(path)


def test_cli_via_slurm_json_equals_via_ssh(slurm_lab, slurm_session) -> None:
    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config), "MENTO_METADATA": str(slurm_session)}
    results, shapes = {}, {}
    for via in ("ssh", "slurm"):
        proc = mento("run-on-nodes", COMMAND, "--json", "--via", via, env=env)
        assert proc.returncode == 9, proc.stderr
        data = json.loads(proc.stdout)
        results[via] = [(n["node"], n["exit"], n["stdout"], n["stderr"]) for n in data["nodes"]]
        # the same per-node record and summary as the SSH path (the scaling study compares them)
        shapes[via] = (
            sorted(data), sorted(data["summary"]),
            [(sorted(n), n["error"], n["message"]) for n in data["nodes"]],
        )  # fmt: skip
    assert results["slurm"] == results["ssh"]
    assert shapes["slurm"] == shapes["ssh"]


def test_via_slurm_timeout_and_a_node_subset(slurm_lab, slurm_session) -> None:
    group = nodes_group(slurm_session, nodes="cn[02-03]", ssh_config=slurm_lab.ssh_config)
    try:
        report = run_via_slurm(
            group,
            slurm_session_md(slurm_session),
            '[ "$(hostname)" = cn03 ] && sleep 30; echo done',
            timeout=2,
        )
    finally:
        group.close()
    assert report["cn02"].exit == 0 and report["cn02"].stdout == "done\n"
    assert report["cn03"].exit is None and "timed out after 2 s" in report["cn03"].error
    assert report.seconds < 20
    assert report.exit_status == 255


def test_via_slurm_fails_with_a_message_when_the_nodes_are_busy(
    slurm_lab, slurm_session, slurm, tmp_path
) -> None:
    blocker = slurm.submit(
        script(tmp_path, "sleep 120"), output="/dev/null", nodes=1,
        extra=["--exclusive", "--nodelist=cn02"],
    )  # fmt: skip
    deadline = time.monotonic() + WAIT
    while blocker.state() != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    group = nodes_group(slurm_session, ssh_config=slurm_lab.ssh_config)
    try:
        start = time.monotonic()
        report = run_via_slurm(group, slurm_session_md(slurm_session), "true", immediate=2)
    finally:
        group.close()
        blocker.cancel()
    assert time.monotonic() - start < 20
    assert all(r.exit is None for r in report.results)
    assert "srun: error" in report["cn01"].error
    assert report.exit_status == 255


def test_job_handle_reads_an_existing_job(slurm, tmp_path) -> None:
    job = slurm.submit(script(tmp_path, "true"), output="/dev/null")
    again = slurm.job(job.id)
    assert isinstance(again, Job)
    assert again.wait(timeout=WAIT).exit_code == 0
    with pytest.raises(ValueError):
        slurm.job("1; rm -rf ~")


def test_cli_via_slurm_on_a_chosen_submit_node(slurm_lab, slurm_session) -> None:
    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config), "MENTO_METADATA": str(slurm_session)}
    proc = mento(
        "run-on-nodes", "--via", "slurm", "--submit-node", "cn04", "--json",
        'echo "$(hostname) from $SLURM_SUBMIT_HOST"', env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [n["stdout"] for n in data["nodes"]] == [f"cn0{i} from cn04\n" for i in range(1, 5)]
    outside = mento("run-on-nodes", "--via", "slurm", "--submit-node", "cn09", "true", env=env)
    assert outside.returncode == 2 and "submit node cn09" in outside.stderr


def test_from_group_keeps_the_submit_node_and_the_task_stays_thin(slurm_lab, slurm_session):
    import inspect

    from mento_fab.cli import slurm as slurm_tasks

    group = nodes_group(slurm_session, ssh_config=slurm_lab.ssh_config)
    conns = list(group)
    client = Slurm.from_group(group, slurm_session_md(slurm_session), submit_node="cn03")
    try:
        assert client.node == "cn03" and client.conn.is_connected
        assert [c.is_connected for c in conns] == [False, False, True, False]
        assert client.call(["hostname"]).stdout == "cn03\n"
    finally:
        client.close()
    assert not client.conn.is_connected  # owned: closed with the client
    assert "_own" not in inspect.getsource(slurm_tasks)  # the task goes through the public API


# ------------------------------------------------- what Slurm says, said right
@pytest.fixture
def controller_down(slurm_lab) -> Iterator[None]:
    """slurmctld stopped (slurmds and munged stay up), restarted from its state after."""
    from lab import slurm as lab_slurm

    lab_slurm.stop_controller(slurm_lab)
    try:
        yield
    finally:
        lab_slurm.start_controller(slurm_lab)


def test_a_controller_that_is_down_is_named_not_a_missing_reservation(
    slurm_lab, slurm_session, controller_down
) -> None:
    from mento_fab.errors import SlurmUnavailable

    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config), "MENTO_METADATA": str(slurm_session)}
    proc = mento("reservation", env=env)
    assert proc.returncode == 255, proc.stderr
    assert "Slurm controller cannot be reached" in proc.stderr
    assert "not found" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with Slurm.open(slurm_session, ssh_config=slurm_lab.ssh_config) as client:
        with pytest.raises(SlurmUnavailable, match="cannot be reached"):
            client.jobs()
        group = nodes_group(slurm_session, ssh_config=slurm_lab.ssh_config)
        try:
            report = run_via_slurm(group, client.md, "true", immediate=1)
        finally:
            group.close()
    assert {r.message for r in report.results} == {"Slurm controller cannot be reached"}
    assert all("Unable to contact slurm controller" in r.error for r in report.results)


def test_via_slurm_says_slurm_refused_the_allocation_and_why(slurm_lab, tmp_path) -> None:
    from lab.slurm import client_env

    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config)}
    missing = slurm_lab.make_session(
        tmp_path / "missing", slurm_lab.nodes[:4], onlineAnalysis={"slurmReservation": "nope"}
    )
    proc = mento("run-on-nodes", "--via", "slurm", "true", "--metadata", str(missing), env=env)
    assert proc.returncode == 255, proc.stderr
    assert "Slurm refused the allocation" in proc.stderr
    assert "Requested reservation is invalid" in proc.stderr  # Slurm's reason
    assert "unreachable" not in proc.stderr
    data = json.loads(
        mento("run-on-nodes", "--via", "slurm", "true", "--json", "--metadata", str(missing),
              env=env).stdout
    )  # fmt: skip
    assert {n["message"] for n in data["nodes"]} == {
        "Slurm refused the allocation: reservation nope not found on cn01 (not created yet, "
        "or over and removed); ask the cluster admins"
    }

    name = f"future{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["scontrol", "create", "reservation", f"ReservationName={name}", "StartTime=now+1day",
         "Duration=60", f"Users={slurm_lab.user}", "Nodes=cn[01-02]",
         f"PartitionName={slurm_lab.partition}", "Flags=OVERLAP"],
        env=client_env(slurm_lab), check=True, capture_output=True,
    )  # fmt: skip
    try:
        future = slurm_lab.make_session(
            tmp_path / "future", slurm_lab.nodes[:2], onlineAnalysis={"slurmReservation": name}
        )
        group = nodes_group(future, ssh_config=slurm_lab.ssh_config)
        try:
            report = run_via_slurm(group, slurm_session_md(future), "true", immediate=1)
        finally:
            group.close()
    finally:
        subprocess.run(["scontrol", "delete", f"ReservationName={name}"],
                       env=client_env(slurm_lab), check=False)  # fmt: skip
    for result in report.results:
        assert result.exit is None
        why = f"Slurm refused the allocation: reservation {name} is not active yet"
        assert result.message.startswith(why)  # from the reservation's own record
        assert "srun: error: Unable to allocate resources" in result.error  # srun's own words


def test_cancel_of_a_job_slurm_does_not_know_says_so(slurm_lab, slurm_session, slurm, tmp_path):
    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config), "MENTO_METADATA": str(slurm_session)}
    proc = mento("cancel", "--job", "99999", env=env)
    assert proc.returncode == 1, proc.stderr
    assert "unknown job 99999" in proc.stderr
    assert "cancelled" not in proc.stdout
    job = slurm.submit(script(tmp_path, "sleep 120"), output="/dev/null")
    with pytest.raises(SlurmError, match="unknown job 99998") as caught:
        slurm.cancel([job.id, "99998"])
    assert f"cancelled {job.id}" in str(caught.value)  # the known one was cancelled
    assert job.wait(timeout=WAIT).state == "CANCELLED"


def test_cli_submit_wait_follows_a_job_whose_name_has_a_newline(
    slurm_lab, slurm_session, slurm, tmp_path
) -> None:
    name = "two\nlines JobState=COMPLETED ExitCode=0:0"
    path = script(tmp_path, "sleep 3; exit 4")
    env = {"MENTO_SSH_CONFIG": str(slurm_lab.ssh_config)}
    proc = mento("submit", str(path), "--metadata", str(slurm_session), "--output", "/dev/null",
                 "--job-name", name, "--wait", env=env)  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    assert "exit code lost" not in proc.stderr
    assert "RUNNING" in proc.stderr and "FAILED" in proc.stderr
    job = slurm.submit(path, output="/dev/null", job_name=name)
    assert slurm.job(job.id).info().name == name  # a handle from the id alone reads it whole
    assert job.wait(timeout=WAIT).exit_code == 4


# ------------------------------------------------ the submit node failing is not Slurm failing
def test_a_lost_submit_node_is_no_submit_node_not_a_slurm_error(slurm_lab, slurm_session):
    from mento_fab.errors import NoSubmitNode

    with Slurm.open(slurm_session, ssh_config=slurm_lab.ssh_config, connect_timeout=3) as client:
        node = client.node
        slurm_lab.stop_sshd(node)
        try:
            client.conn.close()  # the next command must re-open: the node is gone
            with pytest.raises(NoSubmitNode, match=f"squeue not completed: submit node {node}: "):
                client.jobs()
        finally:
            slurm_lab.start_sshd(node)


def test_an_upload_the_node_refuses_names_the_node_and_the_path(slurm, slurm_lab, tmp_path):
    from mento_fab.errors import NodeError

    slurm_lab.ssh(slurm.node, "mkdir -p ~/.mento_fab/jobs && chmod 500 ~/.mento_fab/jobs")
    try:
        with pytest.raises(NodeError) as caught:
            slurm.submit(script(tmp_path, "true", name="refused.sh"), output="/dev/null")
    finally:
        slurm_lab.ssh(slurm.node, "chmod 700 ~/.mento_fab/jobs")
    text = str(caught.value)
    assert text.startswith(f"{slurm.node}: cannot upload refused.sh to ")
    assert "/.mento_fab/jobs/" in text and "ermission denied" in text
    assert not isinstance(caught.value, FileNotFoundError | PermissionError)


@pytest.mark.parametrize("typo", ["./no-such-job.sh", "~/no-such-job.sh", "scripts/no-such-job.sh"])
def test_a_mistyped_local_script_is_said_so(slurm, typo, monkeypatch, tmp_path):
    from mento_fab.errors import MissingFile

    (tmp_path / "scripts").mkdir()  # a local directory: scripts/... was meant here
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFile, match="no such local file"):
        slurm.submit(typo, output="/dev/null")
    assert slurm.jobs() == []  # nothing reached sbatch
