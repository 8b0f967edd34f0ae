"""The thin client and the agent without the lab: routing, the wire, the private
directory, start-up imports, and ``info`` (which needs no nodes) through the agent."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mento_fab.agent import wire
from mento_fab.cli import client
from mento_fab.cli.client import route
from mento_fab.errors import AgentError

HEAVY = ("paramiko", "fabric", "invoke", "rich", "marshmallow", "ClusterShell")


def mento(
    *args: str, agent: bool = True, env: dict[str, str] | None = None, timeout: float = 120, **kw
) -> subprocess.CompletedProcess[bytes]:
    """``mento-fab ARGS`` in a new process; a hang fails with the stacks of client and agent."""
    environment = {**os.environ, "MENTO_AGENT": "1" if agent else "0", **(env or {})}
    environment["PYTHONFAULTHANDLER"] = "1"
    argv = [sys.executable, "-m", "mento_fab", *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=environment, **kw) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler: the client's stacks on stderr
            directory = Path(environment["MENTO_AGENT_DIR"])
            for pidfile in directory.glob("agent-*.pid"):
                os.kill(int(pidfile.read_text()), signal.SIGUSR1)  # the agent's, in its log
            time.sleep(1)
            out, err = proc.communicate()
            logs = "".join(p.read_text() for p in directory.glob("agent-*.log"))
            pytest.fail(f"{args} hung; client:\n{err.decode()}\nagent log:\n{logs}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# ----------------------------------------------------------------------- routing
@pytest.mark.parametrize(
    ("args", "through_agent"),
    [
        (["run-on-nodes", "hostname"], True),
        (["-f", "x.yaml", "check"], True),
        (["--config=x.yaml", "releases", "--target", "/x"], True),
        (["deploy", "--source", "."], False),  # Ctrl-C is held back in its own main thread
        (["rollback", "--target", "/x"], False),
        (["info", "--json"], True),
        (["run-on-nodes", "--help"], False),
        (["--help"], False),
        (["-h", "run-on-nodes"], False),
        (["--list"], False),
        (["--version"], False),
        (["--debug", "info"], False),
        (["--no-agent", "run-on-nodes", "true"], False),
        (["agent"], False),
        (["agent", "--stop"], False),
        (["ssh", "cn01"], False),
        (["some-new-task"], False),
        (["info", "ssh"], False),
        (["run-on-nodes", "--via", "ssh", "hostname"], True),
        (["run-on-nodes", "--json", "--via", "ssh", "true"], True),
        (["run-on-nodes", "--nodes", "top", "true"], True),
        (["run-on-nodes", "--json", "true", "ssh", "cn01"], False),
        ([], False),
    ],
)
def test_which_calls_go_through_the_agent(args: list[str], through_agent: bool) -> None:
    reason, _ = route(args, {})
    assert (reason is None) is through_agent, reason


def test_the_client_knows_which_options_take_no_value() -> None:
    """The stdlib-only client cannot ask invoke; its list must match the tasks' flags."""
    from mento_fab.cli import namespace

    ns = namespace()
    flags = {
        f"--{name.replace('_', '-')}"
        for task in client.AGENT_TASKS
        for arg in ns[task].get_arguments()
        if arg.kind is bool
        for name in arg.names
    }
    assert flags == client.FLAGS


@pytest.mark.parametrize("value", ["0", "off", "no", "false", " 0 "])
def test_mento_agent_0_turns_it_off(value: str) -> None:
    assert route(["run-on-nodes", "true"], {"MENTO_AGENT": value})[0] == "MENTO_AGENT=0"
    assert route(["run-on-nodes", "true"], {"MENTO_AGENT": "1"})[0] is None


# -------------------------------------------------------------------------- wire
def test_messages_and_file_descriptors_travel_together(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b, open(tmp_path / "f", "w") as f:
        wire.send(a, {"op": "run", "argv": ["ü", "x" * 100_000]}, fds=[f.fileno()])
        message, fds = wire.recv(b, max_fds=3)
        assert message["argv"][0] == "ü" and len(message["argv"][1]) == 100_000
        assert len(fds) == 1 and os.get_inheritable(fds[0]) is False
        os.write(fds[0], b"through the passed fd\n")
        os.close(fds[0])
    assert (tmp_path / "f").read_text() == "through the passed fd\n"


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x05hello", b"\x00\x00\x00\x02[]", b"\xff" * 4])
def test_anything_else_on_the_socket_is_refused(data: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises((AgentError, EOFError)):
            wire.recv(b)


def test_the_peer_uid_is_known() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert wire.peer_uid(a) == wire.peer_uid(b) == os.getuid()


def test_the_directory_must_be_private(tmp_path: Path) -> None:
    good = tmp_path / "good"
    assert wire.private_dir_problem(good, create=True) is None
    assert good.stat().st_mode & 0o777 == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    assert "open to others" in wire.private_dir_problem(loose)
    link = tmp_path / "link"
    link.symlink_to(good)
    assert "not a directory" in wire.private_dir_problem(link)
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        assert "owned by uid 65534" in wire.private_dir_problem(foreign)


def test_the_directory_follows_the_environment(tmp_path: Path) -> None:
    assert wire.agent_dir({"MENTO_AGENT_DIR": "/x"}) == Path("/x")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    assert wire.agent_dir({"XDG_RUNTIME_DIR": str(runtime)}) == runtime / "mento_fab"
    runtime.chmod(0o755)  # not a real runtime dir: fall back to /tmp
    assert wire.agent_dir({"XDG_RUNTIME_DIR": str(runtime)}) == Path(
        f"/tmp/mento_fab-{os.getuid()}"
    )


# ---------------------------------------------------------------- start-up cost
def _imported(args: list[str], env: dict[str, str]) -> set[str]:
    """Top-level modules a ``mento-fab`` process imported (``-X importtime``)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mento_fab", *args],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_version_imports_nothing_heavy() -> None:
    assert not set(HEAVY) & _imported(["--version"], {})
    assert mento("--version").stdout == mento("--version", agent=False, env={
        "MENTO_AGENT": "0"}).stdout == b"mento-fab 0.1.0\n"  # fmt: skip
    # invoke's own answer is the same
    direct = subprocess.run(
        [sys.executable, "-c", "from mento_fab.cli import program; program.run(['m', '-V'])"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert direct.stdout == b"mento-fab 0.1.0\n"


def test_a_call_through_the_agent_imports_nothing_heavy(beamtime) -> None:
    args = ["info", "--metadata", str(beamtime.metadata)]
    assert mento(*args).returncode == 0  # starts the agent
    imported = _imported(args, {"MENTO_AGENT": "1"})
    assert not set(HEAVY) & imported, sorted(set(HEAVY) & imported)
    assert "mento_fab" in imported


# ------------------------------------------------------------- info via the agent
def _agent_pids(directory: Path) -> list[int]:
    return [int(p.read_text()) for p in directory.glob("agent-*.pid")]


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_info_is_the_same_through_the_agent(beamtime, private_agent: Path, extra) -> None:
    args = ["info", "--metadata", str(beamtime.metadata), *extra]
    direct = mento(*args, agent=False)
    first = mento(*args)  # starts the agent and runs through it
    warm = mento(*args)
    assert len(_agent_pids(private_agent)) == 1
    for proc in (first, warm):
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            direct.returncode, direct.stdout, direct.stderr,
        )  # fmt: skip
    assert direct.returncode == 0 and b"11019999" in direct.stdout


def test_bad_input_is_the_same_through_the_agent(beamtime, tmp_path: Path) -> None:
    cases = [
        ["info", "--metadata", str(tmp_path / "missing.json")],
        ["info", "--metadata", str(beamtime.metadata), "--bogus"],
        ["run-on-nodes", "--metadata", str(beamtime.metadata), "--env", "NOEQUALS", "true"],
    ]
    for args in cases:
        direct = mento(*args, agent=False)
        through = mento(*args)
        assert direct.returncode == 2, direct.stderr
        assert (through.returncode, through.stdout, through.stderr) == (
            direct.returncode, direct.stdout, direct.stderr,
        ), args  # fmt: skip


def test_relative_paths_resolve_in_the_callers_directory(beamtime) -> None:
    session = beamtime.metadata.parent
    name = beamtime.metadata.name
    direct = mento("info", "--metadata", name, agent=False, cwd=session)
    through = mento("info", "--metadata", name, cwd=session)
    assert direct.returncode == 0 and through.stdout == direct.stdout
    # and the environment is the caller's too
    env = {"MENTO_METADATA": str(beamtime.metadata)}
    by_env = mento("info", env=env)
    assert by_env.returncode == 0 and b"11019999" in by_env.stdout
    assert by_env.stdout == mento("info", agent=False, env=env).stdout


def test_stale_socket_is_replaced(beamtime, private_agent: Path) -> None:
    names = wire.Names(private_agent)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(names.socket))
    dead.close()  # the file stays, nobody listens: a crashed agent
    proc = mento("info", "--metadata", str(beamtime.metadata), env={"MENTO_LOG_LEVEL": "debug"})
    assert proc.returncode == 0, proc.stderr
    assert b"stale socket" in proc.stderr
    assert client.query(names, {"op": "status"})["served"] == 1


def test_a_socket_of_another_user_is_not_used(beamtime, private_agent: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the socket to another user")
    args = ["info", "--metadata", str(beamtime.metadata)]
    assert mento(*args).returncode == 0
    names = wire.Names(private_agent)
    os.chown(names.socket, 65534, 65534)
    proc = mento(*args, env={"MENTO_LOG_LEVEL": "debug"})
    assert proc.returncode == 0 and b"11019999" in proc.stdout
    assert b"owned by uid 65534" in proc.stderr
    assert client.query.__name__  # the agent itself is stopped by the fixture
    os.chown(names.socket, 0, 0)


def test_a_directory_open_to_others_is_not_used(beamtime, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    proc = mento(
        "info", "--metadata", str(beamtime.metadata),
        env={"MENTO_AGENT_DIR": str(loose), "MENTO_LOG_LEVEL": "debug"},
    )  # fmt: skip
    assert proc.returncode == 0 and b"open to others" in proc.stderr
    assert not list(loose.iterdir())


def test_code_changes_retire_the_agent(beamtime, private_agent: Path, monkeypatch) -> None:
    args = ["info", "--metadata", str(beamtime.metadata)]
    assert mento(*args).returncode == 0
    (old,) = _agent_pids(private_agent)
    names = wire.Names(private_agent)
    with client.connect(names) as sock:  # a client of other code
        wire.send(sock, {"op": "run", "protocol": wire.PROTOCOL, "fingerprint": "other"},
                  fds=(0, 1, 2))  # fmt: skip
        reply, _ = wire.recv(sock)
    assert reply["op"] == "stale"
    deadline = time.monotonic() + 15
    while client.alive(old) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.alive(old)
    assert mento(*args).returncode == 0
    (new,) = _agent_pids(private_agent)
    assert new != old


def test_status_and_stop(beamtime, private_agent: Path) -> None:
    none = mento("agent")
    assert none.returncode == 0 and b"no agent running" in none.stdout
    assert mento("info", "--metadata", str(beamtime.metadata)).returncode == 0
    state = json.loads(mento("agent", "--json").stdout)
    (agent,) = state["agents"]
    assert agent["served"] == 1 and agent["pid"] in _agent_pids(private_agent)
    assert agent["socket"].startswith(str(private_agent))
    text = mento("agent").stdout.decode()
    assert f"pid      {agent['pid']}" in text and "exits after 10 min" in text
    stopped = mento("agent", "--stop")
    assert stopped.returncode == 0 and b"stopped the agent" in stopped.stdout
    assert not client.alive(agent["pid"])
    assert not list(private_agent.glob("*.sock"))


def test_idle_exit(beamtime, private_agent: Path) -> None:
    args = ["info", "--metadata", str(beamtime.metadata)]
    assert mento(*args, env={"MENTO_AGENT_IDLE": "1"}).returncode == 0
    (pid,) = _agent_pids(private_agent)
    deadline = time.monotonic() + 30
    while client.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not client.alive(pid)
    assert not list(private_agent.glob("*.sock")) and not list(private_agent.glob("*.pid"))


def test_the_agent_starts_without_the_callers_environment(beamtime, private_agent: Path) -> None:
    """Each call brings its environment; the long-lived process does not keep the first's."""
    args = ["info", "--metadata", str(beamtime.metadata)]
    assert mento(*args, env={"RT_SECRET": "hunter2"}).returncode == 0
    (pid,) = _agent_pids(private_agent)
    own = dict(
        entry.split(b"=", 1) for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"=" in entry
    )  # fmt: skip
    leaked = b"RT_SECRET" in own  # (no values in a failure's message)
    assert not leaked
    assert own.get(b"PATH") == os.environb[b"PATH"]
    assert own.get(b"MENTO_AGENT_DIR") == str(private_agent).encode()


def test_a_calls_environment_and_umask_leave_with_it(tmp_path: Path, monkeypatch) -> None:
    """Between calls the agent's process holds its own environment and umask again."""
    from mento_fab.agent.server import _Setting

    monkeypatch.chdir(tmp_path)  # enter() changes the directory; back afterwards
    before, umask = dict(os.environ), os.umask(0o022)
    os.umask(umask)
    setting = _Setting()
    try:
        call = {**before, "RT_SECRET": "hunter2"}
        assert setting.enter(str(tmp_path), call, 0o027) is None
        assert setting.enter(str(tmp_path), call, 0o027) is None  # a second, same setting
        assert os.environ.get("RT_SECRET") == "hunter2"
        setting.leave()
        assert os.environ.get("RT_SECRET") == "hunter2"  # the other call still runs
        setting.leave()
        restored = "RT_SECRET" not in os.environ and dict(os.environ) == before
        assert restored  # (no values in a failure's message)
        assert os.umask(umask) == umask
    finally:
        os.environ.clear()
        os.environ.update(before)
        os.umask(umask)


def test_reading_the_umask_never_sets_it(monkeypatch) -> None:
    """os.umask reads by setting: another thread (a Trigger's worker) could keep 077."""
    from mento_fab.agent.client import current_umask

    expected = os.umask(0o027)
    os.umask(0o027)
    try:

        def refuse(mask: int) -> int:
            raise AssertionError("the umask was set to read it")

        monkeypatch.setattr(os, "umask", refuse)
        assert current_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(expected)


def test_a_silent_agent_is_given_up_and_the_call_runs_here(
    beamtime, private_agent: Path, tmp_path: Path
) -> None:
    """An agent that takes the connection and never answers (stopped, wedged)."""
    from mento_fab.agent import client as agent_client

    names = wire.Names(private_agent)
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(names.socket))
    silent.listen(4)  # the kernel accepts connections; nobody ever answers
    try:
        with agent_client.connect(names) as sock, pytest.raises(TimeoutError):
            agent_client.submit(sock, {"op": "run"}, (0, 1, 2), timeout=0.3)
        env = {**os.environ, "MENTO_AGENT": "1", "MENTO_LOG_LEVEL": "debug"}
        argv = [sys.executable, "-m", "mento_fab", "info", "--metadata", str(beamtime.metadata)]
        # Files, not pipes: the fds handed to a listener that never accepts stay in its
        # queue (and would keep a pipe open) until the listener closes.
        out, err = tmp_path / "out", tmp_path / "err"
        start = time.monotonic()
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.run(argv, env=env, stdout=o, stderr=e, timeout=60, check=False)
        assert proc.returncode == 0 and b"11019999" in out.read_bytes(), err.read_bytes()
        assert b"did not take the call" in err.read_bytes()
        assert time.monotonic() - start < 40
    finally:
        silent.close()
        names.socket.unlink()


def test_a_call_runs_in_the_agent_only_after_the_clients_go(
    beamtime, private_agent: Path
) -> None:
    """A client that stopped waiting runs the call itself: the agent must not run it too."""
    from mento_fab.agent import client as agent_client

    args = ["info", "--metadata", str(beamtime.metadata)]
    assert mento(*args).returncode == 0  # the agent runs, with one call served
    names = wire.Names(private_agent)
    out_r, out_w = os.pipe()
    stdin = os.open(os.devnull, os.O_RDONLY)
    facts = {"encoding": "utf-8", "errors": "strict", "line_buffering": False,
             "write_through": False}  # fmt: skip
    streams = dict.fromkeys(("stdin", "stdout", "stderr"), facts)
    request = agent_client.run_request(["mento-fab", *args], "info", streams)
    with agent_client.connect(names) as sock:
        wire.send(sock, request, fds=(stdin, out_w, out_w))
        for fd in (stdin, out_w):
            os.close(fd)
        reply, _ = wire.recv(sock)
        assert reply["op"] == "ready"
    # gone without "go": nothing may reach the passed stdout, the call is not served
    assert os.read(out_r, 100) == b""  # EOF: the agent closed its copy unused
    os.close(out_r)
    assert client.query(names, {"op": "status"})["served"] == 1
