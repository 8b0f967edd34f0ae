"""``mento_fab.deploy`` and ``mento-fab deploy``: on the lab's real nodes, plus pure units.

Node-local targets live on each node's private ``/srv/local`` tmpfs; shared targets
in the lab user's home, which every node sees (like a cluster home).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mento_fab.deploy as dp
from mento_fab.errors import BadInput
from mento_fab.metadata import parse_metadata_file
from mento_fab.nodes import nodes_group

HOSTILE = "-rf $(touch pwned) 'it''s' \"q\"; `x`.py"
NODES = ["cn01", "cn02", "cn03", "cn04"]


# ----------------------------------------------------------------------- helpers


def on_node(lab, node: str, command: str) -> str:
    """Run a shell command as root inside a node (sees its own /srv/local)."""
    proc = lab.node_exec(node, ["sh", "-c", command])
    return proc.stdout


def make_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "analysis.py").write_text("VERSION = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "private.cfg").write_text("x=1\n")
    (root / "private.cfg").chmod(0o600)
    (root / "pkg").mkdir(exist_ok=True)
    (root / "pkg" / "lib.py").write_text("def f():\n    return 2\n")
    (root / "pkg").chmod(0o750)
    (root / HOSTILE).write_text("hostile\n")
    (root / "data").mkdir(exist_ok=True)
    for i in range(20):
        (root / "data" / f"f{i:02d}.txt").write_text(f"{i}\n" * 3000)
    os.symlink("analysis.py", root / "alias.py")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture
def session(lab, lab_session: Path):
    md = parse_metadata_file(lab_session)
    grp = nodes_group(md, ssh_config=lab.ssh_config)
    try:
        yield md, grp, lab_session
    finally:
        grp.close()


@pytest.fixture
def local_target(lab) -> Iterator[str]:
    target = f"/srv/local/deploy-{uuid.uuid4().hex[:8]}"
    yield target
    for node in NODES:
        lab.node_exec(node, ["rm", "-rf", "--", target])


@pytest.fixture
def shared_target(lab) -> Iterator[str]:
    name = f"deploy-{uuid.uuid4().hex[:8]}"
    yield f"~/{name}"
    shutil.rmtree(lab.home / name, ignore_errors=True)


def run_deploy(session, source: Path, target: str, **kw):
    md, grp, path = session
    return dp.deploy(grp, md, source, target, session_root=Path(path).parent, **kw)


def current_of(lab, node: str, target: str) -> str:
    return on_node(lab, node, f"readlink {target}/current").strip()


def release_dirs(lab, node: str, target: str) -> list[str]:
    return on_node(lab, node, f"ls -A {target}/releases").split()


# ------------------------------------------------------------------ pure units


def test_content_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    src = make_project(tmp_path / "p")
    first = dp.build_release(src)
    os.utime(src / "analysis.py", (1, 1))  # mtime is not content
    assert dp.build_release(src).content_hash == first.content_hash
    (src / "analysis.py").chmod(0o700)  # a mode is
    moded = dp.build_release(src)
    assert moded.content_hash != first.content_hash
    (src / "analysis.py").chmod(0o644)
    (src / "analysis.py").write_text("VERSION = 2\n")
    assert dp.build_release(src).content_hash not in (first.content_hash, moded.content_hash)


def test_symlink_outside_the_tree_is_refused(tmp_path: Path) -> None:
    src = make_project(tmp_path / "p")
    os.symlink("/etc/passwd", src / "passwd")
    with pytest.raises(dp.UnsafeSourceError, match="outside the source tree"):
        dp.build_release(src)
    (src / "passwd").unlink()
    os.symlink("../../outside", src / "pkg" / "up")
    with pytest.raises(dp.UnsafeSourceError):
        dp.build_release(src)


def test_excludes_mentoignore_git_pycache_and_venvs(tmp_path: Path) -> None:
    src = make_project(tmp_path / "p")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref\n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "a.pyc").write_bytes(b"\0")
    (src / "myenv").mkdir()
    (src / "myenv" / "pyvenv.cfg").write_text("home = /usr\n")
    (src / "build").mkdir()
    (src / "build" / "out.bin").write_bytes(b"\1")
    (src / "run.log").write_text("log\n")
    (src / "keep.log").write_text("keep\n")
    (src / "secret.txt").write_text("s\n")
    (src / ".mentoignore").write_text("*.log\n!keep.log\nbuild/\n")
    paths = {e.path for e in dp.build_release(src, ["secret*"]).entries}
    assert "analysis.py" in paths and "keep.log" in paths and ".mentoignore" in paths
    for gone in (".git", "__pycache__", "myenv", "build", "run.log", "secret.txt"):
        assert not any(p == gone or p.startswith(gone + "/") for p in paths), gone


def test_token_paths_are_translated_to_the_beamline_mount() -> None:
    assert (
        dp.node_path("/gpfs/current/shared/t.txt", "/gpfs/current", "/beamline/p11")
        == "/beamline/p11/shared/t.txt"
    )
    # outside the session root (e.g. core filesystem): unchanged
    assert dp.node_path("/asap3/x/t.txt", "/gpfs/current", "/beamline/p11") == "/asap3/x/t.txt"
    assert dp.node_path("/gpfs/current/t", None, "/beamline/p11") == "/gpfs/current/t"


def test_bad_targets_are_refused() -> None:
    for bad in ("", "~", "/", "~other/x"):
        with pytest.raises(BadInput):
            dp._remote_dir(bad)
    assert dp._remote_dir("~/mento_fab/1") == "mento_fab/1"


# --------------------------------------------------------------------- the lab


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
        assert on_node(lab, node, f"cat {cur}/{_q(HOSTILE)}") == "hostile\n"
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
    files = len(dp.build_release(project).files)
    for node in NODES:
        assert second.details[node]["sent_files"] == 1
        assert second.details[node]["reused"] == files - 1
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 2\n"
        old = f"{local_target}/releases/{name}"
        assert on_node(lab, node, f"cat {old}/analysis.py") == "VERSION = 1\n"
        inodes = on_node(
            lab, node, f"stat -c %i {old}/pkg/lib.py {local_target}/current/pkg/lib.py"
        )
        assert len(set(inodes.split())) == 1  # shared, never modified in place
        assert on_node(lab, node, f"stat -c %a {local_target}/current/run.sh").strip() == "755"
    assert second.details["cn01"]["bytes"] < first.details["cn01"]["bytes"] / 2

    # no change: a no-op, one command per node, nothing new on the nodes
    third = run_deploy(session, project, local_target)
    assert third.outcome == "unchanged" and third.exit_status == 0
    assert all("unchanged" in r.stdout for r in third.run.results)
    assert all(len(release_dirs(lab, n, local_target)) == 2 for n in NODES)


def _q(name: str) -> str:
    import shlex

    return shlex.quote(name)


def test_shared_target_is_detected_and_staged_once(lab, session, project, shared_target):
    report = run_deploy(session, project, shared_target)
    assert report.outcome == "switched", report.run.results
    assert report.shared == [NODES]
    staged = [n for n, d in report.details.items() if "shared_with" not in d]
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
        report = dp.deploy(grp, md, project, local_target, session_root=Path(path).parent)
        grp.close()
    finally:
        lab.start_sshd("cn03")
    assert report.outcome == "aborted" and report.exit_status == 255
    assert report.run["cn03"].error and "cn03" in report.run["cn01"].stdout
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
    assert report.details["cn01"]["state"] == "aborted"
    for node in NODES:
        assert current_of(lab, node, local_target) == f"releases/{first.release}"
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 1\n"
    for node in ("cn01", "cn03", "cn04"):  # the staged copies were removed
        assert release_dirs(lab, node, local_target) == [first.release]
    # the dead node's half-staged leftovers are cleaned by the next deploy
    md, _, path = session
    grp = nodes_group(md, ssh_config=lab.ssh_config)
    try:
        rerun = dp.deploy(grp, md, project, local_target, session_root=Path(path).parent)
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
    _, found = dp.releases(grp, md, local_target)
    assert all(f.current == second.release for f in found.values())
    assert all(f.releases == [first.release, second.release] for f in found.values())
    back = dp.rollback(grp, md, local_target)
    assert back.outcome == "switched" and back.release == first.release
    for node in NODES:
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 1\n"
    again = dp.rollback(grp, md, local_target)  # nothing before the first: no node moves
    assert again.outcome == "aborted" and again.exit_status == 1
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{first.release}"}
    forward = dp.rollback(grp, md, local_target, to=second.release)
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
    assert all("would send" in r.stdout for r in report.run.results)
    assert report.details["cn01"]["bytes"] > 0
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
    assert "staging failed" in bad.run["cn01"].stderr
    for node in NODES:
        assert current_of(lab, node, local_target) == f"releases/{report.release}"
        assert release_dirs(lab, node, local_target) == [report.release]


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
    bad = subprocess.run(
        [*cli[:3], "deploy", "--metadata", str(lab_session), "--source", "/nonexistent"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "source is not a directory" in bad.stderr


# ------------------------------------------------------- review fixes (switch, secrets)


def _sh(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("evil", [HOSTILE, "r'; touch pwned; echo '"])
def test_generated_commands_quote_hostile_names(tmp_path: Path, evil: str) -> None:
    """Every command run locally (POSIX sh) with a hostile target and release name."""
    work = tmp_path / "work"
    target = f"-x {evil}"  # relative and starting with "-": must not read as an option
    (work / target / "releases").mkdir(parents=True)
    built = dp.build_release(make_project(tmp_path / "p"))
    release = dp.Release(
        built.source, built.entries, built.content_hash, f"20250101T000000Z-{evil}"
    )
    name = release.name
    data, _ = release.archive(None)
    (work / target / "releases" / f".{name}.tar").write_bytes(data)
    stage = dp._stage_command(target, release, hashlib.sha256(data).hexdigest(), None, False, [])
    assert subprocess.run(["sh", "-n", "-c", stage]).returncode == 0
    proc = _sh(stage, work)
    assert proc.returncode == 0, proc.stderr
    staged = work / target / "releases" / name
    assert (staged / ".mento" / "ready").exists() and (staged / "analysis.py").is_file()

    # a delta on top of it: a hard-linked copy of the base minus the .drop list
    (tmp_path / "p" / "analysis.py").write_text("VERSION = 2\n")
    (tmp_path / "p" / "data" / "f03.txt").unlink()
    (tmp_path / "p" / "run.sh").chmod(0o700)  # same content, new mode
    built2 = dp.build_release(tmp_path / "p")
    second = dp.Release(built2.source, built2.entries, built2.content_hash, f"20250102T0Z-{evil}")
    base_entries = json.loads(release.manifest())["entries"]
    data2, _ = second.archive(base_entries)
    releases_dir = work / target / "releases"
    (releases_dir / f".{second.name}.tar").write_bytes(data2)
    drop = second.dropped(base_entries)
    assert sorted(drop) == sorted(["analysis.py", "data/f03.txt", "run.sh", "alias.py"])
    (releases_dir / f".{second.name}.drop").write_bytes(b"\0".join(p.encode() for p in drop))
    stage2 = dp._stage_command(
        target, second, hashlib.sha256(data2).hexdigest(), name, False, ["--x", evil]
    )
    proc = _sh(stage2, work)
    assert proc.returncode == 0, proc.stderr
    new = releases_dir / second.name
    assert (new / "analysis.py").read_text() == "VERSION = 2\n"
    assert (staged / "analysis.py").read_text() == "VERSION = 1\n"  # base untouched
    assert (new / "pkg" / "lib.py").stat().st_nlink == 2
    assert not (new / "data" / "f03.txt").exists() and (staged / "data" / "f03.txt").exists()
    assert (new / "run.sh").stat().st_mode & 0o777 == 0o700
    assert (staged / "run.sh").stat().st_mode & 0o777 == 0o755
    assert os.readlink(new / "alias.py") == "analysis.py"
    manifest = json.loads((new / ".mento" / "manifest.json").read_text())
    assert manifest["hash"] == second.content_hash
    assert not (new / ".mento" / "ready").stat().st_nlink > 1  # written anew, not linked

    proc = _sh(dp._switch_command(target, f"releases/{second.name}", ".current-t"), work)
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(work / target / "current") == f"releases/{second.name}"
    # a revert's release comes from the node's readlink: a hostile one is only a message
    missing = dp._switch_command(target, f"releases/{evil}", ".current-u")
    assert subprocess.run(["sh", "-n", "-c", missing]).returncode == 0
    proc = _sh(missing, work)
    assert proc.returncode == 3 and proc.stderr == f"release releases/{evil} missing\n"

    proc = _sh(dp._probe_command(target), work)
    assert dp._parse_probe(proc.stdout) == (f"releases/{second.name}", second.content_hash)
    listing = _sh(dp._list_command(target), work).stdout.splitlines()
    assert listing == [f"link=releases/{second.name}", name, second.name]
    proc = _sh(dp._prune_command(target, 0, [f".probe-{evil}"]), work)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("pwned"))


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
    assert "pruning old releases failed" in report.details["cn01"]["warning"]
    assert "pruning" in report.run["cn01"].stderr
    assert names[0] in release_dirs(lab, "cn01", local_target)
    for node in NODES[1:]:
        assert "warning" not in report.details[node]
        assert sorted(release_dirs(lab, node, local_target)) == [names[1], report.release]


def _break_current(lab, node: str, target: str) -> None:
    """Make ``current`` a non-empty real directory: the switch's rename fails there."""
    on_node(lab, node, f"rm {target}/current && mkdir {target}/current && : > {target}/current/f")


def test_failed_switch_reverts_before_anything_is_pruned(lab, session, project, local_target):
    first = run_deploy(session, project, local_target)
    assert first.ok
    _break_current(lab, "cn04", local_target)
    (project / "analysis.py").write_text("VERSION = 2\n")
    report = run_deploy(session, project, local_target, keep=0)
    assert report.outcome == "aborted" and report.exit_status != 0
    assert report.details["cn04"]["state"] == "failed"
    assert "switching current failed" in report.run["cn04"].stderr
    for node in NODES[:3]:
        assert report.details[node]["state"] == "reverted", report.run.results
        assert current_of(lab, node, local_target) == f"releases/{first.release}"
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 1\n"


def test_node_that_cannot_switch_back_is_reported_failed(lab, session, project, local_target):
    first = run_deploy(session, project, local_target)
    assert first.ok
    _break_current(lab, "cn04", local_target)
    (project / "analysis.py").write_text("VERSION = 2\n")

    def lose_old_release(node: str, event: str) -> None:
        if node == "cn02" and event == "switched":
            on_node(lab, "cn02", f"rm -rf {local_target}/releases/{first.release}")

    report = run_deploy(session, project, local_target, on_event=lose_old_release)
    assert report.outcome == "aborted"
    assert report.details["cn02"]["state"] == "failed"
    assert not report.run["cn02"].ok and "switching back failed" in report.run["cn02"].stderr
    assert current_of(lab, "cn02", local_target) == f"releases/{report.release}"
    for node in ("cn01", "cn03"):
        assert report.details[node]["state"] == "reverted"
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
    assert {n: d["state"] for n, d in report.details.items()} == dict.fromkeys(NODES, "failed")
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
    monkeypatch.setattr(dp, "COMMAND_TIMEOUT", 2.0)
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
    with pytest.raises(dp.UnsafeSourceError) as caught:
        dp.deploy([], md, session_dir, "~/x")
    message = str(caught.value)
    assert "refusing to ship" in message and "shared/" in message and "\n" not in message
    assert key.strip().splitlines()[1] not in message
    # a copy of the key (or a token) elsewhere in the tree: refused by content
    for secret, what in ((md.online.ssh.key, "SSH private key"), (md.asapo.token_rw, "ASAPO")):
        src = make_project(tmp_path / f"p-{what[:4]}")
        (src / "notes").mkdir()
        shutil.copyfile(secret, src / "notes" / "backup.txt")
        with pytest.raises(dp.UnsafeSourceError, match=f"backup.txt: same content as .*{what}"):
            dp.deploy([], md, src, "~/x")


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


def test_unchanged_files_are_not_hashed_again_and_any_change_is_seen(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MENTO_DIGEST_CACHE", raising=False)
    root = make_project(tmp_path / "p")
    past = time.time() - 60  # older than the racy window: safe to remember
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (past, past))
    monkeypatch.setattr(dp, "RACY_NS", 0)  # ctime is "now" here; trust it for the test
    first = dp.build_release(root)
    hashed: list[str] = []
    real = dp._file_digest
    monkeypatch.setattr(dp, "_file_digest", lambda p: hashed.append(p) or real(p))
    assert dp.build_release(root).content_hash == first.content_hash
    assert hashed == []
    # same size, mtime put back: only the ctime tells, and it does
    target = root / "analysis.py"
    stat_before = target.stat()
    target.write_text("VERSION = 9\n")
    os.utime(target, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    third = dp.build_release(root)
    assert hashed == [str(target)]
    assert third.content_hash != first.content_hash
