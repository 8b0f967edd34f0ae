"""A Trigger in a short-lived process (one per scan) goes through this user's connection
agent when one runs: the same handles, no new login, and the agent's faults handled."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import node_procs
import pytest
from node_procs import agent_pid, wait_for

from lab import Lab

NODE = "cn01"

#: One scan: trigger once, print the handle as JSON (argv: metadata ssh_config known_hosts
#: arg_list-as-JSON [timeout]).
SCAN = """
import json, logging, sys
logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
for noisy in ("paramiko", "invoke", "fabric"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
from mento_fab.trigger import Trigger, TriggerMethod
md, ssh_config, known_hosts, args = sys.argv[1:5]
trig = Trigger(TriggerMethod.REMOTE_COMMAND, metadata=md, ssh_config=ssh_config,
               known_hosts=known_hosts)
print("started", flush=True)
h = trig.run(json.loads(args))
print(json.dumps({"exit": h.exit_status, "stdout": h.stdout, "stderr": h.stderr,
                  "error": h.error, "heavy": "paramiko" in sys.modules}), flush=True)
"""


@pytest.fixture
def scan(lab: Lab, lab_session: Path, tmp_path: Path):
    """``scan(args, agent=True)``: a new process that triggers ``args`` once."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_bytes(Path(lab.known_hosts).read_bytes())
    script = tmp_path / "scan.py"
    script.write_text(SCAN)

    def start(args: list[str], agent: bool = True) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(script), str(lab_session), str(lab.ssh_config),
             str(known_hosts), json.dumps(args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MENTO_AGENT": "1" if agent else "0"},
        )  # fmt: skip

    def run(args: list[str], agent: bool = True) -> tuple[dict, str]:
        proc = start(args, agent)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("started\n"), err
        return json.loads(out.splitlines()[1]), err

    run.start = start  # type: ignore[attr-defined]
    run.known_hosts = known_hosts  # type: ignore[attr-defined]
    return run


def mento(lab: Lab, lab_session: Path, known_hosts: Path, *args: str) -> str:
    env = {**os.environ, "MENTO_METADATA": str(lab_session),
           "MENTO_SSH_CONFIG": str(lab.ssh_config), "MENTO_AGENT": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "mento_fab", *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def agent_state(lab: Lab, lab_session: Path, known_hosts: Path) -> dict:
    (state,) = json.loads(mento(lab, lab_session, known_hosts, "agent", "--json"))["agents"]
    return state


def logins(lab: Lab) -> set[int]:
    """The sshd processes serving a logged-in connection on the node."""
    return {p for p, c in lab.node_pids(NODE).items() if c.startswith("sshd:") and "@" in c}


def sleeps(lab: Lab, marker: str) -> list[int]:
    return node_procs.sleeps(lab, marker, [NODE])[NODE]


def kill_sleeps(lab: Lab, marker: str) -> None:
    node_procs.kill_sleeps(lab, marker, [NODE])


CALLS = {
    "failing": ["sh", "-c", "echo out; echo err >&2; exit 3"],
    "arguments": ["printf", "[%s]", "a b", "$HOME", "it's", "-x"],
    "ok": ["true"],
}


def test_a_scan_through_the_agent_is_the_same_and_logs_in_no_more(
    lab: Lab, lab_session: Path, scan
) -> None:
    kh = scan.known_hosts
    mento(lab, lab_session, kh, "info")  # the agent runs (info logs in nowhere)
    first, err = scan(CALLS["ok"])  # the agent logs in for it once
    assert first["exit"] == 0 and first["error"] is None, err
    assert "through the agent" in err and not first["heavy"], err
    kept = logins(lab)
    served = agent_state(lab, lab_session, kh)["served"]
    for name, args in CALLS.items():
        through, err = scan(args)
        direct, _ = scan(args, agent=False)
        assert {**through, "heavy": None} == {**direct, "heavy": None}, (name, err)
        assert "through the agent" in err and not through["heavy"], err
        assert direct["heavy"]  # the direct path needs paramiko: it really ran directly
    assert logins(lab) == kept  # the kept connection served every scan: no new login
    state = agent_state(lab, lab_session, kh)
    assert state["served"] == served + len(CALLS)
    (kind,) = [k for k in state["pool"] if NODE in k["nodes"]]
    assert kind["nodes"][NODE]["open"] == 1
    assert direct["exit"] == 0 and through["stdout"] == ""
    assert scan(CALLS["failing"])[0] == {
        "exit": 3, "stdout": "out\n", "stderr": "err\n", "error": None, "heavy": False,
    }  # fmt: skip
    assert scan(CALLS["arguments"])[0]["stdout"] == "[a b][$HOME][it's][-x]"


def test_without_an_agent_a_scan_runs_directly_and_starts_none(
    lab: Lab, scan, private_agent: Path
) -> None:
    result, err = scan(CALLS["failing"])
    assert result["exit"] == 3 and result["stdout"] == "out\n" and result["heavy"], err
    assert "agent not used: no agent runs" in err
    assert not list(private_agent.glob("agent-*.sock"))
    assert not list(private_agent.glob("agent-*.pid"))
    # A stale socket (nobody listens) is the same: run directly, leave it alone.
    from mento_fab.agent import wire

    names = wire.Names(private_agent)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(names.socket))
    result, err = scan(CALLS["ok"])
    assert result["exit"] == 0 and "agent not used: no agent runs" in err, err
    assert not list(private_agent.glob("agent-*.pid"))


def test_an_agent_killed_mid_call_fails_the_handle_and_leaves_nothing(
    lab: Lab, lab_session: Path, scan, private_agent: Path
) -> None:
    marker = "76431"
    mento(lab, lab_session, scan.known_hosts, "info")
    proc = scan.start(["sleep", f"{marker}0"])
    try:
        assert wait_for(lambda: len(sleeps(lab, marker)) == 1), proc.stderr
        os.kill(agent_pid(private_agent), signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        result = json.loads(out.splitlines()[1])
        assert result["exit"] is None and result["stdout"] == "", result
        assert "connection agent" in result["error"] and "lost" in result["error"]
        # The node saw the agent's connection go: the watchdog ended the command.
        assert wait_for(lambda: not sleeps(lab, marker)), sleeps(lab, marker)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
        kill_sleeps(lab, marker)


def test_ctrl_c_in_a_scan_through_the_agent_ends_the_remote_command(
    lab: Lab, lab_session: Path, scan
) -> None:
    marker = "76432"
    kh = scan.known_hosts
    mento(lab, lab_session, kh, "info")
    proc = scan.start(["sh", "-c", f"setsid sleep {marker}1 & sleep {marker}2"])
    try:
        assert proc.stdout.readline() == "started\n"
        assert wait_for(lambda: len(sleeps(lab, marker)) == 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
        assert "through the agent" in err
        assert wait_for(lambda: not sleeps(lab, marker)), sleeps(lab, marker)
        state = agent_state(lab, lab_session, kh)  # the agent serves on
        assert state["served"] == 2 and not state["calls"]
    finally:
        proc.kill()
        proc.communicate(timeout=60)
        kill_sleeps(lab, marker)


def test_an_sbatch_trigger_through_the_agent_returns_a_job_that_can_be_followed(
    slurm_lab: Lab, slurm_session: Path, tmp_path: Path, monkeypatch
) -> None:
    from mento_fab.trigger import Trigger

    monkeypatch.setenv("MENTO_AGENT", "1")
    home = slurm_lab.home
    script = home / f"trig-agent-{tmp_path.name}.sh"
    log_file = home / f"trig-agent-{tmp_path.name}.log"
    script.write_text('#!/bin/sh\necho "got [$1]"\nexit 6\n')
    script.chmod(0o755)
    mento(slurm_lab, slurm_session, tmp_path, "info")
    trig = Trigger(metadata=slurm_session, ssh_config=slurm_lab.ssh_config)
    try:
        handle = trig.run([str(script), "a b"], job_name="trig agent", log_file=str(log_file))
        assert handle.ok and handle.job_id and handle.job_id.isdigit(), handle
        assert trig.connects == {}  # submitted through the agent: no login of our own
        assert agent_state(slurm_lab, slurm_session, tmp_path)["served"] == 2
        info = handle.job.wait(timeout=60)  # the job's Slurm logs in when first asked
        assert (info.state, info.exit_code, info.name) == ("FAILED", 6, "trig agent")
        assert log_file.read_text() == "got [a b]\n"
        bad = trig.run(["/nonexistent/job.sh"])
        assert bad.job_id is None and "Unable to open file" in bad.error
    finally:
        trig.close()
        script.unlink(missing_ok=True)
        log_file.unlink(missing_ok=True)


ENDING_SCRIPT = """
import sys
import mento_fab.trigger as trigger

trigger.EXIT_DRAIN_TIMEOUT = 1.0
md, ssh_config, known_hosts, marker, how = sys.argv[1:]
trig = trigger.Trigger(
    trigger.TriggerMethod.REMOTE_COMMAND, metadata=md, ssh_config=ssh_config,
    known_hosts=known_hosts, workers=2,
)
trig.run(["sh", "-c", f"setsid sleep {marker}1 & sleep {marker}2"], background=True)
if how == "exit":
    trig.run(["sleep", f"{marker}3"], background=True)
    print("started", flush=True)
    sys.stdin.readline()  # the script ends here, its triggers still running
else:
    print("started", flush=True)
    trig.run(["sleep", f"{marker}3"])  # interrupted by Ctrl-C
"""


@pytest.mark.parametrize("how", ["exit", "ctrl-c"])
def test_a_scan_that_ends_leaves_nothing_running_through_the_agent(
    lab: Lab, lab_session: Path, scan, tmp_path: Path, how: str
) -> None:
    marker = "76433" if how == "exit" else "76434"
    kh = scan.known_hosts
    mento(lab, lab_session, kh, "info")
    script = tmp_path / "ending.py"
    script.write_text(ENDING_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(lab_session), str(lab.ssh_config), str(kh), marker,
         how],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MENTO_AGENT": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "started\n"
        assert wait_for(lambda: len(sleeps(lab, marker)) == 3), sleeps(lab, marker)
        assert len(agent_state(lab, lab_session, kh)["calls"]) == 2  # the agent runs them
        if how == "exit":
            proc.stdin.close()
        else:
            proc.send_signal(signal.SIGINT)
        proc.wait(60)
        assert wait_for(lambda: not sleeps(lab, marker)), sleeps(lab, marker)
        state = agent_state(lab, lab_session, kh)
        assert state["served"] == 3 and not state["calls"]
    finally:
        proc.kill()
        proc.wait(60)
        kill_sleeps(lab, marker)


def test_a_backlog_for_a_dead_node_through_the_agent_fails_fast(
    lab: Lab, tmp_path: Path, monkeypatch
) -> None:
    """The connect back-off holds through the agent too: one connect timeout, not twenty."""
    from mento_fab.trigger import Trigger, TriggerMethod

    monkeypatch.setenv("MENTO_AGENT", "1")
    md = lab.make_session(tmp_path, lab.nodes[:2])
    mento(lab, md, tmp_path, "info")
    trig = Trigger(
        TriggerMethod.REMOTE_COMMAND, metadata=md, ssh_config=lab.ssh_config,
        known_hosts=lab.known_hosts, connect_timeout=2, connect_backoff=30,
    )  # fmt: skip
    lab.node_exec("cn02", ["ip", "link", "set", "eth0", "down"])  # connects hang: no answer
    try:
        handles = [trig.run(["true"], destination="cn02", background=True) for _ in range(10)]
        for handle in handles:
            handle.wait(120)
        assert all("connect timed out after 2 s" in h.error for h in handles), handles
        backed_off = [h for h in handles if "not tried again within 30 s" in h.error]
        assert len(backed_off) == 9, [h.error for h in handles]
        assert trig.run(["hostname"], destination="cn01").stdout == "cn01\n"  # others go on
        assert agent_state(lab, md, tmp_path)["served"] == 3  # info, cn02 once, cn01
    finally:
        lab.node_exec("cn02", ["ip", "link", "set", "eth0", "up"])
        trig.close()


def test_a_script_that_keeps_triggering_moves_to_its_own_connection(
    lab: Lab, lab_session: Path, tmp_path: Path, monkeypatch
) -> None:
    from mento_fab.trigger import Trigger, TriggerMethod
    from mento_fab.trigger_agent import AGENT_CALLS

    monkeypatch.setenv("MENTO_AGENT", "1")
    mento(lab, lab_session, tmp_path, "info")
    trig = Trigger(TriggerMethod.REMOTE_COMMAND, metadata=lab_session,
                   ssh_config=lab.ssh_config, known_hosts=lab.known_hosts)  # fmt: skip
    try:
        outputs = [trig.run(["echo", str(i)]).stdout for i in range(AGENT_CALLS + 3)]
        assert outputs == [f"{i}\n" for i in range(AGENT_CALLS + 3)]
        assert trig.via_agent.calls == {NODE: AGENT_CALLS}
        assert trig.connects == {NODE: 1}  # then one login of its own, kept
        assert agent_state(lab, lab_session, tmp_path)["served"] == 1 + AGENT_CALLS
    finally:
        trig.close()
