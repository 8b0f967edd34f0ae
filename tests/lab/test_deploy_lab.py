"""``mento_fab.deployment`` on the lab's real nodes: all or none, whatever fails where."""

from __future__ import annotations

import json
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deploy_helpers import (
    HOSTILE,
    NODES,
    break_current,
    current_of,
    make_project,
    on_node,
    quote,
    release_dirs,
    run_deploy,
)

from mento_fab.deployment import (
    UnsafeSourceError,
    build_release,
    deploy,
    phases,
    releases,
    rollback,
)
from mento_fab.metadata import parse_metadata_file
from mento_fab.nodes import nodes_group


def test_deploy_node_local_redeploy_one_file_and_noop(lab, session, project, local_target):
    md = session[0]
    first = run_deploy(session, project, local_target)
    assert first.outcome == "switched" and first.exit_status == 0, first.run.results
    assert first.shared == []  # /srv/local is a different disk on every node
    name = first.release
    for node in NODES:
        assert current_of(lab, node, local_target) == f"releases/{name}"
        cur = f"{local_target}/current"
        assert on_node(lab, node, f"cat {cur}/analysis.py") == "VERSION = 1\n"
        modes = on_node(
            lab, node, f"stat -c '%a %n' {cur}/run.sh {cur}/private.cfg {cur}/pkg "
            f"{cur}/.mento/beamtime.env {cur}/.mento/beamtime.json"
        ).split("\n")  # fmt: skip
        assert [m.split()[0] for m in modes if m] == ["755", "600", "750", "600", "600"]
        assert on_node(lab, node, f"readlink {cur}/alias.py").strip() == "analysis.py"
        assert on_node(lab, node, f"cat {cur}/{quote(HOSTILE)}") == "hostile\n"
        owner = on_node(lab, node, f"stat -c %U {cur}/analysis.py").strip()
        assert owner == lab.user
    assert not any(Path(p).exists() for p in ("pwned", str(lab.home / "pwned")))

    # beamtime files: token *paths* as the nodes see them, never the tokens
    env = on_node(lab, "cn01", f"cat {local_target}/current/.mento/beamtime.env")
    meta = json.loads(on_node(lab, "cn01", f"cat {local_target}/current/.mento/beamtime.json"))
    assert meta["beamtime"] == md.beamtime and meta["reservation"] == md.online.slurm.reservation
    assert meta["asapo_token_rw_file"] == "/beamline/p11/shared/asapo-token.txt"
    token = Path(md.asapo.token_rw).read_text().strip()
    assert token not in env and token not in json.dumps(meta)
    assert "MENTO_ASAPO_TOKEN_RO_FILE=/beamline/p11/shared/asapo-token-clbt.txt" in env

    # one changed file: only it travels, the rest is hard-linked, the old release intact
    (project / "analysis.py").write_text("VERSION = 2\n")
    second = run_deploy(session, project, local_target)
    assert second.outcome == "switched", second.run.results
    files = len(build_release(project).files)
    for node in NODES:
        assert second.details[node].sent_files == 1
        assert second.details[node].reused == files - 1
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 2\n"
        old = f"{local_target}/releases/{name}"
        assert on_node(lab, node, f"cat {old}/analysis.py") == "VERSION = 1\n"
        inodes = on_node(
            lab, node, f"stat -c %i {old}/pkg/lib.py {local_target}/current/pkg/lib.py"
        )
        assert len(set(inodes.split())) == 1  # shared, never modified in place
        assert on_node(lab, node, f"stat -c %a {local_target}/current/run.sh").strip() == "755"
    assert second.details["cn01"].bytes < first.details["cn01"].bytes / 2

    # no change: a no-op, one command per node, nothing new on the nodes
    third = run_deploy(session, project, local_target)
    assert third.outcome == "unchanged" and third.exit_status == 0
    assert all("unchanged" in r.message for r in third.run.results)
    assert all(len(release_dirs(lab, n, local_target)) == 2 for n in NODES)


def test_shared_target_is_detected_and_staged_once(lab, session, project, shared_target):
    report = run_deploy(session, project, shared_target)
    assert report.outcome == "switched", report.run.results
    assert report.shared == [NODES]
    staged = [n for n, d in report.details.items() if d.shared_with is None]
    assert staged == ["cn01"]
    home = lab.home / shared_target[2:]
    names = [p.name for p in (home / "releases").iterdir()]
    assert names == [report.release]  # one release, no nonce or staging leftovers
    assert os.readlink(home / "current") == f"releases/{report.release}"
    for node in NODES:
        assert on_node(lab, node, f"cat {home}/current/analysis.py") == "VERSION = 1\n"


def test_failed_node_means_no_switch_and_rerun_succeeds(lab, session, project, local_target):
    first = run_deploy(session, project, local_target)
    assert first.ok
    (project / "analysis.py").write_text("VERSION = 2\n")
    md, _, path = session
    lab.stop_sshd("cn03")
    try:
        grp = nodes_group(md, ssh_config=lab.ssh_config, connect_timeout=3)
        report = deploy(grp, path, project, local_target)
        grp.close()
    finally:
        lab.start_sshd("cn03")
    assert report.outcome == "aborted" and report.exit_status == 255
    assert report.run["cn03"].error and "cn03" in report.run["cn01"].message
    for node in NODES:
        assert current_of(lab, node, local_target) == f"releases/{first.release}"
        assert release_dirs(lab, node, local_target) == [first.release]
    rerun = run_deploy(session, project, local_target)
    assert rerun.outcome == "switched" and rerun.exit_status == 0
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{rerun.release}"}


def test_node_dying_during_staging_switches_nothing(lab, session, project, local_target):
    first = run_deploy(session, project, local_target)
    assert first.ok
    (project / "analysis.py").write_text("VERSION = 3\n")

    def kill_cn02(node: str, event: str) -> None:
        if node == "cn02" and event == "staging":
            lab.stop_sshd("cn02")
            for pid, cmd in lab.node_pids("cn02").items():
                if "sshd" in cmd:
                    os.kill(pid, signal.SIGKILL)

    try:
        report = run_deploy(session, project, local_target, on_event=kill_cn02)
    finally:
        lab.start_sshd("cn02")
    assert report.outcome == "aborted" and report.exit_status == 255, report.run.results
    assert report.run["cn02"].error
    assert report.details["cn01"].state == "aborted"
    for node in NODES:
        assert current_of(lab, node, local_target) == f"releases/{first.release}"
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 1\n"
    for node in ("cn01", "cn03", "cn04"):  # the staged copies were removed
        assert release_dirs(lab, node, local_target) == [first.release]
    # the dead node's half-staged leftovers are cleaned by the next deploy
    md, _, path = session
    grp = nodes_group(md, ssh_config=lab.ssh_config)
    try:
        rerun = deploy(grp, path, project, local_target)
    finally:
        grp.close()
    assert rerun.outcome == "switched", rerun.run.results
    for node in NODES:
        assert sorted(release_dirs(lab, node, local_target)) == [first.release, rerun.release]


def test_rollback_and_releases(lab, session, project, local_target):
    md, grp, _ = session
    first = run_deploy(session, project, local_target)
    (project / "analysis.py").write_text("VERSION = 2\n")
    second = run_deploy(session, project, local_target)
    assert first.ok and second.ok
    _, found = releases(grp, md, local_target)
    assert all(f.current == second.release for f in found.values())
    assert all(f.releases == [first.release, second.release] for f in found.values())
    back = rollback(grp, md, local_target)
    assert back.outcome == "switched" and back.release == first.release
    for node in NODES:
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 1\n"
    again = rollback(grp, md, local_target)  # nothing before the first: no node moves
    assert again.outcome == "aborted" and again.exit_status == 1
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{first.release}"}
    forward = rollback(grp, md, local_target, to=second.release)
    assert forward.ok
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{second.release}"}


def test_keep_prunes_old_releases(lab, session, project, local_target):
    names = []
    for version in range(4):
        (project / "analysis.py").write_text(f"VERSION = {version}\n")
        report = run_deploy(session, project, local_target, keep=1)
        assert report.ok
        names.append(report.release)
    for node in NODES:
        assert sorted(release_dirs(lab, node, local_target)) == names[-2:]


def test_dry_run_changes_nothing(lab, session, project, local_target):
    report = run_deploy(session, project, local_target, dry_run=True)
    assert report.outcome == "dry-run" and report.ok
    assert all("would send" in r.message for r in report.run.results)
    assert report.details["cn01"].bytes > 0
    for node in NODES:
        assert on_node(lab, node, f"test -e {local_target} && echo yes").strip() == ""


def test_install_builds_a_venv_before_the_switch(lab, session, tmp_path, local_target):
    src = tmp_path / "tiny"
    (src / "tinypkg").mkdir(parents=True)
    (src / "tinypkg" / "__init__.py").write_text("ANSWER = 42\n")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tinypkg"\nversion = "0.1"\n'
    )
    offline = ["--no-index", "--no-build-isolation"]
    report = run_deploy(
        session, src, local_target, install=True, pip_args=offline, system_site_packages=True
    )
    assert report.outcome == "switched", report.run.results
    for node in NODES[:2]:
        out = on_node(
            lab, node,
            f"cd / && {local_target}/current/.venv/bin/python -c "
            "'import tinypkg, sys; print(tinypkg.ANSWER, tinypkg.__file__)'",
        )  # fmt: skip
        assert out.startswith("42 ") and "site-packages" in out
    # a failed install (a requirement that cannot be found offline) switches nothing
    (src / "requirements.txt").write_text("surely-not-a-package-mento==9.9\n")
    bad = run_deploy(
        session, src, local_target, install=True, pip_args=offline, system_site_packages=True
    )
    assert bad.outcome == "aborted" and bad.exit_status == 1
    assert "staging failed" in bad.run["cn01"].message
    for node in NODES:
        assert current_of(lab, node, local_target) == f"releases/{report.release}"
        assert release_dirs(lab, node, local_target) == [report.release]


def test_prune_failure_is_a_warning_and_every_node_stays_switched(
    lab, session, project, local_target
):
    names = []
    for version in range(2):
        (project / "analysis.py").write_text(f"VERSION = {version}\n")
        names.append(run_deploy(session, project, local_target).release)
    # the oldest release on cn01 cannot be removed: only its prune fails
    on_node(lab, "cn01", f"chmod 555 {local_target}/releases/{names[0]}/pkg")
    (project / "analysis.py").write_text("VERSION = 2\n")
    report = run_deploy(session, project, local_target, keep=1)
    assert report.outcome == "switched" and report.exit_status == 0, report.run.results
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{report.release}"}
    assert "pruning old releases failed" in report.details["cn01"].warning
    assert "pruning" in report.run["cn01"].message
    assert names[0] in release_dirs(lab, "cn01", local_target)
    for node in NODES[1:]:
        assert report.details[node].warning is None
        assert sorted(release_dirs(lab, node, local_target)) == [names[1], report.release]


def test_failed_switch_reverts_before_anything_is_pruned(lab, session, project, local_target):
    first = run_deploy(session, project, local_target)
    assert first.ok
    break_current(lab, "cn04", local_target)
    (project / "analysis.py").write_text("VERSION = 2\n")
    report = run_deploy(session, project, local_target, keep=0)
    assert report.outcome == "aborted" and report.exit_status != 0
    assert report.details["cn04"].state == "failed"
    assert "switching current failed" in report.run["cn04"].message
    for node in NODES[:3]:
        assert report.details[node].state == "reverted", report.run.results
        assert current_of(lab, node, local_target) == f"releases/{first.release}"
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 1\n"


def test_node_that_cannot_switch_back_is_reported_failed(lab, session, project, local_target):
    first = run_deploy(session, project, local_target)
    assert first.ok
    break_current(lab, "cn04", local_target)
    (project / "analysis.py").write_text("VERSION = 2\n")

    def lose_old_release(node: str, event: str) -> None:
        if node == "cn02" and event == "switched":
            on_node(lab, "cn02", f"rm -rf {local_target}/releases/{first.release}")

    report = run_deploy(session, project, local_target, on_event=lose_old_release)
    assert report.outcome == "aborted"
    assert report.details["cn02"].state == "failed"
    assert not report.run["cn02"].ok and "switching back failed" in report.run["cn02"].message
    assert current_of(lab, "cn02", local_target) == f"releases/{report.release}"
    for node in ("cn01", "cn03"):
        assert report.details[node].state == "reverted"
        assert current_of(lab, node, local_target) == f"releases/{first.release}"


def test_failed_switch_on_a_shared_target_fails_every_member(lab, session, project, shared_target):
    first = run_deploy(session, project, shared_target)
    assert first.ok and first.shared == [NODES]
    home = lab.home / shared_target[2:]
    (home / "current").unlink()
    (home / "current").mkdir()
    (home / "current" / "f").write_text("x\n")
    (project / "analysis.py").write_text("VERSION = 2\n")
    report = run_deploy(session, project, shared_target)
    assert report.outcome == "aborted" and report.exit_status != 0
    assert {n: d.state for n, d in report.details.items()} == dict.fromkeys(NODES, "failed")
    assert all(not r.ok for r in report.run.results)


def test_stuck_remote_command_times_out_instead_of_hanging(
    lab, session, project, local_target, monkeypatch
):
    first = run_deploy(session, project, local_target)
    assert first.ok
    # the probe's `cat` of the content hash blocks forever on a FIFO without writer
    fifo = f"{local_target}/current/.mento/content-hash"
    on_node(lab, "cn02", f"rm {fifo} && mkfifo -m 666 {fifo}")
    (project / "analysis.py").write_text("VERSION = 2\n")
    monkeypatch.setattr(phases, "COMMAND_TIMEOUT", 2.0)
    pool = ThreadPoolExecutor(1)
    try:
        report = pool.submit(run_deploy, session, project, local_target).result(timeout=60)
    finally:
        pool.shutdown(wait=False)
    assert report.outcome == "aborted" and report.exit_status == 255
    assert "timed out" in (report.run["cn02"].error or "")
    for node in NODES:
        assert current_of(lab, node, local_target) == f"releases/{first.release}"


def test_secrets_in_the_source_are_refused(lab_session: Path, tmp_path: Path) -> None:
    md = parse_metadata_file(lab_session)
    session_dir = lab_session.parent  # the session directory holds shared/id_rsa + tokens
    key = Path(md.online.ssh.key).read_text()
    with pytest.raises(UnsafeSourceError) as caught:
        deploy([], md, session_dir, "~/x")
    message = str(caught.value)
    assert "refusing to ship" in message and "shared/" in message and "\n" not in message
    assert key.strip().splitlines()[1] not in message
    # a copy of the key (or a token) elsewhere in the tree: refused by content
    for secret, what in ((md.online.ssh.key, "SSH private key"), (md.asapo.token_rw, "ASAPO")):
        src = make_project(tmp_path / f"p-{what[:4]}")
        (src / "notes").mkdir()
        shutil.copyfile(secret, src / "notes" / "backup.txt")
        with pytest.raises(UnsafeSourceError, match=f"backup.txt: same content as .*{what}"):
            deploy([], md, src, "~/x")


def test_a_failed_upload_is_the_nodes_failure_not_bad_input(lab, session, project, local_target):
    """An SFTP error (an OSError in paramiko) ends as that node's failure: status 255."""
    _, grp, path = session
    first = run_deploy(session, project, local_target)
    assert first.ok
    (project / "analysis.py").write_text("VERSION = 2\n")
    release = build_release(project)

    def block_upload(node: str, event: str) -> None:
        # the archive's upload path is a directory on cn02: SFTP refuses to open it
        if node == "cn02" and event == "staging":
            on_node(lab, "cn02", f"mkdir {local_target}/releases/.{quote(release.name)}.tar")

    report = deploy(grp, path, project, local_target, release=release, on_event=block_upload)
    assert report.outcome == "aborted" and report.exit_status == 255, report.run.results
    cn02 = report.run["cn02"]
    assert cn02.exit is None and "upload of" in (cn02.error or "") and ".tar" in cn02.error
    assert report.details["cn02"].state == "failed"
    for node in ("cn01", "cn03", "cn04"):
        assert report.run[node].stdout == "" and "cn02" in report.run[node].message
        assert current_of(lab, node, local_target) == f"releases/{first.release}"
