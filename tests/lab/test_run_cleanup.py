"""Nothing outlives its command unless asked: time-outs, Ctrl-C, a killed client, a lost session."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import node_procs
import pytest

from lab import Lab
from mento_fab import nodes_group, run

NODES = ["cn01", "cn02", "cn03", "cn04"]


def sleeps(lab: Lab, marker: str, nodes: list[str] = NODES) -> dict[str, list[int]]:
    return node_procs.sleeps(lab, marker, nodes)


def wait_for(predicate, timeout: float = 15.0) -> bool:
    return node_procs.wait_for(predicate, timeout)


def all_gone(lab: Lab, marker: str, nodes: list[str] = NODES) -> bool:
    return not any(sleeps(lab, marker, nodes).values())


def everywhere(lab: Lab, marker: str, count: int = 1, nodes: list[str] = NODES) -> bool:
    return all(len(pids) >= count for pids in sleeps(lab, marker, nodes).values())


def kill_leftovers(lab: Lab, marker: str) -> None:
    for pids in sleeps(lab, marker).values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def group(lab, lab_session: Path) -> Iterator:
    grp = nodes_group(lab_session, ssh_config=lab.ssh_config, known_hosts=lab.known_hosts)
    yield grp
    grp.close()


@pytest.fixture
def cli_env(lab, lab_session) -> dict[str, str]:
    return {
        **os.environ,
        "MENTO_METADATA": str(lab_session),
        "MENTO_SSH_CONFIG": str(lab.ssh_config),
    }


def start_cli(cli_env: dict[str, str], lab: Lab, command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mento_fab", "run-on-nodes", "--known-hosts",
         str(lab.known_hosts), command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env,
    )  # fmt: skip


def test_a_timeout_also_kills_what_left_the_process_group(lab, group) -> None:
    marker = "8761"
    try:
        report = run(group, f"setsid sleep {marker}01 & sleep {marker}02", timeout=1)
        assert all("timed out after 1 s" in r.error for r in report.results), report.results
        assert wait_for(lambda: all_gone(lab, marker)), sleeps(lab, marker)
    finally:
        kill_leftovers(lab, marker)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_an_interrupted_or_killed_client_leaves_nothing_running(lab, cli_env, how) -> None:
    marker = "8762"
    proc = start_cli(cli_env, lab, f"setsid sleep {marker}01 & sleep {marker}02")
    try:
        assert wait_for(lambda: everywhere(lab, marker, count=2)), sleeps(lab, marker)
        proc.send_signal(how)
        _, err = proc.communicate(timeout=30)
        if how == signal.SIGINT:
            assert proc.returncode == 130, err
            assert "interrupted" in err and "Traceback" not in err
        assert wait_for(lambda: all_gone(lab, marker)), sleeps(lab, marker)
    finally:
        proc.kill()
        proc.communicate()
        kill_leftovers(lab, marker)


def test_a_caller_that_gives_up_kills_the_commands_on_the_open_connections(lab, group) -> None:
    marker = "8763"

    def give_up(result) -> None:
        raise KeyboardInterrupt  # what a Ctrl-C in a notebook raises in the caller

    try:
        with pytest.raises(KeyboardInterrupt):
            run(group, f'[ "$(hostname)" = cn01 ] || sleep {marker}01', on_result=give_up)
        assert wait_for(lambda: all_gone(lab, marker)), sleeps(lab, marker)
        assert all(c.is_connected for c in group)  # the kill went over the open connections
        assert run(group, "true").ok
    finally:
        kill_leftovers(lab, marker)


def test_a_lost_session_kills_its_command(lab, group) -> None:
    marker = "8764"
    outcome: list = []
    runner = threading.Thread(
        target=lambda: outcome.append(run(group, f'[ "$(hostname)" != cn02 ] || sleep {marker}01')),
        daemon=True,
    )
    try:
        runner.start()
        assert wait_for(lambda: everywhere(lab, marker, nodes=["cn02"])), sleeps(lab, marker)
        for pid, cmd in lab.node_pids("cn02").items():  # cn02's side of our connection dies
            if cmd.startswith("sshd:") and "@" in cmd:
                os.kill(pid, signal.SIGKILL)
        runner.join(60)
        assert outcome and outcome[0]["cn02"].error, outcome
        assert wait_for(lambda: all_gone(lab, marker, ["cn02"])), sleeps(lab, marker)
    finally:
        kill_leftovers(lab, marker)
        runner.join(60)


def test_what_a_command_detaches_outlives_it_when_it_ends_normally(lab, group) -> None:
    marker = "8765"
    try:
        report = run(group, f"nohup sleep {marker}01 >/dev/null 2>&1 & echo $MENTO_RUN_ID")
        assert report.ok, report.results
        ids = {r.stdout for r in report.results}
        assert len(ids) == 1 and len(ids.pop().strip()) == 12  # one id per run, on every node
        assert run(group, "echo $MENTO_RUN_ID").results[0].stdout != report.results[0].stdout
        time.sleep(1)
        assert everywhere(lab, marker), sleeps(lab, marker)  # as with ssh: nohup is asked
    finally:
        kill_leftovers(lab, marker)


def test_a_client_that_falls_silent_has_its_command_ended_by_the_node(
    lab, lab_session, monkeypatch
) -> None:
    import mento_fab.connection as connection_module
    from mento_fab import remote

    monkeypatch.setattr(remote, "HEARTBEAT", 0.5)
    monkeypatch.setattr(remote, "CLIENT_SILENCE", 3.0)
    monkeypatch.setattr(connection_module, "KEEPALIVE_INTERVAL", 1.0)
    monkeypatch.setattr(connection_module, "DEAD_PEER_TIMEOUT", 3.0)
    marker = "8766"
    nodes = ["cn01", "cn02"]
    grp = nodes_group(
        lab_session, nodes="cn[01-02]", ssh_config=lab.ssh_config, known_hosts=lab.known_hosts
    )
    outcome: list = []
    runner = threading.Thread(
        target=lambda: outcome.append(run(grp, f"sleep {marker}01; echo done", timeout=120)),
        daemon=True,
    )
    try:
        runner.start()
        assert wait_for(lambda: everywhere(lab, marker, nodes=nodes)), sleeps(lab, marker)
        time.sleep(5)  # longer than the silence: the heartbeat keeps a live client's command
        assert everywhere(lab, marker, nodes=nodes), sleeps(lab, marker)
        # cn01 can no longer hear the client: nothing reaches it, not even a FIN
        lab.node_exec("cn01", ["ip", "link", "set", "eth0", "down"])
        assert wait_for(lambda: all_gone(lab, marker, ["cn01"])), sleeps(lab, marker)
        assert everywhere(lab, marker, nodes=["cn02"]), sleeps(lab, marker)
        kill_leftovers(lab, marker)  # cn02's command goes on to its end
        runner.join(60)
        assert outcome and outcome[0]["cn01"].error, outcome
        assert outcome[0]["cn02"].stdout == "done\n", outcome
    finally:
        lab.node_exec("cn01", ["ip", "link", "set", "eth0", "up"])
        runner.join(60)
        grp.close()
        kill_leftovers(lab, marker)
