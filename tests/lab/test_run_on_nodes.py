"""run-on-nodes against real sshd's in the lab: output, failures, dead nodes, timeouts, keys."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab
from mento_fab import MetadataError, nodes_group, run, run_on_nodes
from mento_fab.nodes import HostKeyPolicy

CONNECT_TIMEOUT = 3.0


def mento(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mento_fab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def known_hosts(lab, tmp_path: Path) -> Path:
    """A private copy of the lab's known_hosts, so tests may change it freely."""
    path = tmp_path / "known_hosts"
    shutil.copyfile(lab.known_hosts, path)
    return path


@pytest.fixture
def group(lab, lab_session: Path, known_hosts: Path) -> Iterator:
    grp = nodes_group(
        lab_session,
        ssh_config=lab.ssh_config,
        known_hosts=known_hosts,
        connect_timeout=CONNECT_TIMEOUT,
    )
    yield grp
    grp.close()


def test_each_node_answers_under_its_own_name(group) -> None:
    report = run(group, "hostname; echo err >&2")
    assert {c.transport.remote_cipher for c in group} == {"aes128-gcm@openssh.com"}
    assert [r.node for r in report.results] == ["cn01", "cn02", "cn03", "cn04"]
    for result in report.results:
        assert result.exit == 0 and result.error is None
        assert result.stdout == f"{result.node}\n"
        assert result.stderr == "err\n"
    assert report.exit_status == 0


def test_every_connection_has_its_own_connect_kwargs_and_only_the_beamtime_key(
    group, lab: Lab, lab_session: Path
) -> None:
    conns = list(group)
    key_body = "".join(
        line
        for line in (lab_session.parent / "shared" / "id_rsa").read_text().splitlines()
        if "PRIVATE KEY" not in line
    )
    for shown in (repr(group), *(repr(c) for c in conns), repr(conns[0].connect_kwargs)):
        assert key_body[:40] not in shown.replace("\n", "")
    assert len({id(c.connect_kwargs) for c in conns}) == len(conns)
    for conn in conns:
        assert conn.user == lab.user
        assert conn.connect_kwargs["allow_agent"] is False
        assert conn.connect_kwargs["look_for_keys"] is False
        assert "key_filename" not in conn.connect_kwargs  # ssh_config's IdentityFile not added
        assert conn.connect_kwargs["banner_timeout"] == CONNECT_TIMEOUT


def test_a_command_failing_on_one_node(group) -> None:
    report = run(group, '[ "$(hostname)" = cn02 ] && exit 3; echo fine')
    assert report["cn02"].exit == 3
    assert [r.node for r in report.succeeded] == ["cn01", "cn03", "cn04"]
    assert report.exit_status == 3


def test_env_no_stdin_and_connections_reused(group) -> None:
    first = run(group, "cat; echo $GREETING", env={"GREETING": "hi there; $(rm -rf x)"})
    transports = [c.transport for c in group]
    second = run(group, "true")
    assert all(r.stdout == "hi there; $(rm -rf x)\n" for r in first.results)
    assert second.ok
    assert [c.transport for c in group] == transports  # warm: no reconnect


def test_fanout_limits_concurrency(lab, group, tmp_path: Path) -> None:
    log = Path(lab.home) / f"fanout-{tmp_path.name}.log"
    cmd = f'echo "s $(date +%s.%N)" >> {log}; sleep 0.4; echo "e $(date +%s.%N)" >> {log}'
    try:
        report = run(group, cmd, fanout=2)
        assert report.ok
        events = sorted(
            (float(t), 1 if kind == "s" else -1)
            for kind, t in (line.split() for line in log.read_text().splitlines())
        )
    finally:
        log.unlink(missing_ok=True)
    running = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    assert len(events) == 8
    assert peak == 2


def test_a_stopped_sshd_gives_255_and_the_others_succeed(
    lab, lab_session: Path, known_hosts
) -> None:
    lab.stop_sshd("cn03")
    try:
        start = time.monotonic()
        report = run_on_nodes(
            "hostname",
            metadata=lab_session,
            ssh_config=lab.ssh_config,
            known_hosts=known_hosts,
            connect_timeout=CONNECT_TIMEOUT,
        )
        elapsed = time.monotonic() - start
    finally:
        lab.start_sshd("cn03")
    assert report["cn03"].exit is None
    assert "refused" in report["cn03"].error
    assert [r.node for r in report.succeeded] == ["cn01", "cn02", "cn04"]
    assert report.exit_status == 255
    assert elapsed < CONNECT_TIMEOUT + 5


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (not an SSH server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_a_listener_that_never_speaks_ssh(
    lab, lab_session, known_hosts, silent_listener, tmp_path
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host cn02\n  HostName 127.0.0.1\n  Port {silent_listener}\n\n"
        + lab.ssh_config.read_text()
    )
    start = time.monotonic()
    report = run_on_nodes(
        "true", metadata=lab_session, ssh_config=config, known_hosts=known_hosts, connect_timeout=2
    )
    elapsed = time.monotonic() - start
    assert report["cn02"].exit is None
    assert report["cn02"].error.startswith("no SSH "), report["cn02"].error
    assert "within 2 s" in report["cn02"].error
    assert len(report.succeeded) == 3
    assert report.exit_status == 255
    assert elapsed < 2 + 8  # bounded by the connect/banner timeout, not forever


def test_a_command_timeout_kills_the_remote_processes(lab, group) -> None:
    marker = "987654"
    report = run(group, f"sleep {marker} & sleep {marker}; wait", timeout=1, fanout=4)
    assert all(r.exit is None and "timed out" in r.error for r in report.results)
    assert report.exit_status == 255
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [
            pid
            for node in ["cn01", "cn02", "cn03", "cn04"]
            for pid, cmd in lab.node_pids(node).items()
            if marker in cmd
        ]
        if not left:
            break
        time.sleep(0.1)
    assert left == []


def test_a_changed_host_key_is_refused(lab, lab_session, known_hosts) -> None:
    lab.rotate_host_key("cn04")  # our known_hosts copy still holds the old key
    try:
        report = run_on_nodes(
            "true", metadata=lab_session, ssh_config=lab.ssh_config, known_hosts=known_hosts
        )
    finally:
        lab.rotate_host_key("cn04", trust=True)
    assert report["cn04"].exit is None
    assert "CHANGED" in report["cn04"].error
    assert "ssh-keygen -R cn04" in report["cn04"].error
    assert len(report.succeeded) == 3


def test_unknown_keys_accept_new_records_them_and_strict_refuses(
    lab, lab_session, tmp_path
) -> None:
    known = tmp_path / "fresh_known_hosts"
    strict = run_on_nodes(
        "true",
        metadata=lab_session,
        ssh_config=lab.ssh_config,
        known_hosts=known,
        host_keys=HostKeyPolicy.STRICT,
    )
    assert all("unknown host key" in r.error for r in strict.results)
    assert not known.exists()
    accepted = run_on_nodes(
        "true", metadata=lab_session, ssh_config=lab.ssh_config, known_hosts=known
    )
    assert accepted.ok
    lines = known.read_text().splitlines()
    assert sorted(line.split(",")[0] for line in lines) == ["cn01", "cn02", "cn03", "cn04"]
    again = run_on_nodes(
        "true",
        metadata=lab_session,
        ssh_config=lab.ssh_config,
        known_hosts=known,
        host_keys="strict",
    )
    assert again.ok


def test_hostile_node_names_never_reach_a_connection(lab, tmp_path) -> None:
    path = lab.make_session(
        tmp_path,
        ["cn01"],
        onlineAnalysis={"reservedNodes": ["cn01", "-oProxyCommand=touch /tmp/x"]},
    )
    with pytest.raises(MetadataError, match=r"onlineAnalysis\.reservedNodes\[1\]"):
        nodes_group(path, ssh_config=lab.ssh_config)


def test_thirty_two_nodes_in_one_run(lab, tmp_path) -> None:
    path = lab.make_session(tmp_path, lab.nodes)
    report = run_on_nodes(
        "hostname", metadata=path, ssh_config=lab.ssh_config, known_hosts=lab.known_hosts
    )
    assert len(report.results) == 32
    assert all(r.stdout.strip() == r.node for r in report.results)
    assert report.exit_status == 0


# ---------------------------------------------------------------- the command line
@pytest.fixture
def cli_env(lab, lab_session, known_hosts) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "MENTO_METADATA": str(lab_session),
        "MENTO_SSH_CONFIG": str(lab.ssh_config),
    }


def test_cli_gathers_identical_output_and_summarises(cli_env, known_hosts) -> None:
    proc = mento(
        "run-on-nodes", "--known-hosts", str(known_hosts),
        '[ "$(hostname)" = cn02 ] && { echo odd; exit 4; }; echo same',
        env=cli_env,
    )  # fmt: skip
    assert proc.returncode == 4
    assert re.search(r"^cn\[01,03-04\] \(3\)\n-+\nsame\n", proc.stdout, re.M)
    assert re.search(r"^cn02 \(1\)\n-+\nodd\n", proc.stdout, re.M)
    assert "4 nodes: 3 ok, 1 failed (cn02 exit 4), 0 unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_json_and_stream(cli_env, known_hosts) -> None:
    proc = mento(
        "run-on-nodes", "--json", "--nodes", "cn[01-02]", "--known-hosts", str(known_hosts),
        "hostname", env=cli_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["command"] == "hostname"
    assert [(n["node"], n["exit"], n["stdout"]) for n in data["nodes"]] == [
        ("cn01", 0, "cn01\n"),
        ("cn02", 0, "cn02\n"),
    ]
    assert data["summary"]["ok"] == 2
    streamed = mento(
        "run-on-nodes", "--stream", "--known-hosts", str(known_hosts), "echo a; echo b",
        env=cli_env,
    )  # fmt: skip
    lines = streamed.stdout.splitlines()
    assert sorted(lines) == sorted(f"cn0{i}: {x}" for i in range(1, 5) for x in "ab")


def test_cli_unreachable_node_exit_255_and_bad_selection_exit_2(lab, cli_env, known_hosts) -> None:
    lab.stop_sshd("cn01")
    try:
        proc = mento(
            "run-on-nodes", "--connect-timeout", "3", "--known-hosts", str(known_hosts), "true",
            env=cli_env,
        )  # fmt: skip
    finally:
        lab.start_sshd("cn01")
    assert proc.returncode == 255
    assert "cn01: unreachable: connection refused" in proc.stderr
    bad = mento("run-on-nodes", "--nodes", "cn99", "true", env=cli_env)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "not reserved" in bad.stderr
    bad_env = mento("run-on-nodes", "--env", "NOEQUALS", "true", env=cli_env)
    assert bad_env.returncode == 2 and "NAME=VALUE" in bad_env.stderr


def test_cli_check(lab, cli_env, known_hosts, lab_session) -> None:
    proc = mento("check", "--known-hosts", str(known_hosts), env=cli_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "READY: 4/4 nodes ready" in proc.stdout
    assert "beamline filesystem not mounted" in proc.stdout  # a warning, not an error
    key = lab_session.parent / "shared" / "id_rsa"
    key.chmod(0o644)
    try:
        loose = mento("check", "--json", "--known-hosts", str(known_hosts), env=cli_env)
    finally:
        key.chmod(0o600)
    data = json.loads(loose.stdout)
    assert loose.returncode == 1
    for node in data["nodes"]:  # design.md's per-node keys, plus the checks
        assert {"node", "exit", "stdout", "stderr", "error", "seconds"} <= set(node)
        assert node["exit"] == 0
    data["summary"].pop("seconds")  # the shared summary (results.py) also times the run
    assert data["summary"] == {
        "nodes": 4, "ok": 4, "failed": 0, "unreachable": 0, "exit_status": 1,
    }  # fmt: skip
    assert data["ready"] is False and "chmod 600" in data["key_problem"]
    assert all(n["login"] and n["home_writable"] for n in data["nodes"])
    lab.stop_sshd("cn02")
    try:
        down = mento(
            "check",
            "--json",
            "--connect-timeout",
            "3",
            "--known-hosts",
            str(known_hosts),
            env=cli_env,
        )
    finally:
        lab.start_sshd("cn02")
    assert down.returncode == 255
    node = {n["node"]: n for n in json.loads(down.stdout)["nodes"]}["cn02"]
    assert node["reachable"] is False and "refused" in node["error"]
    assert node["exit"] is None


def test_cli_timeout_option(cli_env, known_hosts) -> None:
    proc = mento(
        "run-on-nodes", "--timeout", "1", "--nodes", "cn01", "--known-hosts", str(known_hosts),
        "sleep 30", env=cli_env,
    )  # fmt: skip
    assert proc.returncode == 255
    assert "cn01: timed out after 1 s" in proc.stderr
    for bad in ("abc", "0", "-3"):
        wrong = mento("run-on-nodes", "--timeout", bad, "true", env=cli_env)
        assert wrong.returncode == 2 and "--timeout" in wrong.stderr
        assert "Traceback" not in wrong.stderr


def test_proxyjump_from_ssh_config_and_its_host_key_is_checked(lab, lab_session, tmp_path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host cn02\n  ProxyJump cn01\n\n" + lab.ssh_config.read_text())
    known = tmp_path / "known_hosts"
    known.write_text(
        "".join(line + "\n" for line in lab.known_hosts.read_text().splitlines() if "cn02" in line)
    )
    strict = run_on_nodes(
        "hostname; echo $SSH_CONNECTION", metadata=lab_session, nodes="cn02",
        ssh_config=config, known_hosts=known, host_keys="strict",
    )  # fmt: skip
    # cn02's key is known, the jump host's is not: strict refuses the hop.
    assert strict["cn02"].exit is None and "cn01" in strict["cn02"].error
    accepted = run_on_nodes(
        "hostname; echo $SSH_CONNECTION", metadata=lab_session, nodes="cn02",
        ssh_config=config, known_hosts=known,
    )  # fmt: skip
    assert accepted.ok, accepted.results
    name, connection = accepted["cn02"].stdout.splitlines()
    assert name == "cn02"
    assert connection.split()[0] == lab.addresses["cn01"]  # came in through the jump host
    assert any(line.startswith("cn01,") for line in known.read_text().splitlines())


def test_a_run_started_from_a_result_callback_does_not_deadlock(group) -> None:
    inner: list = []
    outer: list = []

    def nested() -> None:
        on_result = lambda r: inner.append(run(group, "true", fanout=4))  # noqa: E731
        outer.append(run(group, "true", fanout=4, on_result=on_result))

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "deadlocked"
    assert outer[0].ok
    assert len(inner) == 4 and all(r.ok for r in inner)


def test_a_node_that_vanishes_mid_command_fails_instead_of_hanging(
    lab, lab_session, known_hosts, monkeypatch
) -> None:
    import mento_fab.connection as connection_module

    monkeypatch.setattr(connection_module, "KEEPALIVE_INTERVAL", 1.0)
    monkeypatch.setattr(connection_module, "DEAD_PEER_TIMEOUT", 3.0)
    grp = nodes_group(
        lab_session, nodes="cn[01-02]", ssh_config=lab.ssh_config, known_hosts=known_hosts
    )
    cut = threading.Timer(1.0, lab.node_exec, args=("cn01", ["ip", "link", "set", "eth0", "down"]))
    try:
        cut.start()
        start = time.monotonic()
        report = run(grp, "sleep 3; echo done")
        elapsed = time.monotonic() - start
    finally:
        cut.join()
        lab.node_exec("cn01", ["ip", "link", "set", "eth0", "up"])
        grp.close()
    assert report["cn02"].stdout == "done\n" and report["cn02"].exit == 0
    assert report["cn01"].exit is None and "connection lost" in report["cn01"].error
    assert elapsed < 30  # the dead-peer timeout, not forever


def test_a_command_that_ignores_sigterm_is_still_killed(lab, group) -> None:
    marker = "876543"
    report = run(group, f"trap '' TERM; sleep {marker}", timeout=1)
    assert all("timed out after 1 s" in r.error for r in report.results), report.results
    time.sleep(0.5)
    assert not [p for n in lab.nodes[:4] for p, cmd in lab.node_pids(n).items() if marker in cmd]


def test_hop_timeouts_follow_connect_timeout(
    lab, lab_session, known_hosts, silent_listener, tmp_path
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host jump\n  HostName 127.0.0.1\n  Port {silent_listener}\n\n"
        "Host cn02\n  ProxyJump jump\n\n" + lab.ssh_config.read_text()
    )
    start = time.monotonic()
    report = run_on_nodes(
        "true", metadata=lab_session, nodes="cn02", ssh_config=config,
        known_hosts=known_hosts, connect_timeout=2,
    )  # fmt: skip
    assert report["cn02"].exit is None
    assert time.monotonic() - start < 2 + 6  # not paramiko's 15 s banner default


def test_published_system_known_hosts_satisfy_strict(lab, lab_session, tmp_path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        lab.ssh_config.read_text() + f"\nHost *\n  GlobalKnownHostsFile {lab.known_hosts}\n"
    )
    report = run_on_nodes(
        "true", metadata=lab_session, ssh_config=config,
        known_hosts=tmp_path / "empty_known_hosts", host_keys="strict",
    )  # fmt: skip
    assert report.ok, report.results
    assert not (tmp_path / "empty_known_hosts").exists()


def test_a_key_the_account_does_not_accept_is_an_auth_failure(lab, tmp_path, known_hosts) -> None:
    # "daemon" exists on the nodes but has no authorized_keys: the key is refused.
    path = lab.make_session(tmp_path, lab.nodes[:2], onlineAnalysis={"userAccount": "daemon"})
    report = run_on_nodes("true", metadata=path, ssh_config=lab.ssh_config, known_hosts=known_hosts)
    assert [r.error for r in report.results] == [
        "authentication failed (key not accepted for this account)"
    ] * 2
    assert report.exit_status == 255
    proc = mento(
        "check", "--json", "--metadata", str(path), "--ssh-config", str(lab.ssh_config),
        "--known-hosts", str(known_hosts),
    )  # fmt: skip
    nodes = json.loads(proc.stdout)["nodes"]
    assert proc.returncode == 255
    assert all(n["reachable"] and not n["login"] for n in nodes)
