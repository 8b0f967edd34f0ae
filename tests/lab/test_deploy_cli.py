"""``mento-fab deploy``/``rollback``/``releases`` as a user runs them (JSON, exit status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deploy_helpers import NODES


def test_cli_deploy_json_and_exit_status(lab, lab_session, project, local_target):
    env = {**os.environ, "MENTO_SSH_CONFIG": str(lab.ssh_config)}
    env.pop("MENTO_METADATA", None)
    argv = [
        sys.executable, "-m", "mento_fab.cli", "deploy", "--metadata", str(lab_session),
        "--source", str(project), "--target", local_target, "--json",
    ]  # fmt: skip
    cli = [sys.executable, "-c", "from mento_fab.cli import main; main()", *argv[3:]]
    proc = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["outcome"] == "switched" and doc["summary"]["exit_status"] == 0
    assert [n["node"] for n in doc["nodes"]] == NODES
    assert set(doc["nodes"][0]) == {
        "node", "exit", "stdout", "stderr", "error", "message", "seconds"
    }  # fmt: skip
    assert doc["release"].endswith(doc["content_hash"][:16])
    # the tool's words are in "message", never in the command output fields
    assert all(n["stdout"] == "" and n["message"].startswith("switched to") for n in doc["nodes"])
    assert {d["state"] for d in doc["details"].values()} == {"switched"}
    again = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(again.stdout)["outcome"] == "unchanged" and again.returncode == 0
    (project / "analysis.py").write_text("VERSION = 9\n")
    lab.stop_sshd("cn04")
    try:
        failed = subprocess.run(
            [*cli, "--connect-timeout", "3"], capture_output=True, text=True, env=env, timeout=120
        )
    finally:
        lab.start_sshd("cn04")
    assert failed.returncode == 255
    doc = json.loads(failed.stdout)
    assert doc["outcome"] == "aborted"
    cn04 = next(n for n in doc["nodes"] if n["node"] == "cn04")
    assert cn04["exit"] is None and cn04["error"]
    # the others were held back, not "ok": the summary must not contradict the outcome
    assert {k: doc["summary"].get(k) for k in ("ok", "failed", "unreachable", "held_back")} == {
        "ok": 0, "failed": 0, "unreachable": 1, "held_back": 3
    }, doc["summary"]  # fmt: skip
    assert all(n["message"].startswith("not switched: cn04") for n in doc["nodes"][:3])
    bad = subprocess.run(
        [*cli[:3], "deploy", "--metadata", str(lab_session), "--source", "/nonexistent"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "source is not a directory" in bad.stderr


def test_cli_refuses_secrets_and_bad_fanout_in_one_line(lab, lab_session: Path) -> None:
    env = {**os.environ, "MENTO_SSH_CONFIG": str(lab.ssh_config)}
    env.pop("MENTO_METADATA", None)
    cli = [sys.executable, "-c", "from mento_fab.cli import main; main()"]
    base = [*cli, "deploy", "--metadata", str(lab_session), "--target", "~/never"]
    proc = subprocess.run(
        [*base, "--source", str(lab_session.parent)], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "refusing to ship" in proc.stderr and "PRIVATE KEY" not in proc.stderr
    for task in ("deploy", "rollback", "releases"):
        for bad in ("abc", "0"):
            argv = [*cli, task, "--metadata", str(lab_session), "--fanout", bad]
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
            assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
            assert "--fanout" in proc.stderr


def test_positional_source_says_how_to_write_it(tmp_path: Path) -> None:
    cli = [sys.executable, "-c", "from mento_fab.cli import main; main()"]
    proc = subprocess.run([*cli, "deploy", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "mento-fab: deploy takes the source as --source DIR (default: the current directory)"
    ]
