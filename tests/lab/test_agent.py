"""The connection agent against the lab: the same answers as without it, kept connections,
two calls at once, Ctrl-C, a killed agent, a metadata change, sshd restarts, other users."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import node_procs
import pytest
from node_procs import agent_pid, wait_for

from lab import Lab
from mento_fab.agent import wire
from mento_fab.cli import client
from mento_fab.errors import AgentError

NODES = ["cn01", "cn02", "cn03", "cn04"]
_NUMBER = re.compile(rb"\d+\.\d+|\d+ ms|\d+ s\b")


@pytest.fixture
def known_hosts(lab: Lab, tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    shutil.copyfile(lab.known_hosts, path)
    return path


@pytest.fixture
def env(lab: Lab, lab_session: Path, known_hosts: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MENTO_METADATA": str(lab_session),
        "MENTO_SSH_CONFIG": str(lab.ssh_config),
        "MENTO_AGENT": "1",
        "PYTHONFAULTHANDLER": "1",
    }


def mento(
    env: dict[str, str], *args: str, agent: bool = True, timeout: float = 120, **kw
) -> subprocess.CompletedProcess[bytes]:
    """``mento-fab ARGS``; a hang fails with the stacks of the client and the agent."""
    environment = {**env, "MENTO_AGENT": "1" if agent else "0", "PYTHONFAULTHANDLER": "1"}
    argv = [sys.executable, "-m", "mento_fab", *args]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, **kw
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler: the client's stacks on stderr
            directory = Path(environment["MENTO_AGENT_DIR"])
            for pidfile in directory.glob("agent-*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pidfile.read_text()), signal.SIGUSR1)  # the agent's, to its log
            time.sleep(1)
            out, err = proc.communicate()
            logs = "".join(p.read_text() for p in directory.glob("agent-*.log"))
            pytest.fail(f"{args} hung; client:\n{err.decode()}\nagent log:\n{logs}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mento_fab", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


def normal(proc: subprocess.CompletedProcess[bytes]) -> tuple[int, bytes, bytes]:
    """Exit status and output with times and round trips blanked (and table padding)."""

    def blank(data: bytes) -> bytes:
        return re.sub(rb" +", b" ", _NUMBER.sub(b"N", data))

    return proc.returncode, blank(proc.stdout), blank(proc.stderr)


def agent_state(env: dict[str, str]) -> dict:
    (state,) = json.loads(mento(env, "agent", "--json").stdout)["agents"]
    return state


def sessions(lab: Lab, nodes: list[str] = NODES) -> dict[str, set[int]]:
    """Per node, the sshd processes serving a logged-in connection."""
    return {
        node: {p for p, c in lab.node_pids(node).items() if c.startswith("sshd:") and "@" in c}
        for node in nodes
    }


def sleeps(lab: Lab, marker: str) -> dict[str, list[int]]:
    return node_procs.sleeps(lab, marker, NODES)


def kill_sleeps(lab: Lab, marker: str) -> None:
    node_procs.kill_sleeps(lab, marker, NODES)


# ------------------------------------------------------------- same answers
CASES = {
    "gathered": ["run-on-nodes", "hostname; echo err >&2"],
    "json-failing-node": ["run-on-nodes", "--json", '[ "$(hostname)" = cn02 ] && exit 3; echo ok'],
    "stream": ["run-on-nodes", "--stream", "--nodes", "cn01", "echo a; echo b >&2; echo c"],
    "timeout": ["run-on-nodes", "--timeout", "1", "sleep 5"],
    "env": ["run-on-nodes", "--env", "GREETING=hi there", "echo $GREETING"],
    "outside": ["run-on-nodes", "--nodes", "cn99", "true"],
    "check": ["check"],
    "check-json": ["check", "--json"],
    "info": ["info"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_answer_with_and_without_the_agent(env, known_hosts, case: str) -> None:
    args = [*CASES[case], "--known-hosts", str(known_hosts)] if case != "info" else CASES[case]
    first = mento(env, *args)  # starts the agent, runs through it
    direct = mento(env, *args, agent=False)
    warm = mento(env, *args)
    assert normal(first) == normal(direct) == normal(warm)
    assert agent_state(env)["served"] == 2
    expected = {"json-failing-node": 3, "timeout": 255, "outside": 2}.get(case, 0)
    assert direct.returncode == expected, direct.stderr


def test_an_unreachable_node_is_the_same(lab: Lab, env, known_hosts) -> None:
    args = ["run-on-nodes", "--connect-timeout", "3", "--known-hosts", str(known_hosts), "true"]
    assert mento(env, *args).returncode == 0
    lab.stop_sshd("cn03")
    try:
        for pid in sessions(lab, ["cn03"])["cn03"]:  # the node is gone, with our session
            os.kill(pid, signal.SIGKILL)
        through, direct = mento(env, *args), mento(env, *args, agent=False)
    finally:
        lab.start_sshd("cn03")
    assert normal(through) == normal(direct)
    assert direct.returncode == 255 and b"cn03" in direct.stderr


def test_slurm_the_same(slurm_lab: Lab, slurm_session: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MENTO_METADATA": str(slurm_session),
           "MENTO_SSH_CONFIG": str(slurm_lab.ssh_config)}  # fmt: skip
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho job on $(hostname)\nexit 4\n")
    cases = [
        ["reservation"],
        ["reservation", "--json"],
        ["run-on-nodes", "--via", "slurm", "hostname"],
        ["submit", "--script", str(script), "--time", "2", "--wait"],
    ]
    jobs = re.compile(rb"\b\d{1,9}\b")
    for args in cases:
        through, direct = mento(env, *args), mento(env, *args, agent=False)
        out, err = ([jobs.sub(b"J", normal(p)[i]) for p in (through, direct)] for i in (1, 2))
        if args[0] == "submit":  # which job states the poll saw depends on timing
            err = [e.splitlines()[-1:] for e in err]
        assert out[0] == out[1] and err[0] == err[1], args
        assert through.returncode == direct.returncode, (args, direct.stderr)
    assert direct.returncode == 4  # submit --wait passes the job's exit code on


def test_deploy_the_same(env, known_hosts, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "analysis.py").write_text("print('hi')\n")
    target = f"/srv/local/agent-{os.getpid()}"
    common = ["--known-hosts", str(known_hosts), "--target", target]
    first = mento(env, "deploy", "--source", str(project), *common)
    assert first.returncode == 0, first.stderr
    for args in (["deploy", "--source", str(project), *common],  # unchanged: a no-op
                 ["releases", *common], ["releases", "--json", *common]):  # fmt: skip
        through, direct = mento(env, *args), mento(env, *args, agent=False)
        assert normal(through) == normal(direct), args
        assert direct.returncode == 0
    mento(env, "run-on-nodes", *common[:2], f"rm -rf {target}")


def test_progress_on_a_terminal_both_ways(env, known_hosts) -> None:
    """On a TTY a run that lasts shows rich's progress bar, through the agent too."""
    args = ["run-on-nodes", "--known-hosts", str(known_hosts), "sleep 1.5; hostname"]
    mento(env, "info")  # the agent is up
    for agent in (True, False):
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mento_fab", *args], stdin=follower, stdout=follower,
            stderr=follower, env={**env, "MENTO_AGENT": "1" if agent else "0",
                                  "COLUMNS": "80", "TERM": "xterm"},
        )  # fmt: skip
        os.close(follower)
        screen = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            try:
                chunk = os.read(leader, 65536) if ready else b""
            except OSError:  # EIO: the last writer closed the terminal
                chunk = b""
            if not chunk:
                break
            screen += chunk
        os.close(leader)
        assert proc.wait(30) == 0
        assert b"running" in screen and b"\x1b[" in screen, (agent, screen[-500:])
        assert b"4 nodes: 4 ok" in screen
    assert agent_state(env)["served"] == 2


# ---------------------------------------------------------- kept connections
def test_calls_after_the_first_reuse_the_connections(lab: Lab, env, known_hosts) -> None:
    args = ["run-on-nodes", "--via", "ssh", "--known-hosts", str(known_hosts), "true"]
    before = sessions(lab)
    assert mento(env, *args).returncode == 0
    kept = {n: s - before[n] for n, s in sessions(lab).items()}
    assert all(len(s) == 1 for s in kept.values()), kept
    for _ in range(3):
        assert mento(env, *args).returncode == 0
    assert {n: s - before[n] for n, s in sessions(lab).items()} == kept  # no new logins
    state = agent_state(env)
    (kind,) = state["pool"]
    assert {n: v["open"] for n, v in kind["nodes"].items()} == dict.fromkeys(NODES, 1)
    assert state["served"] == 4 and not state["calls"]


def test_warnings_of_building_the_group_come_on_every_call(
    lab: Lab, env, known_hosts, lab_session: Path
) -> None:
    """The agent builds a group once; what building it says is said on every call."""
    key = lab_session.parent / "shared" / "id_rsa"
    key.chmod(0o644)  # loading a key others can read warns
    known_hosts.write_text(known_hosts.read_text() + "cn99 ssh-ed25519 not-base64\n")
    args = ["run-on-nodes", "--known-hosts", str(known_hosts), "hostname"]
    runs = [mento(env, *args), mento(env, *args), mento(env, *args, agent=False), mento(env, *args)]
    assert len({normal(r) for r in runs}) == 1
    assert b"accessible by group/others" in runs[0].stderr, runs[0].stderr
    assert agent_state(env)["served"] == 3
    key.chmod(0o600)  # a changed mode is a new group: the warning goes
    quiet = mento(env, *args)
    assert b"accessible" not in quiet.stderr and quiet.returncode == 0


def test_check_logs_in_anew_and_leaves_its_connections(lab: Lab, env, known_hosts) -> None:
    """``check`` tests the login itself: never handed a kept connection."""
    args = ["--known-hosts", str(known_hosts)]
    before = sessions(lab)
    assert mento(env, "run-on-nodes", *args, "true").returncode == 0
    kept = sessions(lab)
    assert mento(env, "check", *args).returncode == 0
    checked = sessions(lab)
    assert all(checked[n] - kept[n] for n in NODES), (kept, checked)  # new logins
    assert all(kept[n] - before[n] <= checked[n] for n in NODES)  # the old ones stay open
    (kind,) = agent_state(env)["pool"]
    assert all(v["open"] == 2 for v in kind["nodes"].values())


def test_two_calls_at_once(lab: Lab, env, known_hosts) -> None:
    args = ["run-on-nodes", "--known-hosts", str(known_hosts)]
    assert mento(env, *args, "true").returncode == 0
    procs = [start(env, *args, f"sleep 1; echo {i} $(hostname)") for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for i, (proc, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert proc.returncode == 0, err
        assert all(f"{i} {n}".encode() in out for n in NODES), out
    state = agent_state(env)
    assert state["served"] == 3  # both went through the agent
    (kind,) = state["pool"]
    assert all(v["open"] == 2 for v in kind["nodes"].values())  # each had its own


def test_ctrl_c_through_the_agent_leaves_nothing_running(lab: Lab, env, known_hosts) -> None:
    marker = "9741"
    args = ["run-on-nodes", "--known-hosts", str(known_hosts)]
    assert mento(env, *args, "true").returncode == 0
    proc = start(env, *args, f"setsid sleep {marker}01 & sleep {marker}02")
    try:
        assert wait_for(lambda: all(len(p) == 2 for p in sleeps(lab, marker).values()))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert err.decode().strip().splitlines()[-1] == "mento-fab: interrupted", err
        assert wait_for(lambda: not any(sleeps(lab, marker).values())), sleeps(lab, marker)
        assert mento(env, *args, "hostname").returncode == 0  # the agent serves on
        assert agent_state(env)["served"] == 3
    finally:
        proc.kill()
        proc.communicate(timeout=60)
        kill_sleeps(lab, marker)


def test_a_killed_agent_is_reported_and_nothing_hangs(
    lab: Lab, env, known_hosts, private_agent: Path
) -> None:
    marker = "9742"
    args = ["run-on-nodes", "--known-hosts", str(known_hosts)]
    assert mento(env, *args, "true").returncode == 0
    proc = start(env, *args, f"sleep {marker}01")
    try:
        assert wait_for(lambda: all(sleeps(lab, marker).values()))
        os.kill(agent_pid(private_agent), signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 255
        (line,) = err.decode().splitlines()
        assert "connection agent" in line and "lost" in line
        # The nodes saw the connections go: the commands' watchdogs ended them.
        assert wait_for(lambda: not any(sleeps(lab, marker).values())), sleeps(lab, marker)
        again = mento(env, *args, "hostname")  # a new agent over the stale socket
        assert again.returncode == 0, again.stderr
    finally:
        proc.kill()
        proc.communicate(timeout=60)
        kill_sleeps(lab, marker)


def test_a_metadata_change_gets_new_connections(
    lab: Lab, env, known_hosts, lab_session: Path, tmp_path: Path
) -> None:
    args = ["run-on-nodes", "--known-hosts", str(known_hosts), "hostname"]
    assert mento(env, *args).returncode == 0
    first = sessions(lab)
    lab.make_session(tmp_path, NODES, onlineAnalysis={"slurmReservation": "changed"})
    assert mento(env, *args).returncode == 0
    second = sessions(lab)
    assert all(second[n] - first[n] for n in NODES), (first, second)  # new logins
    lab.make_session(tmp_path, NODES[:3])  # a node less
    through, direct = mento(env, *args), mento(env, *args, agent=False)
    assert normal(through) == normal(direct)
    assert b"3 nodes: 3 ok" in through.stderr
    assert len(agent_state(env)["pool"]) == 3  # one set of connections per file content


def _drop(lab: Lab, node: str) -> None:
    """End the node's side of every logged-in session (as a node restart would)."""
    for pid in sessions(lab, [node])[node]:
        os.kill(pid, signal.SIGKILL)


def test_a_node_whose_sshd_restarted(lab: Lab, env, known_hosts) -> None:
    args = ["run-on-nodes", "--connect-timeout", "5", "--known-hosts", str(known_hosts)]
    assert mento(env, *args, "true").returncode == 0
    lab.restart_sshd("cn02")  # open sessions survive a restart, as with systemd
    assert mento(env, *args, "hostname").returncode == 0
    _drop(lab, "cn02")  # now the kept connection is gone: it is opened again
    assert wait_for(lambda: not agent_state(env)["pool"][0]["nodes"]["cn02"]["open"], 30)
    through, direct = mento(env, *args, "hostname"), mento(env, *args, "hostname", agent=False)
    assert normal(through) == normal(direct) and through.returncode == 0
    # A new host key: refused at the reconnect, in the same words as without the agent.
    lab.rotate_host_key("cn02")
    try:
        _drop(lab, "cn02")
        through = mento(env, *args, "hostname")
        direct = mento(env, *args, "hostname", agent=False)
    finally:
        lab.rotate_host_key("cn02", trust=True)
    assert normal(through) == normal(direct)
    assert through.returncode == 255 and b"CHANGED" in through.stderr


def test_another_user_cannot_use_the_socket(lab: Lab, env, tmp_path: Path) -> None:
    """The lab's unprivileged account can neither reach the socket nor be served by it."""
    system_python = shutil.which("python3", path="/usr/bin")
    if system_python is None:
        pytest.skip("no /usr/bin/python3 for the other user")
    directory = Path(f"/tmp/mento-agent-other-{os.getpid()}")
    directory.mkdir(mode=0o700)
    try:
        own = {**env, "MENTO_AGENT_DIR": str(directory)}
        assert mento(own, "info").returncode == 0
        names = wire.Names(directory)
        probe = (
            "import socket, struct, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "except OSError as e:\n"
            "    print('refused', e.errno); sys.exit(0)\n"
            'body = b\'{"op":"status"}\'\n'
            "try:\n"
            "    s.sendall(struct.pack('>I', len(body)) + body)\n"
            "    print('answer', s.recv(100))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    print('answer', b'')\n"
        )

        def as_other_user() -> str:
            return subprocess.run(
                ["runuser", "-u", lab.user, "--", system_python, "-c", probe, str(names.socket)],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()  # fmt: skip

        assert as_other_user() == "refused 13"  # the directory is closed to others
        directory.chmod(0o711)  # even with the way open,
        names.socket.chmod(0o666)
        assert as_other_user() == "answer b''"  # the agent hangs up on another uid
        log = names.log.read_text()
        uid = int(subprocess.run(["id", "-u", lab.user], capture_output=True, text=True).stdout)
        assert f"refused a connection from uid {uid}" in log
        directory.chmod(0o700)
        assert mento(own, "info").returncode == 0  # and serves its own user still
    finally:
        with contextlib.suppress(OSError):
            client.stop(wire.Names(directory))
        shutil.rmtree(directory, ignore_errors=True)


def test_an_agent_of_another_user_is_not_used(lab: Lab, env) -> None:
    """A socket that looks like ours but is answered by another uid (SO_PEERCRED)."""
    system_python = shutil.which("python3", path="/usr/bin")
    if system_python is None:
        pytest.skip("no /usr/bin/python3 for the other user")
    directory = Path(f"/tmp/mento-agent-foreign-{os.getpid()}")
    directory.mkdir(mode=0o755)
    shutil.chown(directory, lab.user)
    names = wire.Names(directory)
    fake = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "print('up', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept(); time.sleep(0.2); c.close()\n"
    )
    listener = subprocess.Popen(
        ["runuser", "-u", lab.user, "--", system_python, "-c", fake, str(names.socket)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert listener.stdout.readline().strip() == "up"
        for path in (directory, names.socket):  # now it all looks like ours
            os.chown(path, 0, 0)
        directory.chmod(0o700)
        with pytest.raises(AgentError, match="runs as uid"):
            client.connect(names)
        proc = mento({**env, "MENTO_AGENT_DIR": str(directory), "MENTO_LOG_LEVEL": "debug"}, "info")
        assert proc.returncode == 0 and b"11019999" in proc.stdout
        assert b"runs as uid" in proc.stderr, proc.stderr
    finally:
        listener.kill()
        listener.wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_idle_exit_with_open_connections(env, known_hosts, private_agent: Path) -> None:
    args = ["run-on-nodes", "--known-hosts", str(known_hosts), "true"]
    assert mento({**env, "MENTO_AGENT_IDLE": "2"}, *args).returncode == 0
    pid = agent_pid(private_agent)
    assert wait_for(lambda: not client.alive(pid), 30)
    assert not list(private_agent.glob("*.sock"))


def test_status_shows_the_nodes_and_stop_ends_the_agent(env, known_hosts, private_agent) -> None:
    assert mento(env, "run-on-nodes", "--known-hosts", str(known_hosts), "true").returncode == 0
    pid = agent_pid(private_agent)
    text = mento(env, "agent").stdout.decode()
    assert f"pid      {pid}" in text and "(as mlab" in text
    assert all(re.search(rf"^{n}\s+1\s+0\s+0", text, re.M) for n in NODES), text
    stop = mento(env, "agent", "--stop")
    assert stop.returncode == 0 and not client.alive(pid)


def test_stop_interrupts_a_running_call(lab: Lab, env, known_hosts) -> None:
    marker = "9743"
    args = ["run-on-nodes", "--known-hosts", str(known_hosts)]
    proc = start(env, *args, f"sleep {marker}01")
    try:
        assert wait_for(lambda: all(sleeps(lab, marker).values()))
        threading.Thread(target=mento, args=(env, "agent", "--stop"), daemon=True).start()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and b"interrupted" in err
        assert wait_for(lambda: not any(sleeps(lab, marker).values()))
    finally:
        proc.kill()
        proc.communicate(timeout=60)
        kill_sleeps(lab, marker)


def test_a_retiring_agent_finishes_its_running_calls(
    lab: Lab, env, known_hosts, private_agent: Path
) -> None:
    """A call of other code retires the agent; a long call running in it still ends well,
    and the old agent leaving does not take the new agent's socket with it."""
    marker = "12.9744"  # seconds: past STOP_GRACE
    args = ["run-on-nodes", "--known-hosts", str(known_hosts)]
    assert mento(env, *args, "true").returncode == 0
    old = agent_pid(private_agent)
    proc = start(env, *args, f"sleep {marker}; echo done")
    try:
        assert wait_for(lambda: all(sleeps(lab, marker).values()))
        names = wire.Names(private_agent)
        with client.connect(names) as sock:  # a client of newer code
            request = {"op": "run", "protocol": wire.PROTOCOL, "fingerprint": "newer"}
            wire.send(sock, {**request, "argv": [], "env": {}, "cwd": "/", "umask": 0o22})
            assert wire.recv(sock)[0]["op"] == "stale"
        assert wait_for(lambda: not names.socket.exists())
        assert mento(env, *args, "hostname").returncode == 0  # served by a new agent
        new = agent_pid(private_agent)
        assert new != old and client.alive(old)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert b"done" in out and b"4 nodes: 4 ok" in err, (out, err)
        assert wait_for(lambda: not client.alive(old))
        assert names.socket.exists() and agent_pid(private_agent) == new
        assert agent_state(env)["pid"] == new
    finally:
        proc.kill()
        proc.communicate(timeout=60)
        kill_sleeps(lab, marker)


@pytest.mark.parametrize("agent", [True, False], ids=["agent", "direct"])
def test_a_call_started_with_ctrl_c_ignored_keeps_ignoring_it(
    lab: Lab, env, known_hosts, agent: bool
) -> None:
    """``cmd &`` in a script starts with SIGINT ignored: Ctrl-C on the script passes it by."""
    marker = "4.9745"
    args = ["run-on-nodes", "--known-hosts", str(known_hosts)]
    assert mento(env, *args, "true").returncode == 0  # the agent is up
    proc = subprocess.Popen(
        [sys.executable, "-m", "mento_fab", *args, f"sleep {marker}; echo done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**env, "MENTO_AGENT": "1" if agent else "0"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        assert wait_for(lambda: all(sleeps(lab, marker).values()))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert b"done" in out and b"4 nodes: 4 ok" in err, (out, err)
        assert agent_state(env)["served"] == (2 if agent else 1)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
        kill_sleeps(lab, marker)


_ESCAPE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _on_terminal(env: dict[str, str], *args: str) -> tuple[int, list[bytes]]:
    """Run on a fresh pseudo-terminal: exit status and the visible lines written to it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mento_fab", *args], stdin=follower,
                            stdout=follower, stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # EIO: the last writer closed the terminal
            chunk = b""
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    return proc.wait(30), re.split(rb"\r\n|\r|\n", _ESCAPE.sub(b"", screen))


def test_each_call_is_drawn_at_its_own_terminal_width(lab: Lab, env, known_hosts) -> None:
    """rich takes the width from COLUMNS: a call running with another one's is not shared."""
    marker = "9746"
    args = ["--known-hosts", str(known_hosts)]
    wide = {**env, "COLUMNS": "200", "TERM": "xterm"}
    proc = start(wide, "run-on-nodes", *args, f"sleep {marker}01")
    try:
        assert wait_for(lambda: all(sleeps(lab, marker).values()))
        narrow = {**env, "COLUMNS": "70", "TERM": "xterm"}
        for agent in (True, False):
            status, lines = _on_terminal({**narrow, "MENTO_AGENT": str(int(agent))}, "check", *args)
            assert status == 0, lines
            table = [t for t in (x.decode() for x in lines) if re.search("[\u2500-\u257f]", t)]
            assert any("cn04" in line for line in table), (agent, lines)
            assert max(len(line) for line in table) <= 70, (agent, table)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        kill_sleeps(lab, marker)
