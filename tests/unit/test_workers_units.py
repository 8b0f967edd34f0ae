"""Workers without the lab: names, specs, parsing what nodes print, and the real supervisor
run on this machine (it is plain python3 + POSIX; the lab tests cover SSH and Slurm)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from invoke import Collection, task

from mento_fab.cli.argv import optional_positionals
from mento_fab.errors import BadInput, WorkerNameError
from mento_fab.workers import remote
from mento_fab.workers.spec import WorkerSpec, check_name, parse_listing
from mento_fab.workers.supervisor import LogFile
from mento_fab.workers.top import parse_sample


@pytest.mark.parametrize("name", ["a", "consumer-1", "x.y_z", "A9", "-dash"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a b", "x*", "é", "a" * 101])
def test_bad_names_are_bad_input(name: str) -> None:
    with pytest.raises(WorkerNameError) as info:
        check_name(name)
    assert isinstance(info.value, BadInput)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command": " "},
        {"per_node": 0},
        {"restart": "sometimes"},
        {"max_restarts": -1},
        {"env": {"1BAD": "x"}},
        {"grace": 0},
        {"cwd": ""},
    ],
)
def test_bad_specs_are_bad_input(kwargs: dict) -> None:
    args = {"name": "w", "command": "true", **kwargs}
    with pytest.raises(BadInput):
        WorkerSpec(**args)


def test_spec_repr_never_shows_env_values() -> None:
    spec = WorkerSpec("w", "true", env={"TOKEN": "s3cr3t-value"})
    assert "s3cr3t-value" not in repr(spec) and "TOKEN" in repr(spec)


BOOT = "b00t-id"


def _listing(records: list[tuple[str, str, dict]], ps: str = "") -> str:
    lines = [f"H cn01 {BOOT}"]
    for pids, stat, state in records:
        lines += [f"R {pids}", f"P {stat}", "S " + json.dumps(state)]
    if ps:
        lines += ["C", ps]
    return "\n".join(lines) + "\n"


def _stat(state: str = "S", start: str = "777") -> str:
    fields = [state] + ["0"] * 18 + [start] + ["0"] * 10
    return " ".join(fields)


def test_listing_tells_running_from_lost_and_ended() -> None:
    running = {"name": "w", "index": 0, "state": "running", "active": True, "pid": 11}
    text = _listing(
        [
            (f"10 777 {BOOT} 11 778", _stat(), running),  # alive supervisor
            (f"20 777 {BOOT} 21 778", "", {**running, "index": 1, "pid": 21}),  # gone
            (f"30 777 {BOOT} 31 778", _stat(start="999"), {**running, "index": 2}),  # pid reused
            ("40 777 old-boot 41 778", _stat(), {**running, "index": 3}),  # rebooted
            (f"50 777 {BOOT} 51 778", _stat("Z"), {**running, "index": 4}),  # zombie
            ("", "", {"name": "w", "index": 5, "state": "exited", "active": False, "exit": 3}),
        ],
        ps=" 11  2.5  1000\n 11  1.0  24\n 99 50.0 1\n",
    )
    rows = parse_listing("cn01", text).rows
    assert [r.state for r in rows] == ["running", "lost", "lost", "lost", "lost", "exited"]
    assert rows[0].cpu == 3.5 and rows[0].rss == 1024 * 1024
    assert rows[5].exit == 3 and rows[5].cpu is None


def test_top_sample_parses_and_computes_cpu_from_two_readings() -> None:
    text = (
        f"H cn01 {BOOT}\nL 0.50 0.40 0.30 1/100 200\n"
        "U 4 cpu 100 0 100 800 0 0 0 0 0 0\nV cpu 150 0 150 900 0 0 0 0 0 0\n"
        "M MemTotal: 1000\nM MemAvailable: 250\nD 2000 500 1500 /home/u/t\n"
        "G 0, 40, 100, 1000\n"
    )
    sample = parse_sample("cn01", text, None)
    assert (sample.load1, sample.cpus, sample.cpu) == (0.5, 4, 50.0)
    assert (sample.mem_used, sample.mem_total) == (750 * 1024, 1000 * 1024)
    assert (sample.disk_free, sample.disk_path) == (1500 * 1024, "/home/u/t")
    assert sample.gpus == [{"index": "0", "util": 40.0, "mem_used": 100 << 20,
                            "mem_total": 1000 << 20}]  # fmt: skip
    later = parse_sample("cn01", text.replace("V cpu 150 0 150 900", "X"), sample)
    assert later.cpu is None or later.cpu >= 0


def test_optional_positional_becomes_a_flag() -> None:
    @task
    def stop(c, name=None, all=False, grace=None):  # type: ignore[no-untyped-def]
        pass

    stop.optional_positional = ("name",)
    ns = Collection(stop)
    assert optional_positionals(["stop", "w1"], ns) == ["stop", "--name", "w1"]
    assert optional_positionals(["stop", "--grace", "3", "w"], ns) == [
        "stop", "--grace", "3", "--name", "w"]  # fmt: skip
    assert optional_positionals(["stop", "--all"], ns) == ["stop", "--all"]
    assert optional_positionals(["stop", "--grace=3", "stop"], ns) == [
        "stop", "--grace=3", "--name", "stop"]  # fmt: skip


def test_log_rotates_at_the_cap_on_a_line_boundary(tmp_path: Path) -> None:
    log = LogFile(str(tmp_path / "log"), 1024)
    for i in range(0, 99, 3):  # chunks of three lines, as a pipe delivers them
        log.write(b"".join(f"line {j:04d} {'x' * 40}\n".encode() for j in range(i, i + 3)))
    log.write(b"y" * 3000 + b"\n")  # longer than the cap: split
    assert (tmp_path / "log.1").stat().st_size == 1024
    current = (tmp_path / "log").read_text()
    old = (tmp_path / "log.1").read_text()
    assert current == "y" * (3000 - 2048) + "\n"
    log = LogFile(str(tmp_path / "log2"), 1024)
    for i in range(100):
        log.write(f"line {i:04d} {'x' * 40}\n".encode())
    current = (tmp_path / "log2").read_text()
    old = (tmp_path / "log2.1").read_text()
    assert current.endswith("line 0099 " + "x" * 40 + "\n")
    assert all(line.startswith("line ") for line in (old + current).splitlines())
    assert len(current) <= 1024 and len(old) <= 1024


def test_payload_is_python36_syntax() -> None:
    source = remote.payload(json.dumps({"op": "stop"})).decode()
    ast.parse(source, feature_version=(3, 6))
    assert "from mento_fab" not in source


def _node_side(home: Path, spec: dict) -> dict:
    proc = subprocess.run(
        ["/usr/bin/python3", "-c", remote.BOOTSTRAP],
        input=remote.payload(json.dumps(spec)),
        capture_output=True,
        timeout=60,
        env={"HOME": str(home), "PATH": os.environ["PATH"], "SHELL": "/bin/sh"},
    )
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def _state(home: Path, name: str, index: int = 0) -> dict:
    host = os.uname()[1]
    path = home / ".mento_fab" / "workers" / host / name / str(index) / "state.json"
    return json.loads(path.read_text())


def _live_group(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (this machine's init may not reap)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def _wait_for(predicate, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")
def test_supervisor_restarts_with_backoff_then_gives_up(tmp_path: Path) -> None:
    spec = WorkerSpec("flaky", "echo run $MENTO_WORKER_RESTARTS; exit 3", restart="on-failure",
                      max_restarts=2, restart_delay=0.05).node_spec("start")  # fmt: skip
    out = _node_side(tmp_path, spec)
    assert out["started"][0]["pid"] > 0
    state = _wait_for(lambda: (s := _state(tmp_path, "flaky"))["state"] == "failed"
                      and not s["active"] and s)  # fmt: skip
    assert state["restarts"] == 2 and state["exit"] == 3
    assert state["message"] == "gave up after 2 restarts in a row"
    log = (Path(tmp_path) / ".mento_fab/workers" / os.uname()[1] / "flaky/0/log").read_text()
    assert [ln for ln in log.splitlines() if ln.startswith("run")] == ["run 0", "run 1", "run 2"]


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")
def test_supervisor_stop_kills_the_whole_group_after_the_grace(tmp_path: Path) -> None:
    # The worker ignores SIGTERM and has a child: both must be gone after stop.
    command = "trap '' TERM; sleep 300 & while true; do sleep 0.1; done"
    spec = WorkerSpec("stubborn", command).node_spec("start")
    pid = _node_side(tmp_path, spec)["started"][0]["pid"]
    assert os.getpgid(pid) == pid
    started = time.monotonic()
    out = _node_side(tmp_path, {"op": "stop", "name": "stubborn", "grace": 0.5})
    assert time.monotonic() - started < 10
    assert out["stopped"][0]["state"] == "stopped" and out["stopped"][0]["exit"] == 137
    assert _live_group(pid) == []
    again = _node_side(tmp_path, {"op": "stop", "name": "stubborn", "grace": 0.5})
    assert again["stopped"][0]["was"] == "stopped"
    assert sys.executable  # the supervisor ran on /usr/bin/python3, not this interpreter


def test_ps_report_renders_html_and_the_issue_json_shape() -> None:
    from mento_fab.results import NodeResult, RunReport
    from mento_fab.workers import WorkerRow, WorkersReport

    rows = [
        WorkerRow("cn01", "w", 0, "running", pid=7, started=time.time() - 90, cpu=1.5, rss=2048),
        WorkerRow("cn02", "w", 0, "exited", pid=8, exit=137, message="<killed>"),
    ]
    nodes = [NodeResult("cn01", exit=0), NodeResult("cn02", exit=0)]
    run = RunReport("ps", [*nodes, NodeResult("cn03", error="unreachable: connection refused")])
    report = WorkersReport("ps", run, rows, "w")
    page = report._repr_html_()
    assert "<table>" in page and "cn01" in page and "&lt;killed&gt;" in page
    assert "cn03: unreachable: connection refused" in page
    data = report.as_json()
    assert set(data["workers"][0]) >= {"node", "name", "index", "state", "pid", "exit",
                                       "restarts", "started", "cpu", "rss"}  # fmt: skip
    assert data["summary"]["states"] == {"exited": 1, "running": 1}
    assert report.exit_status == 255 and data["summary"]["unreachable"] == 1
    assert WorkersReport("ps", RunReport("ps", run.results[:2]), rows).exit_status == 1
