"""Deploy's pure parts: scanning, ignore rules, token paths, remote commands run locally."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from deploy_helpers import HOSTILE, NO_SECRETS, make_project, sh_run

from mento_fab.deployment import (
    Release,
    UnsafeSourceError,
    build_release,
    digests,
    node_path,
    remote,
)
from mento_fab.errors import BadInput


def test_content_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    src = make_project(tmp_path / "p")
    first = build_release(src)
    os.utime(src / "analysis.py", (1, 1))  # mtime is not content
    assert build_release(src).content_hash == first.content_hash
    (src / "analysis.py").chmod(0o700)  # a mode is
    moded = build_release(src)
    assert moded.content_hash != first.content_hash
    (src / "analysis.py").chmod(0o644)
    (src / "analysis.py").write_text("VERSION = 2\n")
    assert build_release(src).content_hash not in (first.content_hash, moded.content_hash)


def test_symlink_outside_the_tree_is_refused(tmp_path: Path) -> None:
    src = make_project(tmp_path / "p")
    os.symlink("/etc/passwd", src / "passwd")
    with pytest.raises(UnsafeSourceError, match="outside the source tree"):
        build_release(src)
    (src / "passwd").unlink()
    os.symlink("../../outside", src / "pkg" / "up")
    with pytest.raises(UnsafeSourceError):
        build_release(src)


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
    paths = {e.path for e in build_release(src, ["secret*"]).entries}
    assert "analysis.py" in paths and "keep.log" in paths and ".mentoignore" in paths
    for gone in (".git", "__pycache__", "myenv", "build", "run.log", "secret.txt"):
        assert not any(p == gone or p.startswith(gone + "/") for p in paths), gone


def test_token_paths_are_translated_to_the_beamline_mount() -> None:
    assert (
        node_path("/gpfs/current/shared/t.txt", "/gpfs/current", "/beamline/p11")
        == "/beamline/p11/shared/t.txt"
    )
    # outside the session root (e.g. core filesystem): unchanged
    assert node_path("/asap3/x/t.txt", "/gpfs/current", "/beamline/p11") == "/asap3/x/t.txt"
    assert node_path("/gpfs/current/t", None, "/beamline/p11") == "/gpfs/current/t"


def test_bad_targets_are_refused() -> None:
    for bad in ("", "~", "/", "~other/x"):
        with pytest.raises(BadInput):
            remote.remote_dir(bad)
    assert remote.remote_dir("~/mento_fab/1") == "mento_fab/1"


@pytest.mark.parametrize("evil", [HOSTILE, "r'; touch pwned; echo '"])
def test_generated_commands_quote_hostile_names(tmp_path: Path, evil: str) -> None:
    """Every command run locally (POSIX sh) with a hostile target and release name."""
    work = tmp_path / "work"
    target = f"-x {evil}"  # relative and starting with "-": must not read as an option
    (work / target / "releases").mkdir(parents=True)
    built = build_release(make_project(tmp_path / "p"))
    release = Release(built.source, built.entries, built.content_hash, f"20250101T000000Z-{evil}")
    name = release.name
    data, _ = release.archive(None)
    (work / target / "releases" / f".{name}.tar").write_bytes(data)
    stage = remote.stage_command(target, release, hashlib.sha256(data).hexdigest(), None, False, [])
    assert subprocess.run(["sh", "-n", "-c", stage]).returncode == 0
    proc = sh_run(stage, work)
    assert proc.returncode == 0, proc.stderr
    staged = work / target / "releases" / name
    assert (staged / ".mento" / "ready").exists() and (staged / "analysis.py").is_file()

    # a delta on top of it: a hard-linked copy of the base minus the .drop list
    (tmp_path / "p" / "analysis.py").write_text("VERSION = 2\n")
    (tmp_path / "p" / "data" / "f03.txt").unlink()
    (tmp_path / "p" / "run.sh").chmod(0o700)  # same content, new mode
    built2 = build_release(tmp_path / "p")
    second = Release(built2.source, built2.entries, built2.content_hash, f"20250102T0Z-{evil}")
    base_entries = json.loads(release.manifest())["entries"]
    data2, _ = second.archive(base_entries)
    releases_dir = work / target / "releases"
    (releases_dir / f".{second.name}.tar").write_bytes(data2)
    drop = second.dropped(base_entries)
    assert sorted(drop) == sorted(["analysis.py", "data/f03.txt", "run.sh", "alias.py"])
    (releases_dir / f".{second.name}.drop").write_bytes(b"\0".join(p.encode() for p in drop))
    stage2 = remote.stage_command(
        target, second, hashlib.sha256(data2).hexdigest(), name, False, ["--x", evil]
    )
    proc = sh_run(stage2, work)
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

    proc = sh_run(remote.switch_command(target, f"releases/{second.name}", ".current-t"), work)
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(work / target / "current") == f"releases/{second.name}"
    # a revert's release comes from the node's readlink: a hostile one is only a message
    missing = remote.switch_command(target, f"releases/{evil}", ".current-u")
    assert subprocess.run(["sh", "-n", "-c", missing]).returncode == 0
    proc = sh_run(missing, work)
    assert proc.returncode == 3 and proc.stderr == f"release releases/{evil} missing\n"

    proc = sh_run(remote.probe_command(target), work)
    assert remote.parse_probe(proc.stdout) == (f"releases/{second.name}", second.content_hash)
    listing = sh_run(remote.list_command(target), work).stdout.splitlines()
    assert listing == [f"link=releases/{second.name}", name, second.name]
    proc = sh_run(remote.prune_command(target, 0), work)
    assert proc.returncode == 0, proc.stderr
    proc = sh_run(remote.unlock_command(target, evil, [f".probe-{evil}"]), work)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("pwned"))


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
    monkeypatch.setattr(digests, "RACY_NS", 0)  # ctime is "now" here; trust it for the test
    first = build_release(root, secrets=NO_SECRETS)
    hashed: list[str] = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda p: hashed.append(p) or real(p))
    assert build_release(root, secrets=NO_SECRETS).content_hash == first.content_hash
    assert hashed == []
    # same size, mtime put back: only the ctime tells, and it does
    target = root / "analysis.py"
    stat_before = target.stat()
    target.write_text("VERSION = 9\n")
    os.utime(target, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    third = build_release(root, secrets=NO_SECRETS)
    assert hashed == [str(target)]
    assert third.content_hash != first.content_hash


def test_library_errors_name_no_command_line_flags(tmp_path: Path) -> None:
    from mento_fab.deployment import deploy
    from mento_fab.metadata import BeamtimeMetadata

    md = BeamtimeMetadata("p11", "1", "/asap3/x", "current")
    with pytest.raises(BadInput) as caught:
        deploy([], md, make_project(tmp_path / "p"), "~/x", keep=-1)
    assert "--" not in str(caught.value) and "keep" in str(caught.value)
