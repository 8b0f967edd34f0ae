"""The trigger API: original call shapes, one reused connection, handles, background queue."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mento_fab.trigger import Trigger, TriggerError, TriggerMethod, split_arg_list

WAIT = 60


# ------------------------------------------------------------ no lab needed
@pytest.mark.parametrize(
    ("arg_list", "argv"),
    [
        (["cmd"], ["cmd"]),
        (["cmd a1 'a 2'"], ["cmd", "a1", "a 2"]),
        (["cmd", ["a 1", 2]], ["cmd", "a 1", "2"]),
        (["cmd", "a 1", "$HOME"], ["cmd", "a 1", "$HOME"]),
    ],
)
def test_the_originals_four_arg_list_shapes(arg_list, argv) -> None:
    assert split_arg_list(arg_list) == argv


def test_method_values_match_the_original() -> None:
    assert [m.name for m in TriggerMethod] == [
        "SLURM_REST_API", "REMOTE_COMMAND", "REMOTE_SBATCH_SCRIPT", "LOCAL_BASH_SCRIPT",
    ]  # fmt: skip
    assert TriggerMethod.REMOTE_SBATCH_SCRIPT == 3


def test_local_bash_script_returns_its_exit_status(beamtime, tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text('#!/bin/sh\necho "[$1]"; exit 4\n')
    script.chmod(0o755)
    trig = Trigger(TriggerMethod.LOCAL_BASH_SCRIPT, beamtime.root)
    handle = trig.run([str(script), "a b"])
    assert handle.done() and handle.exit_status == 4 and handle.stdout == "[a b]\n"
    with pytest.raises(TriggerError, match="exit 4"):
        handle.check()
    with pytest.raises(FileNotFoundError):
        trig.run([str(tmp_path / "missing.sh")])
    script.chmod(0o644)
    with pytest.raises(RuntimeError, match="not executable"):
        trig.run([str(script)])
    with pytest.raises(RuntimeError, match="not provided"):
        trig.run([])
    trig.close()


def test_unknown_and_unavailable_methods(beamtime) -> None:
    with pytest.raises(RuntimeError, match="not known"):
        Trigger(99, beamtime.root)
    trig = Trigger(TriggerMethod.SLURM_REST_API, beamtime.root)
    with pytest.raises(NotImplementedError):
        trig.run(["x"])


def test_a_full_queue_fails_the_handle_instead_of_blocking(beamtime, tmp_path, caplog) -> None:
    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/sh\nsleep 0.5\n")
    script.chmod(0o755)
    trig = Trigger(TriggerMethod.LOCAL_BASH_SCRIPT, beamtime.root, max_pending=1)
    with caplog.at_level(logging.ERROR, logger="mento_fab.trigger"):
        start = time.monotonic()
        handles = [trig.run([str(script)], background=True) for _ in range(4)]
        # never blocks the caller: one blocking call alone would take the script's 0.5 s
        assert time.monotonic() - start < 0.5
    dropped = [h for h in handles if h.done() and h.error and "pending" in h.error]
    assert dropped, [h.error for h in handles]
    assert any("trigger dropped" in r.getMessage() for r in caplog.records)
    trig.close()
    assert all(h.done() for h in handles)
    assert sum(h.ok for h in handles) == len(handles) - len(dropped)


def test_a_destination_outside_the_reservation_raises_at_once(beamtime) -> None:
    trig = Trigger(TriggerMethod.REMOTE_COMMAND, beamtime.root)
    try:
        for background in (False, True):
            with pytest.raises(ValueError, match="cn77 is not one of the reserved nodes"):
                trig.run(["true"], destination="cn77", background=background)
        with pytest.raises(ValueError, match="cn77"):
            trig.connection("cn77")
        assert trig.pending() == 0
    finally:
        trig.close()


class _FakeTransport:
    def __init__(self, conn: _FakeConn) -> None:
        self.conn = conn

    def open_session(self, timeout: float | None = None) -> _FakeTransport:
        if self.conn.stale:  # the node dropped us; we only learn it on the next request
            self.conn.stale = False
            self.conn.is_connected = False
            raise EOFError
        return self

    def close(self) -> None:
        pass


class _FakeConn:
    connect_timeout = 1.0

    def __init__(self) -> None:
        self.is_connected = False
        self.stale = False

    def close(self) -> None:
        self.is_connected = False


@pytest.fixture
def fake_node(beamtime, monkeypatch):
    """A Trigger whose one connection and ``execute`` are fakes: counts what was sent."""
    import mento_fab.trigger as trigger_module
    from mento_fab.results import NodeResult

    conn = _FakeConn()
    sent: list[str] = []

    def ensure_open(c: _FakeConn) -> _FakeTransport:
        c.is_connected = True
        return _FakeTransport(c)

    def open_channel(c: _FakeConn) -> _FakeTransport:
        return ensure_open(c).open_session()

    def execute(
        c: _FakeConn, line: str, timeout: float | None = None, channel: object = None
    ) -> NodeResult:
        sent.append(line)
        if c.stale:  # the transport dies after the exec request went out
            c.is_connected = False
            return NodeResult(node="cn", error="ssh error: Channel closed.")
        return NodeResult(node="cn", exit=0, stdout="123\n")

    monkeypatch.setattr(trigger_module, "nodes_group", lambda *a, **k: [conn])
    monkeypatch.setattr(trigger_module, "ensure_open", ensure_open)
    monkeypatch.setattr(trigger_module, "open_channel", open_channel)
    monkeypatch.setattr(trigger_module, "execute", execute)
    trig = Trigger(TriggerMethod.REMOTE_SBATCH_SCRIPT, beamtime.root)
    yield trig, conn, sent
    trig.close()


def test_a_command_whose_exec_request_was_sent_is_never_sent_again(fake_node) -> None:
    trig, conn, sent = fake_node
    assert trig.run(["/x/job.sh"]).job_id == "123"
    sent.clear()
    real_open_session = _FakeTransport.open_session
    _FakeTransport.open_session = lambda self, timeout=None: self  # session opens ...
    try:
        conn.stale = True  # ... then the transport dies while the exec request is out
        handle = trig.run(["/x/job.sh"])
    finally:
        _FakeTransport.open_session = real_open_session
    assert len(sent) == 1, sent  # an sbatch must not be submitted twice
    assert handle.exit_status is None and "Channel closed" in handle.error


def test_a_connection_found_dead_before_sending_is_reopened_once(fake_node) -> None:
    trig, conn, sent = fake_node
    trig.run(["/x/job.sh"])
    sent.clear()
    conn.stale = True  # dropped while idle: opening the session fails, nothing sent yet
    handle = trig.run(["/x/job.sh"])
    assert len(sent) == 1 and handle.ok and handle.job_id == "123"
    assert trig.connects == {str(trig.bt_info.online.nodes[0]): 2}


def test_a_connection_dead_again_after_reopening_is_not_retried_twice(fake_node) -> None:
    trig, _, sent = fake_node
    trig.run(["/x/job.sh"])
    sent.clear()
    real_open_session = _FakeTransport.open_session

    def always_dead(self, timeout=None):
        raise EOFError

    _FakeTransport.open_session = always_dead
    try:
        handle = trig.run(["/x/job.sh"])
    finally:
        _FakeTransport.open_session = real_open_session
    assert sent == []  # nothing reached the node: neither attempt sent the command
    assert handle.exit_status is None and "connection closed" in handle.error
    assert trig.connects == {str(trig.bt_info.online.nodes[0]): 2}  # reopened once only


def test_errors_keep_the_originals_types_and_are_mento_errors(beamtime, tmp_path) -> None:
    from mento_fab.errors import BadInput, MentoError, TriggerTimeout

    trig = Trigger(TriggerMethod.LOCAL_BASH_SCRIPT, beamtime.root)
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\nexit 1\n")
    calls = {
        RuntimeError: lambda: trig.run([]),
        FileNotFoundError: lambda: trig.run([str(tmp_path / "missing.sh")]),
    }
    for original, call in calls.items():
        with pytest.raises(original) as caught:
            call()
        assert isinstance(caught.value, BadInput)  # bad input: exit status 2
    with pytest.raises(RuntimeError) as unknown:
        Trigger(99, beamtime.root)
    assert isinstance(unknown.value, BadInput)
    with pytest.raises(NotImplementedError) as rest:
        Trigger(TriggerMethod.SLURM_REST_API, beamtime.root).run(["x"])
    assert isinstance(rest.value, MentoError)
    script.chmod(0o755)
    handle = trig.run([str(script)])
    with pytest.raises(TriggerError) as failed:
        handle.check()
    assert isinstance(failed.value, MentoError) and isinstance(failed.value, RuntimeError)
    script.write_text("#!/bin/sh\nsleep 1\n")
    slow = trig.run([str(script)], background=True)
    with pytest.raises(TimeoutError) as waited:
        slow.wait(0.01)
    assert isinstance(waited.value, TriggerTimeout)
    trig.close()
    with pytest.raises(TriggerError, match="closed"):
        trig.run([str(script)])


def test_exit_drain_is_bounded_and_logs_what_it_abandons(
    beamtime, tmp_path, monkeypatch, caplog
) -> None:
    import mento_fab.trigger as trigger_module

    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/sh\nsleep 2\n")
    script.chmod(0o755)
    trig = Trigger(TriggerMethod.LOCAL_BASH_SCRIPT, beamtime.root)
    handles = [trig.run([str(script)], background=True) for _ in range(4)]
    monkeypatch.setattr(trigger_module, "EXIT_DRAIN_TIMEOUT", 0.5)
    with caplog.at_level(logging.WARNING, logger="mento_fab.trigger"):
        start = time.monotonic()
        trigger_module._drain_at_exit()
        assert time.monotonic() - start < 2.0  # unbounded: at least the running job's 2 s
    assert any("not run" in r.getMessage() and "still running" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    abandoned = [h for h in handles if h.done() and h.error and "abandoned" in h.error]
    assert len(abandoned) == 3  # the queued ones end on their handles; one was running
    handles[0].wait(WAIT)


# ------------------------------------------------------------------ the lab
@pytest.fixture
def remote(slurm_lab, slurm_session: Path) -> Iterator[Trigger]:
    trig = Trigger(
        TriggerMethod.REMOTE_COMMAND, metadata=slurm_session, ssh_config=slurm_lab.ssh_config
    )
    yield trig
    trig.close()


def test_200_triggers_in_a_row_use_one_transport(remote) -> None:
    transport = None
    for i in range(200):
        handle = remote.run(["echo", str(i)])
        assert handle.ok and handle.stdout == f"{i}\n"
        current = remote.connection().transport
        transport = transport or current
        assert current is transport
    assert remote.connects == {"cn01": 1}


def test_arguments_reach_the_command_unsplit_and_unexpanded(remote) -> None:
    args = ["a b", "$HOME", "it's", "*", "x;y", ""]
    handle = remote.run(["printf", "[%s]\\n", *args])
    assert handle.ok
    assert handle.stdout.splitlines() == [f"[{a}]" for a in args]


def test_destination_picks_the_node(remote) -> None:
    assert remote.run(["hostname"], destination="cn03").stdout == "cn03\n"
    assert remote.run(["hostname"]).stdout == "cn01\n"


def test_a_trigger_after_sshd_restarted_and_the_session_dropped(remote, slurm_lab) -> None:
    assert remote.run(["true"]).ok
    slurm_lab.restart_sshd("cn01")  # open sessions survive a restart ...
    assert remote.run(["hostname"]).stdout == "cn01\n"
    assert remote.connects == {"cn01": 1}
    # ... so drop ours too, from the node's side: its sshd session processes die
    for pid, cmd in slurm_lab.node_pids("cn01").items():
        if cmd.startswith("sshd:"):
            with contextlib.suppress(ProcessLookupError):  # it may have ended already
                os.kill(pid, signal.SIGTERM)  # a host pid: we are root on the host
    handle = remote.run(["hostname"])
    assert handle.ok, handle.error
    assert handle.stdout == "cn01\n"
    assert remote.connects == {"cn01": 2}


def test_background_triggers_never_block_and_keep_failures(remote, caplog) -> None:
    assert remote.run(["true"]).ok  # connected before timing the queueing
    with caplog.at_level(logging.ERROR, logger="mento_fab.trigger"):
        start = time.monotonic()
        handles = [
            remote.run(["sh", "-c", f"sleep 0.2; exit {3 if i == 2 else 0}"], background=True)
            for i in range(5)
        ]
        queued = time.monotonic() - start
        assert queued < 0.2  # one blocking call alone would take the job's 0.2 s
        assert not all(h.done() for h in handles)
        for handle in handles:
            handle.wait(WAIT)
    assert [h.exit_status for h in handles] == [0, 0, 3, 0, 0]
    assert not handles[2].ok and handles[2].background
    with pytest.raises(TriggerError, match="exit 3"):
        handles[2].check()
    assert any("trigger failed" in r.getMessage() and "exit 3" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_background_failure_to_reach_a_node_lands_on_the_handle(slurm_lab, tmp_path) -> None:
    md = slurm_lab.make_session(tmp_path, slurm_lab.nodes[:2])
    done = threading.Event()
    trig = Trigger(
        TriggerMethod.REMOTE_COMMAND, metadata=md, ssh_config=slurm_lab.ssh_config,
        connect_timeout=2, on_done=lambda h: done.set(),
    )  # fmt: skip
    slurm_lab.stop_sshd("cn02")
    try:
        handle = trig.run(["true"], destination="cn02", background=True)
        assert handle.wait(WAIT).exit_status is None
        assert "unreachable" in handle.error or "refused" in handle.error
        assert done.wait(5)
    finally:
        slurm_lab.start_sshd("cn02")
        trig.close()


def test_sbatch_trigger_returns_the_job(slurm_lab, slurm_session, tmp_path) -> None:
    home = slurm_lab.home
    script = home / f"trig-{tmp_path.name}.sh"
    log_file = home / f"trig-{tmp_path.name}.log"
    script.write_text('#!/bin/sh\necho "got [$1]"\nexit 6\n')
    script.chmod(0o755)
    trig = Trigger(metadata=slurm_session, ssh_config=slurm_lab.ssh_config)
    try:
        handle = trig.run([str(script), "a b"], job_name="trig test", log_file=str(log_file))
        assert handle.ok and handle.job_id and handle.job_id.isdigit()
        info = handle.job.wait(timeout=WAIT)
        assert (info.state, info.exit_code, info.name) == ("FAILED", 6, "trig test")
        assert log_file.read_text() == "got [a b]\n"
        bad = trig.run(["/nonexistent/job.sh"])
        assert bad.job_id is None and "Unable to open file" in bad.error
    finally:
        trig.close()
        script.unlink(missing_ok=True)
        log_file.unlink(missing_ok=True)


SILENT_LISTENER = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 22))
s.listen(8)
print("ready", flush=True)
held = []
while True:
    held.append(s.accept()[0])  # accepts, never says a word (no SSH banner)
"""


def test_a_node_that_hangs_on_connect_does_not_block_the_others(slurm_lab, tmp_path) -> None:
    import subprocess
    import sys

    md = slurm_lab.make_session(tmp_path, slurm_lab.nodes[:3])
    trig = Trigger(
        TriggerMethod.REMOTE_COMMAND, metadata=md, ssh_config=slurm_lab.ssh_config,
        connect_timeout=6,
    )  # fmt: skip
    slurm_lab.stop_sshd("cn02")
    listener = subprocess.Popen(
        ["ip", "netns", "exec", slurm_lab.netns("cn02"), sys.executable, "-c", SILENT_LISTENER],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    dead: list = []
    try:
        assert listener.stdout.readline().strip() == "ready"
        stuck = threading.Thread(
            target=lambda: dead.append(trig.run(["true"], destination="cn02")), daemon=True
        )
        stuck.start()
        time.sleep(0.5)  # cn02 is now waiting for a banner that never comes
        start = time.monotonic()
        handle = trig.run(["hostname"], destination="cn03")
        took = time.monotonic() - start
        assert handle.ok and handle.stdout == "cn03\n"
        # blocked behind cn02's connect it would take the rest of its 6 s timeout
        assert took < 5 and stuck.is_alive(), took
        start = time.monotonic()
        trig.close()
        assert time.monotonic() - start < 5
        stuck.join(WAIT)
        assert dead and dead[0].exit_status is None and dead[0].error
    finally:
        listener.kill()
        listener.wait()
        slurm_lab.start_sshd("cn02")
        trig.close()


# ------------------------------------------------ dead nodes, script exits (issue 8)
def test_a_backlog_for_a_dead_node_fails_fast_after_one_connect_timeout(lab, tmp_path) -> None:
    md = lab.make_session(tmp_path, lab.nodes[:2])
    trig = Trigger(
        TriggerMethod.REMOTE_COMMAND, metadata=md, ssh_config=lab.ssh_config,
        known_hosts=lab.known_hosts, connect_timeout=2, connect_backoff=3,
    )  # fmt: skip
    lab.node_exec("cn02", ["ip", "link", "set", "eth0", "down"])  # connects hang: no answer
    try:
        handles = [trig.run(["true"], destination="cn02", background=True) for _ in range(20)]
        for handle in handles:
            handle.wait(WAIT)  # one connect timeout each: 40 s
        waited = [h for h in handles if h.seconds >= 1.5]
        assert len(waited) == 1, [round(h.seconds, 2) for h in handles]
        assert all("connect timed out after 2 s" in h.error for h in handles)
        assert all("not tried again within 3 s" in h.error for h in handles if h not in waited)
        assert trig.run(["hostname"], destination="cn01").stdout == "cn01\n"  # others go on
    finally:
        lab.node_exec("cn02", ["ip", "link", "set", "eth0", "up"])
    time.sleep(3)  # the back-off is over: the node is tried again
    assert trig.run(["hostname"], destination="cn02").stdout == "cn02\n"
    trig.close()


TRIGGER_SCRIPT = """
import sys
import mento_fab.trigger as trigger

trigger.EXIT_DRAIN_TIMEOUT = 1.0
md, ssh_config, known_hosts, marker, how = sys.argv[1:]
trig = trigger.Trigger(
    trigger.TriggerMethod.REMOTE_COMMAND, metadata=md, ssh_config=ssh_config,
    known_hosts=known_hosts, workers=2,
)
trig.run(["sh", "-c", f"setsid sleep {marker}1 & sleep {marker}2"], destination="cn02",
         background=True)
if how == "exit":
    trig.run(["sleep", f"{marker}3"], background=True)
    print("started", flush=True)
    sys.stdin.readline()  # the script ends here, its triggers still running
else:
    print("started", flush=True)
    trig.run(["sleep", f"{marker}3"])  # interrupted by Ctrl-C
"""


@pytest.mark.parametrize("how", ["exit", "ctrl-c"])
def test_a_script_that_ends_leaves_no_trigger_running(lab, lab_session, tmp_path, how) -> None:
    import subprocess
    import sys

    marker = "87670"

    def sleeping() -> list[int]:
        return [
            pid
            for node in ("cn01", "cn02")
            for pid, cmd in lab.node_pids(node).items()
            if cmd.startswith(f"sleep {marker}")
        ]

    script = tmp_path / "acquire.py"
    script.write_text(TRIGGER_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(lab_session), str(lab.ssh_config),
         str(lab.known_hosts), marker, how],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "started\n"
        deadline = time.monotonic() + WAIT
        while len(sleeping()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(sleeping()) == 3
        if how == "exit":
            proc.stdin.close()
        else:
            proc.send_signal(signal.SIGINT)
        proc.wait(WAIT)
        deadline = time.monotonic() + 15
        while sleeping() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sleeping() == []
    finally:
        proc.kill()
        proc.wait()
        for pid in sleeping():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
