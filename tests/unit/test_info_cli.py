"""``mento-fab info``: the summary, ``--json``, where the file comes from, and bad input.

In process through ``mento_fab.cli.program`` for most cases, and through the installed
``mento-fab`` command for what only a real process shows (exit status, no traceback).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ClusterShell.NodeSet import NodeSet

from mento_fab.cli import program
from mento_fab.metadata import MetadataError, parse_metadata_file

ENV_VARS = ("MENTO_METADATA", "MENTO_ROOT_DIR", "MENTO_SSH_CONFIG")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No settings from the environment, the home directory or the working directory."""
    for name in list(os.environ):
        if name in ENV_VARS or name.startswith("MENTO_FAB"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``mento-fab ARGS`` in process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        program.run(["mento-fab", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", "from mento_fab.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


def _fields(out: str) -> dict[str, str]:
    """The summary's ``Key   value`` lines as a dict."""
    rows = {}
    for line in out.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def _assert_no_secret(text: str, secrets: tuple[str, ...]) -> None:
    for secret in secrets:
        assert secret not in text


# ---------------------------------------------------------------------------- the summary


def test_info_user_beamtime(beamtime, capsys, secrets):
    code, out, err = run_cli(capsys, "info", "--root-dir", str(beamtime.root))
    assert (code, err) == (0, "")
    rows = _fields(out)
    shared = beamtime.dir / "shared"
    assert rows["Beamline"] == "p11"
    assert rows["Beamtime"] == "11019999"
    assert rows["Session"] == "current"
    assert rows["Core path"] == "/asap3/petra3/gpfs/p11/2024/data/11019999"
    assert rows["Metadata"] == str(beamtime.metadata)
    assert rows["Nodes"].split()[0] == "max-p3a[001-004]"
    assert "(4)" in rows["Nodes"]
    assert rows["Partition"] == "ponline_p11"
    assert rows["Reservation"] == "11019999"
    assert rows["User"] == "bttest02"
    assert rows["SSH key"] == str(shared / "id_rsa")
    assert rows["Beamline FS"] == "/beamline/p11"
    assert rows["ASAPO"] == "asapo-services.example.org:8400"
    assert rows["Token rw"] == str(shared / "asapo-token.txt")
    assert rows["Token ro"] == str(shared / "asapo-token-clbt.txt")
    _assert_no_secret(out + err, secrets)


def test_info_commissioning(commissioning, capsys):
    code, out, _ = run_cli(capsys, "info", "--root-dir", str(commissioning.root))
    assert code == 0
    rows = _fields(out)
    assert rows["Beamline"] == "P04"
    assert rows["Beamtime"] == "c20210823_000_MAA"
    assert rows["Session"] == "commissioning"
    assert rows["Beamline FS"] == "/beamline/p04"
    assert rows["Nodes"].split()[0] == "max-p3a[010-011]"


def test_info_folds_a_scattered_node_list(beamtime, capsys):
    doc = copy.deepcopy(beamtime.doc)
    nodes = ["max-p3a004", "max-p3a001", "max-p3a003", "max-p3b010", "max-p3a001"]
    doc["onlineAnalysis"]["reservedNodes"] = nodes
    beamtime.rewrite(doc)
    code, out, _ = run_cli(capsys, "info", "--metadata", str(beamtime.metadata))
    assert code == 0
    folded = _fields(out)["Nodes"].split()[0]
    assert folded == str(NodeSet.fromlist(nodes))
    assert NodeSet(folded) == NodeSet.fromlist(nodes)
    assert "(4)" in _fields(out)["Nodes"]  # distinct nodes


def test_info_without_blocks(beamtime, capsys):
    doc = copy.deepcopy(beamtime.doc)
    doc["onlineAnalysis"] = None
    del doc["asapo"]
    beamtime.rewrite(doc)
    code, out, err = run_cli(capsys, "info", "--metadata", str(beamtime.metadata))
    assert (code, err) == (0, "")
    rows = _fields(out)
    assert "none reserved" in rows["Nodes"]
    assert "no stream" in rows["ASAPO"]
    assert "User" not in rows and "Token rw" not in rows


def test_info_json(beamtime, capsys, secrets):
    code, out, err = run_cli(capsys, "info", "--root-dir", str(beamtime.root), "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    shared = beamtime.dir / "shared"
    assert data["metadata_file"] == str(beamtime.metadata)
    assert data["beamline"] == "p11"
    assert data["beamtime"] == "11019999"
    assert data["tag"] == "current"
    assert data["corefs_path"] == "/asap3/petra3/gpfs/p11/2024/data/11019999"
    online = data["online"]
    assert online["nodes"] == ["max-p3a001", "max-p3a002", "max-p3a003", "max-p3a004"]
    assert online["nodeset"] == "max-p3a[001-004]"
    assert online["ssh"] == {"user": "bttest02", "key": str(shared / "id_rsa")}
    assert online["slurm"] == {"partition": "ponline_p11", "reservation": "11019999"}
    assert online["blfs_mountpoint"] == "/beamline/p11"
    assert data["asapo"] == {
        "endpoint": "asapo-services.example.org:8400",
        "token_ro": str(shared / "asapo-token-clbt.txt"),
        "token_rw": str(shared / "asapo-token.txt"),
    }
    _assert_no_secret(out, secrets)


def test_info_json_without_blocks(commissioning, capsys):
    doc = copy.deepcopy(commissioning.doc)
    del doc["onlineAnalysis"], doc["asapo"]
    commissioning.rewrite(doc)
    code, out, _ = run_cli(capsys, "info", "--metadata", str(commissioning.metadata), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["online"] is None and data["asapo"] is None
    assert data["tag"] == "commissioning"


def test_token_contents_never_shown_in_a_real_process(beamtime, secrets):
    for extra in ([], ["--json"]):
        result = run_process("info", "--metadata", str(beamtime.metadata), *extra)
        assert result.returncode == 0
        assert str(beamtime.token_rw) in result.stdout
        _assert_no_secret(result.stdout + result.stderr, secrets)


# ---------------------------------------------------------------------------- where from


@pytest.fixture
def two_sessions(beamtime, tmp_path, session_at):
    """(user beamtime session, an unrelated commissioning session under ``tmp_path/other``)."""
    return beamtime, session_at(tmp_path / "other", "commissioning")


def _beamtime_shown(capsys, *args: str) -> tuple[int, str]:
    code, out, err = run_cli(capsys, "info", *args)
    return code, _fields(out).get("Beamtime", err)


def test_metadata_option_wins_over_root_dir_option(two_sessions, capsys):
    user, other = two_sessions
    code, shown = _beamtime_shown(
        capsys, "--root-dir", str(other.root), "--metadata", str(user.metadata)
    )
    assert (code, shown) == (0, "11019999")


def test_metadata_option_wins_over_a_missing_root_dir(beamtime, tmp_path, capsys):
    code, shown = _beamtime_shown(
        capsys, "--root-dir", str(tmp_path / "nowhere"), "--metadata", str(beamtime.metadata)
    )
    assert (code, shown) == (0, "11019999")


def test_environment_metadata(two_sessions, capsys, monkeypatch):
    user, _ = two_sessions
    monkeypatch.setenv("MENTO_METADATA", str(user.metadata))
    assert _beamtime_shown(capsys) == (0, "11019999")


def test_environment_root_dir(two_sessions, capsys, monkeypatch):
    _, other = two_sessions
    monkeypatch.setenv("MENTO_ROOT_DIR", str(other.root))
    assert _beamtime_shown(capsys) == (0, "c20210823_000_MAA")


def test_environment_metadata_wins_over_environment_root_dir(two_sessions, capsys, monkeypatch):
    user, other = two_sessions
    monkeypatch.setenv("MENTO_ROOT_DIR", str(other.root))
    monkeypatch.setenv("MENTO_METADATA", str(user.metadata))
    assert _beamtime_shown(capsys) == (0, "11019999")


def test_options_win_over_environment(two_sessions, capsys, monkeypatch):
    user, other = two_sessions
    monkeypatch.setenv("MENTO_METADATA", str(other.metadata))
    assert _beamtime_shown(capsys, "--metadata", str(user.metadata)) == (0, "11019999")
    monkeypatch.delenv("MENTO_METADATA")
    monkeypatch.setenv("MENTO_ROOT_DIR", str(other.root))
    assert _beamtime_shown(capsys, "--root-dir", str(user.root)) == (0, "11019999")


def test_environment_in_a_real_process(two_sessions):
    user, other = two_sessions
    result = run_process(
        "info", env={"MENTO_ROOT_DIR": str(other.root), "MENTO_METADATA": str(user.metadata)}
    )
    assert result.returncode == 0
    assert _fields(result.stdout)["Beamtime"] == "11019999"


# ---------------------------------------------------------------------------- bad input


def _break(session, how: str, tmp_path: Path) -> list[str]:
    """Damage the session in one way; return the info arguments that must fail."""
    doc = copy.deepcopy(session.doc)
    by_file = ["--metadata", str(session.metadata)]
    if how == "invalid-json":
        session.rewrite(b'{"beamline": "p11",')
    elif how == "non-utf8":
        session.rewrite(b'{"beamline": "p\xff11"}')
    elif how == "array":
        session.rewrite([doc])
    elif how == "missing-key":
        del doc["onlineAnalysis"]["reservedNodes"]
        session.rewrite(doc)
    elif how == "hostile-node":
        doc["onlineAnalysis"]["reservedNodes"] = ["-oProxyCommand=x", "a;rm -rf /", "x\ny"]
        session.rewrite(doc)
    elif how == "hostile-user":
        doc["onlineAnalysis"]["userAccount"] = "$(id)\nroot"
        session.rewrite(doc)
    elif how == "missing-token":
        session.token_ro.unlink()
    elif how == "missing-metadata-file":
        return ["--metadata", str(tmp_path / "nope.json")]
    elif how == "missing-root":
        return ["--root-dir", str(tmp_path / "nowhere")]
    elif how == "no-session":
        return ["--root-dir", str(tmp_path / "home")]
    elif how == "several-files":
        (session.dir / "beamtime-metadata-2.json").write_text("{}")
        return ["--root-dir", str(session.root)]
    else:  # pragma: no cover
        raise AssertionError(how)
    return by_file


BAD = [
    "invalid-json",
    "non-utf8",
    "array",
    "missing-key",
    "hostile-node",
    "hostile-user",
    "missing-token",
    "missing-metadata-file",
    "missing-root",
    "no-session",
    "several-files",
]


@pytest.mark.parametrize("how", BAD)
@pytest.mark.parametrize("as_json", [False, True])
def test_bad_input_is_one_line_and_status_2(beamtime, tmp_path, capsys, secrets, how, as_json):
    args = _break(beamtime, how, tmp_path) + (["--json"] if as_json else [])
    code, out, err = run_cli(capsys, "info", *args)
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("mento-fab: ")
    assert "Traceback" not in err
    _assert_no_secret(err, secrets)


@pytest.mark.parametrize("how", ["invalid-json", "hostile-node", "missing-token", "missing-root"])
def test_bad_input_in_a_real_process(beamtime, tmp_path, secrets, how):
    result = run_process("info", *_break(beamtime, how, tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    _assert_no_secret(result.stderr, secrets)


def test_error_names_the_file_and_key(beamtime, tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", *_break(beamtime, "missing-key", tmp_path))
    assert code == 2
    assert str(beamtime.metadata) in err
    assert "onlineAnalysis.reservedNodes" in err


def test_missing_token_error_names_the_token_path(beamtime, tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", *_break(beamtime, "missing-token", tmp_path))
    assert code == 2
    assert str(beamtime.token_ro) in err


def test_an_explicit_root_dir_beats_mento_metadata_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Option > environment: ``--root-dir`` on the command line wins over ``$MENTO_METADATA``."""
    env_session = tmp_path / "env"
    opt_session = tmp_path / "opt"
    for where, beamtime in ((env_session, "11000001"), (opt_session, "11000002")):
        current = where / "current"
        current.mkdir(parents=True)
        (current / f"beamtime-metadata-{beamtime}.json").write_text(
            json.dumps({"beamline": "p11", "beamtimeId": beamtime, "corePath": "/asap3/x"})
        )
    env = {
        **os.environ,
        "MENTO_METADATA": str(next((env_session / "current").glob("*.json"))),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mento_fab", "info", "--json", "--root-dir", str(opt_session)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["beamtime"] == "11000002"
    plain = subprocess.run(
        [sys.executable, "-m", "mento_fab", "info", "--json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert json.loads(plain.stdout)["beamtime"] == "11000001"


@pytest.mark.parametrize(
    "argv",
    [
        ["run-on-nodes"],  # missing positional
        ["run-on-nodes", "--fanout"],  # flag without its value
        ["nosuchtask"],
        ["info", "--bogus"],
        ["info", "--metadata", "/etc/passwd/x"],  # a path through a file
    ],
)
def test_command_line_mistakes_are_bad_input(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mento_fab", *argv], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("mento-fab: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- hostile text


def test_a_control_character_in_a_value_is_bad_input(beamtime, capsys):
    """Issue 8: a forged line or a cleared screen in the metadata never reaches the terminal."""
    doc = copy.deepcopy(beamtime.doc)
    doc["corePath"] = "/asap3/x\x1b[2J\x1b[H"
    doc["asapo"]["endpoint"] = "host:8400\nReservation  forged"
    beamtime.rewrite(doc)
    code, out, err = run_cli(capsys, "info", "--root-dir", str(beamtime.root))
    assert (code, out) == (2, "")
    assert "corePath: Control character" in err and "asapo.endpoint: Control character" in err
    assert "\x1b" not in err and err.count("\n") == 1


@pytest.mark.parametrize("json_output", [False, True])
def test_info_shows_nothing_raw_from_free_text(beamtime, capsys, json_output):
    """A multi-line beamlineSetup or an escape in the title loads; info never shows it raw."""
    doc = copy.deepcopy(beamtime.doc)
    doc["title"] = "x\x1b[2J\x1b[H"
    doc["beamlineSetup"] = "line one\nline two\tTAB"
    beamtime.rewrite(doc)
    code, out, err = run_cli(
        capsys, "info", "--root-dir", str(beamtime.root), *(["--json"] if json_output else [])
    )
    assert code == 0, err
    assert "\x1b" not in out + err and "line two" not in out


def test_info_escapes_control_characters_in_the_file_path(session_at, tmp_path, capsys):
    session = session_at(tmp_path / "gpfs", name="beamtime-metadata-\x1b[2J.json")
    code, out, err = run_cli(capsys, "info", "--root-dir", str(session.root))
    assert (code, err) == (0, "")
    assert "\x1b" not in out
    assert _fields(out)["Metadata"].endswith("beamtime-metadata-\\x1b[2J.json")


def test_a_session_directory_with_a_control_character_is_bad_input(session_at, tmp_path):
    session = session_at(tmp_path / "gpfs\x1b[2J")
    with pytest.raises(MetadataError) as info:
        parse_metadata_file(session.metadata)
    assert "onlineAnalysis.sshPrivateKeyPath: Not a valid file path: the session" in str(info.value)


# ------------------------------------------------- unreadable metadata and session directories
def run_without_root_privileges(*args: str) -> subprocess.CompletedProcess:
    """``mento-fab ARGS`` as root without the capabilities that override file modes."""
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    else:
        prefix = []
    environment = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "mento_fab", *args],
        capture_output=True, text=True, env=environment, timeout=60,
    )  # fmt: skip


def test_an_unreadable_metadata_file_is_bad_input(beamtime):
    beamtime.metadata.chmod(0)
    try:
        proc = run_without_root_privileges("info", "--metadata", str(beamtime.metadata))
    finally:
        beamtime.metadata.chmod(0o644)
    assert proc.returncode == 2, proc.stderr
    assert f"{beamtime.metadata}: permission denied" in proc.stderr
    assert "internal error" not in proc.stderr


def test_an_unreadable_session_directory_is_not_not_found(beamtime):
    session = beamtime.metadata.parent
    session.chmod(0)
    try:
        proc = run_without_root_privileges("info", "--root-dir", str(session.parent))
    finally:
        session.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert f"{session}: permission denied" in proc.stderr
    assert "not found" not in proc.stderr and "internal error" not in proc.stderr


def test_unreadable_keeps_the_original_exception_type(tmp_path):
    from mento_fab.errors import BadInput, Unreadable

    assert issubclass(Unreadable, PermissionError) and issubclass(Unreadable, BadInput)


def test_a_fifo_as_metadata_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "metadata.json"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "mento_fab", "info", "--metadata", str(fifo)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"{fifo}: is not a regular file" in proc.stderr
