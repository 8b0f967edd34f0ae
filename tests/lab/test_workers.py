"""Workers on the lab: detached on every node, killed, restarted, followed, stopped; top.

Each test uses its own worker name (a marker in the command line lets a plain
``ps`` over SSH find every process of it) and leaves nothing running behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from mento_fab import nodes_group
from mento_fab.workers import WorkerSpec, ps, start, stop

NODES = ["cn01", "cn02", "cn03", "cn04"]
WAIT = 30.0


@pytest.fixture
def cli(lab: Lab, lab_session: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    env = {
        **os.environ,
        "MENTO_METADATA": str(lab_session),
        "MENTO_SSH_CONFIG": str(lab.ssh_config),
    }

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mento_fab", *args],
            capture_output=True, text=True, env=env, timeout=timeout,
        )  # fmt: skip

    run.env = env  # type: ignore[attr-defined]
    return run


@pytest.fixture
def group(lab: Lab, lab_session: Path) -> Iterator[Any]:
    grp = nodes_group(lab_session, ssh_config=lab.ssh_config)
    try:
        yield grp
    finally:
        stop(grp, None, grace=1)  # whatever a failed test left running
        grp.close()
        shutil.rmtree(lab.home / ".mento_fab" / "workers", ignore_errors=True)


@pytest.fixture
def marker() -> str:
    return f"mw{uuid.uuid4().hex[:10]}"


def ticking(marker: str, period: float = 1) -> str:
    return f": {marker}; while true; do echo tick $MENTO_WORKER_INDEX; sleep {period}; done"


def node_processes(lab: Lab, node: str) -> list[str]:
    """``comm args`` of every process on the node, listed over plain SSH."""
    proc = lab.ssh(node, "ps -eo comm=,args=")
    assert proc.returncode == 0, proc.stderr
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def left_on(lab: Lab, node: str, marker: str) -> list[str]:
    return [
        p for p in node_processes(lab, node)
        if marker in p or p.startswith(("mento-worker", "tail ", "sleep "))
    ]  # fmt: skip


def ps_json(cli: Callable[..., Any], *args: str) -> tuple[int, dict[str, Any]]:
    proc = cli("ps", "--json", *args)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.2)


def worker_shells(lab: Lab, node: str, marker: str) -> list[int]:
    """Host pids of the worker shells on a node: the leaders of their process groups
    (a shell forking for ``sleep`` briefly has a child with the same command line)."""
    found = []
    for pid, cmd in lab.node_pids(node).items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if marker in cmd and int(stat[2]) == pid:
            found.append(pid)
    return found


def worker_pid(lab: Lab, node: str, marker: str) -> int:
    """Host pid of the worker's shell on a node (to kill it from outside)."""
    found = worker_shells(lab, node, marker)
    assert len(found) == 1, found
    return found[0]


def test_worker_on_every_node_outlives_the_client_restarts_and_stops(
    cli: Callable[..., Any], group: Any, lab: Lab, marker: str
) -> None:
    name = f"tick-{marker}"
    started = cli("start", name, ticking(marker))
    assert started.returncode == 0, started.stderr
    assert "4 nodes: 4 running" in started.stderr
    # The client is gone: the workers are still there, by ps and by plain SSH.
    rc, data = ps_json(cli, name)
    assert rc == 0 and data["summary"]["running"] == 4
    assert sorted(w["node"] for w in data["workers"]) == NODES
    assert all(w["state"] == "running" and w["pid"] for w in data["workers"])
    for node in NODES:
        listed = node_processes(lab, node)
        assert any(marker in p for p in listed), listed
        assert any(p.startswith("mento-worker") for p in listed), listed

    def ticks() -> Any:
        out = json.loads(cli("logs", name, "--lines", "3", "--json").stdout)
        return all("tick 0" in n["stdout"] for n in out["nodes"]) and out

    logs = wait_for(ticks, what="a tick in every node's log")
    assert sorted(n["node"] for n in logs["nodes"]) == NODES

    # sshd restarted on cn03: the worker keeps running, same process.
    pid3 = next(w["pid"] for w in data["workers"] if w["node"] == "cn03")
    lab.restart_sshd("cn03")
    rc, data = ps_json(cli, name)
    assert rc == 0 and next(w["pid"] for w in data["workers"] if w["node"] == "cn03") == pid3
    assert any(marker in p for p in node_processes(lab, "cn03"))

    # Killed on cn02 (no --restart): exited with its status, and ps says so.
    os.kill(worker_pid(lab, "cn02", marker), signal.SIGKILL)

    def exited() -> Any:
        rc, data = ps_json(cli, name)
        row = next(w for w in data["workers"] if w["node"] == "cn02")
        return row["state"] == "exited" and (rc, data, row)

    rc, data, row = wait_for(exited, what="cn02 exited")
    assert row["exit"] == 137 and rc == 1
    assert [w["state"] for w in data["workers"] if w["node"] != "cn02"] == ["running"] * 3

    stopped = cli("stop", name, "--grace", "2")
    assert stopped.returncode == 0, stopped.stderr
    for node in NODES:
        assert left_on(lab, node, marker) == [], node
    rc, data = ps_json(cli, name)
    assert {w["state"] for w in data["workers"]} == {"stopped", "exited"} and rc == 1
    again = cli("stop", name)
    assert again.returncode == 0, again.stderr


def test_on_failure_restarts_a_killed_worker_after_a_backoff(
    group: Any, lab: Lab, marker: str
) -> None:
    name = f"flaky-{marker}"
    spec = WorkerSpec(name, ticking(marker), restart="on-failure", restart_delay=3)
    report = start(group, spec)
    assert report.exit_status == 0, report.run.results
    before = worker_pid(lab, "cn01", marker)
    os.kill(before, signal.SIGKILL)
    seen = []

    def state() -> str:
        row = next(w for w in ps(group, name) if w.node == "cn01")
        seen.append((row.state, row.exit, row.restarts))
        return row.state == "running" and row.restarts == 1 and row

    row = wait_for(state, what="a restart on cn01")
    assert ("failed", 137, 0) in seen
    assert worker_pid(lab, "cn01", marker) != before
    log = (lab.home / ".mento_fab/workers/cn01" / name / "0" / "log").read_text()
    assert "exited with status 137" in log and "restarting in 3s" in log
    assert row.exit == 137


def test_per_node_instances_get_their_index(
    cli: Callable[..., Any], group: Any, lab: Lab, marker: str
) -> None:
    name = f"pair-{marker}"
    assert cli("start", name, ticking(marker, 0.2), "--per-node", "2").returncode == 0
    rc, data = ps_json(cli, name)
    assert rc == 0
    assert sorted((w["node"], w["index"]) for w in data["workers"]) == [
        (n, i) for n in NODES for i in (0, 1)
    ]

    def both() -> Any:
        out = cli("logs", name, "--lines", "2")
        return "tick 0" in out.stdout and "tick 1" in out.stdout and out

    out = wait_for(both, what="lines of both instances")
    assert f"==> {name}[1] <==" in out.stdout
    for node in NODES:
        assert len(worker_shells(lab, node, marker)) == 2


def test_bad_input_exits_2_with_one_line(cli: Callable[..., Any], group: Any, marker: str) -> None:
    name = f"dup-{marker}"
    assert cli("start", name, f": {marker}; sleep 60").returncode == 0
    cases = [
        ("start", "bad/name", "true"),
        ("start", "..", "true"),
        ("start", name, "true"),  # already running
        ("start", "x", "true", "--restart", "sometimes"),
        ("start", "x", "true", "--env", "NOEQUALS"),
        ("logs", f"nope-{marker}"),
        ("stop", f"nope-{marker}"),
        ("ps", f"nope-{marker}"),
        ("stop",),
    ]
    for args in cases:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert proc.stderr.startswith("mento-fab: ")
    assert "--replace" in cli("start", name, "true").stderr
    replaced = cli("start", name, f": {marker}-2; sleep 60", "--replace", "--grace", "1")
    assert replaced.returncode == 0, replaced.stderr


def test_env_values_stay_out_of_argv_and_target_release_is_used(
    cli: Callable[..., Any], group: Any, lab: Lab, marker: str
) -> None:
    secret = f"s3cret-{marker}"
    release = lab.home / "wt-target" / "releases" / "r1"
    (release / ".mento").mkdir(parents=True, exist_ok=True)
    (release / ".mento" / "beamtime.env").write_text("MENTO_BEAMTIME='11019999'\n")
    current = lab.home / "wt-target" / "current"
    current.unlink(missing_ok=True)
    current.symlink_to("releases/r1")
    shutil.chown(lab.home / "wt-target", lab.user)
    name = f"env-{marker}"
    command = (
        f': {marker}; echo "cwd=$(pwd -P) bt=$MENTO_BEAMTIME '
        'ok=$([ "$SECRET" = "$EXPECTED" ] && echo yes)"; while sleep 60; do :; done'
    )
    proc = cli("start", name, command, "--env", f"SECRET={secret}", "--env",
               f"EXPECTED={secret}", "--target", "~/wt-target")  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    def line() -> Any:
        out = json.loads(cli("logs", name, "--json").stdout)
        return all("ok=yes" in n["stdout"] for n in out["nodes"]) and out

    out = wait_for(line, what="the worker's first line on every node")
    assert f"cwd={release} bt=11019999 ok=yes" in out["nodes"][0]["stdout"]
    for node in NODES:
        args = lab.node_exec(node, ["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        assert marker in args.stdout and secret not in args.stdout
    assert secret not in proc.stdout + proc.stderr


def test_a_killed_supervisor_is_lost_and_stop_ends_its_worker(
    cli: Callable[..., Any], group: Any, lab: Lab, marker: str
) -> None:
    # A worker that prints nothing outlives its supervisor (a printing one ends at its
    # next line: its log pipe is gone); stop must still end it.
    name = f"lost-{marker}"
    assert cli("start", name, f": {marker}; while sleep 0.5; do :; done").returncode == 0
    supervisor = [p for p, cmd in lab.node_pids("cn01").items() if "mento-worker" in cmd]
    assert len(supervisor) == 1
    os.kill(supervisor[0], signal.SIGKILL)
    rc, data = wait_for(
        lambda: (r := ps_json(cli, name))[1]["workers"][0]["state"] == "lost" and r,
        what="lost on cn01",
    )
    assert rc == 1 and [w["state"] for w in data["workers"]][1:] == ["running"] * 3
    assert any(marker in p for p in node_processes(lab, "cn01"))  # the worker still runs
    assert cli("stop", name, "--grace", "1").returncode == 0
    for node in NODES:
        assert left_on(lab, node, marker) == [], node
    rc, data = ps_json(cli, name)
    assert [w["state"] for w in data["workers"]] == ["stopped"] * 4


def test_logs_follow_prints_live_until_ctrl_c_and_leaves_nothing(
    cli: Callable[..., Any], group: Any, lab: Lab, marker: str
) -> None:
    # The worker says "ready", waits for a flag file (the home is shared), prints two
    # lines the follower can only have seen live, then goes quiet: a quiet log is where
    # a leftover tail would linger (a busy one dies of SIGPIPE; GNU tail >= 8.28 also
    # ends when its pipe's reader goes, but not behind the per-instance prefix loop).
    name = f"follow-{marker}"
    flag = lab.home / f"go-{marker}"
    command = (
        f": {marker}; echo ready; while [ ! -e ~/go-{marker} ]; do sleep 0.1; done; "
        "echo live-1; echo live-2; while sleep 1; do :; done"
    )
    assert cli("start", name, command, "--per-node", "2").returncode == 0
    follower = subprocess.Popen(
        [sys.executable, "-m", "mento_fab", "logs", name, "--follow", "--lines", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env,
    )  # fmt: skip
    seen: dict[str, list[str]] = {node: [] for node in NODES}

    def read_until(text: str) -> None:
        deadline = time.monotonic() + WAIT
        while not all(f"[{i}] {text}" in lines for lines in seen.values() for i in (0, 1)):
            assert time.monotonic() < deadline and follower.poll() is None, seen
            node, _, line = follower.stdout.readline().rstrip("\n").partition(": ")
            seen.setdefault(node, []).append(line)

    try:
        read_until("ready")
        for node in NODES:
            assert any(p.startswith("tail ") for p in node_processes(lab, node))
        flag.touch()
        read_until("live-2")
        assert all(lines.index("[1] live-1") < lines.index("[1] live-2") for lines in seen.values())
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=WAIT) == 0, follower.stderr.read()
    finally:
        follower.kill()
        follower.wait()
        flag.unlink(missing_ok=True)
    for node in NODES:
        wait_for(lambda n=node: not any(p.startswith("tail ") for p in node_processes(lab, n)),
                 timeout=5, what=f"no tail left on {node}")  # fmt: skip


def test_top_once_json_and_a_node_without_sshd(
    cli: Callable[..., Any], group: Any, lab: Lab, marker: str
) -> None:
    name = f"top-{marker}"
    assert cli("start", name, ticking(marker)).returncode == 0
    proc = cli("top", "--once", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [n["node"] for n in data["nodes"]] == NODES
    for node in data["nodes"]:
        assert node["error"] is None and node["cpus"] >= 1 and node["load1"] is not None
        assert 0 <= node["cpu"] <= 100 and 0 < node["mem_used"] < node["mem_total"]
        assert node["disk"]["free"] > 0 and node["gpus"] == []
        assert [(w["name"], w["state"]) for w in node["workers"]] == [(name, "running")]
    assert data["reservation"]["name"] == "11019999"
    for node in NODES:  # top's sampling loops ended with it
        assert not [p for p in node_processes(lab, node) if "read -r q" in p], node
    lab.stop_sshd("cn04")
    try:
        proc = cli("top", "--once", "--json", "--connect-timeout", "3")
    finally:
        lab.start_sshd("cn04")
    assert proc.returncode == 255
    nodes = {n["node"]: n for n in json.loads(proc.stdout)["nodes"]}
    assert "refused" in nodes["cn04"]["error"] and nodes["cn04"]["load1"] is None
    assert all(nodes[n]["error"] is None and nodes[n]["workers"] for n in NODES[:3])
    plain = cli("top", "--once")
    assert plain.returncode == 0 and "reservation 11019999" in plain.stdout
    assert name in plain.stdout


def test_worker_via_slurm_is_one_job_in_the_reservation(
    slurm_lab: Lab, slurm_session: Path, marker: str
) -> None:
    from mento_fab.slurm import Slurm

    env = {**os.environ, "MENTO_METADATA": str(slurm_session),
           "MENTO_SSH_CONFIG": str(slurm_lab.ssh_config)}  # fmt: skip

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mento_fab", *args], capture_output=True,
                              text=True, env=env, timeout=180)  # fmt: skip

    name = f"sl-{marker}"
    grp = nodes_group(slurm_session, ssh_config=slurm_lab.ssh_config)
    try:
        proc = cli("start", name, ticking(marker), "--via", "slurm", "--json")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        job = data["workers"][0]["job"]
        assert {w["job"] for w in data["workers"]} == {job} and len(data["workers"]) == 4
        with Slurm.open(slurm_session, ssh_config=slurm_lab.ssh_config) as slurm:
            (info,) = [j for j in slurm.jobs() if j.id == job]
            assert info.state == "RUNNING" and sorted(info.nodes) == NODES
        rc, listed = ps_json(cli, name)
        assert rc == 0 and {(w["kind"], w["state"]) for w in listed["workers"]} == {
            ("slurm", "running")}  # fmt: skip

        def ticks() -> Any:
            out = json.loads(cli("logs", name, "--json").stdout)
            return all("tick 0" in n["stdout"] for n in out["nodes"]) and out

        out = wait_for(ticks, what="a tick in every node's log")
        assert sorted(n["node"] for n in out["nodes"]) == NODES
        stopped = cli("stop", name, "--grace", "1")
        assert stopped.returncode == 0, stopped.stderr
        with Slurm.open(slurm_session, ssh_config=slurm_lab.ssh_config) as slurm:
            wait_for(lambda: job not in {j.id for j in slurm.jobs()}, what="the job gone")
        for node in NODES:
            assert left_on(slurm_lab, node, marker) == []
    finally:
        stop(grp, None, grace=1)
        grp.close()
        shutil.rmtree(slurm_lab.home / ".mento_fab" / "workers", ignore_errors=True)


def test_a_pending_slurm_worker_shows_as_pending_and_stop_removes_its_job(
    slurm_lab: Lab, slurm_session: Path, tmp_path: Path, marker: str
) -> None:
    from mento_fab.session import Session
    from mento_fab.slurm import Slurm
    from mento_fab.workers.slurm import start_via_slurm

    md = Session.load(slurm_session).metadata
    name = f"wait-{marker}"
    blocker = tmp_path / "block.sh"
    blocker.write_text("#!/bin/sh\nsleep 300\n")
    grp = nodes_group(slurm_session, ssh_config=slurm_lab.ssh_config)
    with Slurm.open(slurm_session, ssh_config=slurm_lab.ssh_config) as slurm:
        held = slurm.submit(blocker, time="10", nodes=4,
                            extra=["--exclusive", "--nodelist=cn[01-04]"])  # fmt: skip
        try:
            wait_for(lambda: held.state() == "RUNNING", what="the blocking job running")
            report = start_via_slurm(grp, WorkerSpec(name, ticking(marker)), md, wait=2)
            assert report.exit_status == 1
            (job,) = {r.job for r in ps(grp, name)}
            assert [(r.state, r.kind) for r in ps(grp, name)] == [("pending", "slurm")] * 4
            assert ps(grp, name).exit_status == 1
            assert any(j.id == job and j.state == "PENDING" for j in slurm.jobs())
            stopped = stop(grp, name, grace=1, metadata=md)
            assert stopped.exit_status == 0 and f"slurm job {job} cancelled" in stopped.notes
            assert {r.state for r in ps(grp, name)} == {"stopped"}
            assert job not in {j.id for j in slurm.jobs()}
        finally:
            held.cancel()
            stop(grp, None, grace=1, metadata=md)
            grp.close()
            shutil.rmtree(slurm_lab.home / ".mento_fab" / "workers", ignore_errors=True)
