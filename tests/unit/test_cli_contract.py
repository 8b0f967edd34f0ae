"""The command line's contract in one place: the exit table, shared options, the session.

Pure logic (no lab): which exception gives which exit status and message, that a
task's shared options are declared once yet all appear in ``--help``, and the one
precedence for finding the metadata file.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Context, Exit

from mento_fab import errors
from mento_fab.cli import exits, namespace
from mento_fab.cli.options import NODES, Options, mento_task, number
from mento_fab.session import Session, metadata_file


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.MetadataError("/x.json", "bad"), 2),
        (errors.SelectionError("cn99 not reserved"), 2),
        (errors.ReservationError("reservation 1 not active"), 2),
        (errors.MissingFile("SSH key not found: /k"), 2),
        (FileNotFoundError("remote: no such file"), 1),
        (errors.NodeError("connection lost"), 255),
        (errors.HostKeyRefused("host key of cn01 CHANGED"), 255),
        (errors.NoSubmitNode("no reserved node answered"), 255),
        (errors.SlurmError("sbatch: error: invalid partition"), 1),
        (errors.DeployError("cannot switch"), 1),
        (PermissionError("remote: permission denied"), 1),
        (OSError(28, "No space left on device"), 1),
        (RuntimeError("a bug"), 1),
        (KeyboardInterrupt(), 130),
    ],
)
def test_one_table_maps_every_exception(exc: BaseException, status: int) -> None:
    assert exits.exit_status_of(exc) == status


def test_bad_input_is_a_value_error_and_carries_messages() -> None:
    exc = errors.MetadataError("/x.json", "beamtimeId: missing", {"beamtimeId": ["missing"]})
    assert isinstance(exc, ValueError) and isinstance(exc, errors.MentoError)
    assert exc.messages == {"beamtimeId": ["missing"]}
    assert isinstance(errors.MissingFile("k"), FileNotFoundError)
    assert isinstance(errors.SlurmError("x"), RuntimeError)


def _raising(exc: BaseException):
    @exits.friendly
    def task() -> None:
        raise exc

    return task


def test_a_bug_is_one_line_and_exit_1_with_the_traceback_only_under_debug(capsys) -> None:
    exits.set_debug(False)
    with pytest.raises(Exit) as caught:
        _raising(ZeroDivisionError("division by zero"))()
    assert caught.value.code == 1
    message = str(caught.value.message)
    assert message.count("\n") == 0 and "internal error: ZeroDivisionError" in message
    assert "--debug" in message and "Traceback" not in capsys.readouterr().err
    exits.set_debug(True)
    try:
        with pytest.raises(Exit):
            _raising(ZeroDivisionError("division by zero"))()
        assert "Traceback" in capsys.readouterr().err
    finally:
        exits.set_debug(False)


def test_our_errors_are_shown_as_they_are() -> None:
    with pytest.raises(Exit) as caught:
        _raising(errors.SelectionError("not reserved for this beamtime: cn99"))()
    assert caught.value.code == 2
    assert caught.value.message == "mento-fab: not reserved for this beamtime: cn99"


def test_mento_task_declares_shared_options_once_and_invoke_sees_them_all() -> None:
    seen: dict[str, object] = {}

    @mento_task(shared=NODES, help={"command": "what to run"})
    def sample(c: Context, opts: Options, command: str, stream: bool = False):
        """A sample task."""
        seen.update(command=command, stream=stream, nodes=opts.nodes, json=opts.json)

    params = list(inspect.signature(sample.body).parameters)
    assert params == ["c", "command", "stream", *NODES]
    helps = {arg.name: arg.help for arg in sample.get_arguments()}
    assert {"command", "stream", "nodes", "connect_timeout", "host_keys", "json"} <= set(helps)
    assert helps["fanout"].startswith("how many nodes at once")
    assert helps["command"] == "what to run"
    sample(Context(), "hostname", nodes="cn01", json=True)
    assert seen == {"command": "hostname", "stream": False, "nodes": "cn01", "json": True}


def test_every_task_has_help_for_every_option() -> None:
    ns = namespace()
    for name in ns.task_names:
        task = ns[name]
        for arg in task.get_arguments():
            assert arg.help, f"{name} --{arg.name} has no help"


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "abc", "1e400"])
def test_numbers_are_finite_and_positive(value: str) -> None:
    with pytest.raises(errors.BadInput):
        number("--connect-timeout", value)


def _session_tree(root: Path, name: str = "current", beamtime: str = "1") -> Path:
    (root / name).mkdir(parents=True)
    path = root / name / f"beamtime-metadata-{beamtime}.json"
    path.write_text(
        json.dumps({"beamline": "p11", "beamtimeId": beamtime, "corePath": "/asap3/p11/x"})
    )
    return path


def test_one_precedence_for_the_metadata_file(tmp_path: Path) -> None:
    a = _session_tree(tmp_path / "a", beamtime="1")
    b = _session_tree(tmp_path / "b", beamtime="2")
    env = {"MENTO_METADATA": str(a), "MENTO_ROOT_DIR": str(tmp_path / "b")}
    # option file > option root > env file > env root > config > default
    assert metadata_file(b, environ=env) == b
    assert metadata_file(None, tmp_path / "b", environ=env) == b
    assert metadata_file(environ=env) == a
    assert metadata_file(environ={"MENTO_ROOT_DIR": str(tmp_path / "b")}) == b
    assert metadata_file(environ={}, config={"metadata": str(a)}) == a
    assert metadata_file(environ={}, config={"root_dir": str(tmp_path / "b")}) == b
    with pytest.raises(FileNotFoundError):
        metadata_file(environ={"MENTO_ROOT_DIR": str(tmp_path / "nowhere")})


def test_session_knows_its_root_and_refuses_missing_online_block(tmp_path: Path) -> None:
    path = _session_tree(tmp_path)
    session = Session.load(path)
    assert session.root == tmp_path / "current" and session.file == path
    assert Session.load(session) is session
    with pytest.raises(errors.NoOnlineAnalysis, match="no onlineAnalysis block"):
        _ = session.online
    assert Session.load(session.metadata).root is None


def test_a_missing_session_is_bad_input_on_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mento_fab", "info", "--root-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_import_mento_fab_is_cheap() -> None:
    code = "import sys, mento_fab; print(sorted(m for m in ('paramiko', 'fabric', 'invoke', " \
        "'marshmallow', 'rich') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_messages_never_carry_terminal_escapes() -> None:
    with pytest.raises(Exit) as caught:
        _raising(errors.SeveralMetadataFiles("found a\x1b[2J\x1b]0;pwn\x07.json, b.json"))()
    assert caught.value.code == 2
    assert "\x1b" not in caught.value.message and "\\x1b[2J" in caught.value.message


def test_option_help_survives_building_the_arguments_twice() -> None:
    """invoke pops help entries as it builds arguments; a second parse must still have them."""
    ns = namespace()
    first = {a.name: a.help for a in ns["run-on-nodes"].get_arguments()}
    second = {a.name: a.help for a in ns["run-on-nodes"].get_arguments()}
    assert first == second and all(second.values())


def test_two_parses_at_once_keep_every_help() -> None:
    """The agent parses calls in threads with one set of task objects."""
    import threading

    ns = namespace()
    task = ns["run-on-nodes"]
    errors: list[BaseException] = []

    def parse() -> None:
        try:
            for _ in range(150):
                task.get_arguments()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=parse) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert all(arg.help for arg in task.get_arguments())
