"""``mento-fab tunnel`` and ``mento_fab.tunnel``: a local port to a port on a node, over SSH."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lab import Lab
from mento_fab.errors import NodeError, PortInUse
from mento_fab.tunnel import tunnel

REQUESTS = 20


@pytest.fixture
def env(lab: Lab, lab_session: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MENTO_METADATA": str(lab_session),
        "MENTO_SSH_CONFIG": str(lab.ssh_config),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def web(lab: Lab, tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """``python3 -m http.server`` on cn01..cn04, bound to each node's loopback only."""
    root = tmp_path / "www"
    root.mkdir()
    body = os.urandom(200_000)
    (root / "blob").write_bytes(body)
    os.chmod(tmp_path, 0o755)
    port = 18000 + os.getpid() % 1000
    pids = {}
    for node in lab.nodes[:4]:
        proc = lab.node_exec(
            node,
            ["sh", "-c", f"python3 -m http.server {port} --bind 127.0.0.1 --directory {root} "
             "</dev/null >/dev/null 2>&1 & echo $!"],
        )  # fmt: skip
        pids[node] = proc.stdout.strip()
    for node in pids:  # wait until each serves
        script = (
            "import socket,time\nfor _ in range(100):\n"
            f"    try: socket.create_connection(('127.0.0.1', {port}), 1).close(); break\n"
            "    except OSError: time.sleep(0.05)"
        )
        lab.node_exec(node, ["python3", "-c", script])
    try:
        yield port, body
    finally:
        for node, pid in pids.items():
            lab.node_exec(node, ["kill", pid])


def _fetch_many(url: str, n: int = REQUESTS) -> list[bytes]:
    def one(_: int) -> bytes:
        with urllib.request.urlopen(url + "blob", timeout=30) as response:
            return response.read()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def _start_cli(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mento_fab", "tunnel", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        pytest.fail(f"tunnel did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.strip()


def _sshd_sessions(lab: Lab, node: str) -> list[int]:
    return [pid for pid, cmd in lab.node_pids(node).items() if cmd.startswith("sshd:")]


def _drop_sessions(lab: Lab, node: str) -> None:
    """The node's side of every SSH session ends (as when a node goes away)."""
    for pid in _sshd_sessions(lab, node):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- lab


def test_cli_tunnel_serves_concurrent_requests_on_loopback_only_and_closes_cleanly(
    lab: Lab, env: dict[str, str], web: tuple[int, bytes]
) -> None:
    port, body = web
    proc, url = _start_cli("cn01", str(port), env=env)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        local = int(url.rsplit(":", 1)[1].strip("/"))
        assert _listening(local) == ["0100007F"]  # 127.0.0.1, nothing else
        with pytest.raises(OSError):  # not reachable from the lab network
            socket.create_connection((lab.host_address, local), timeout=2).close()
        assert _fetch_many(url) == [body] * REQUESTS
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert proc.stderr is not None and "tunnel closed" in proc.stderr.read()
        assert _listening(local) == []
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", local), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_tunnel_on_a_given_port_with_json(env: dict[str, str], web: tuple[int, bytes]) -> None:
    port, body = web
    local = _free_port()
    proc, line = _start_cli(
        "cn02", str(port), "--local-port", str(local), "--remote-host", "127.0.0.1", "--json",
        env=env,
    )  # fmt: skip
    try:
        text = line
        assert proc.stdout is not None
        while not text.rstrip().endswith("}"):
            text += proc.stdout.readline()
        info = json.loads(text)
        assert info["url"] == f"http://127.0.0.1:{local}/" and info["node"] == "cn02"
        assert _fetch_many(info["url"], 3) == [body] * 3
        proc.terminate()  # SIGTERM ends it as cleanly as Ctrl-C
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_ports_and_a_port_in_use_are_one_line_exit_2(env: dict[str, str]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mento_fab", "tunnel", *args],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    for args in (("cn01", "70000"), ("cn01", "0"), ("cn01", "80", "--local-port", "x")):
        proc = run(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run("cn01", "80", "--local-port", str(port))
    assert proc.returncode == 2 and "in use" in proc.stderr and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    proc = run("cn05", "80")  # a lab node outside the session's reservation
    assert proc.returncode == 2 and "not reserved" in proc.stderr


def test_library_tunnel_as_a_context_manager(
    lab: Lab, lab_session: Path, web: tuple[int, bytes]
) -> None:
    port, body = web
    t = tunnel(lab_session, "cn03", port, ssh_config=lab.ssh_config, connect_timeout=5)
    with t as url:
        assert _fetch_many(url, 5) == [body] * 5
        assert t.active and t.forwarded == 5
        assert url in t._repr_html_() and "cn03" in repr(t)
    assert not t.active and t.error is None
    assert _listening(t.local_port) == []
    with pytest.raises(PortInUse), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        tunnel(lab_session, "cn03", port, local_port=taken.getsockname()[1],
               ssh_config=lab.ssh_config).start()  # fmt: skip


def test_nothing_listening_on_the_node_keeps_the_tunnel_up(
    lab: Lab, lab_session: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t = tunnel(lab_session, "cn04", 1, ssh_config=lab.ssh_config)  # nothing listens on port 1
    with t as url:
        for _ in range(2):
            with pytest.raises(OSError):  # each connection is closed without an answer
                urllib.request.urlopen(url, timeout=10).read()
        assert t.active and t.refused == 2
    assert any("could not reach" in r.getMessage() for r in caplog.records)


def test_a_node_that_goes_away_ends_the_tunnel_with_a_clear_message(
    lab: Lab, env: dict[str, str], web: tuple[int, bytes], lab_session: Path
) -> None:
    port, body = web
    proc, url = _start_cli("cn04", str(port), env=env)
    try:
        assert _fetch_many(url, 2) == [body] * 2
        _drop_sessions(lab, "cn04")
        assert proc.wait(30) == 255
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "connection to cn04 was lost" in err and err.count("\n") == 2  # start + end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t = tunnel(lab_session, "cn04", port, ssh_config=lab.ssh_config).start()
    try:
        assert _fetch_many(t.url, 1) == [body]
        _drop_sessions(lab, "cn04")
        assert t.wait(30)
        assert t.error is not None and "lost" in t.error
        assert "lost" in t._repr_html_()
    finally:
        t.close()
    with pytest.raises(NodeError):  # a node that cannot be reached: no listener left behind
        lab.stop_sshd("cn04")
        try:
            tunnel(lab_session, "cn04", port, ssh_config=lab.ssh_config, connect_timeout=3).start()
        finally:
            lab.start_sshd("cn04")
