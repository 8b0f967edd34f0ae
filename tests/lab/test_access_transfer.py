"""``put`` and ``get`` against real sshd's: checksums over plain SSH, shared homes, lost nodes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab
from mento_fab import nodes_group
from mento_fab.errors import BadPath, LocalExists, RemoteNotFound, UnsafeSourceError
from mento_fab.transfer import get, put

NODES = ["cn01", "cn02", "cn03", "cn04"]
BIG = 50 * 1000 * 1000
#: Names that break naive quoting, globbing, tar headers or UTF-8 decoding.
ODD = [
    "plain.txt",
    "with space.txt",
    "-leading-dash",
    'quote\'s "both"',
    "$(touch PWNED)",
    "star*and?[x]",
    "new\nline",
    "ünïcödé €",
    "x" * 150,
]
RAW = b"latin1-\xe9t\xe9"  # not UTF-8


def mento(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mento_fab", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def manifest(lab: Lab, node: str, path: str) -> bytes:
    """sha256 and name of every file below ``path`` on ``node``, over plain OpenSSH."""
    command = f"cd {path} && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum"
    proc = lab.ssh(node, command, text=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def local_manifest(path: Path) -> bytes:
    command = "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum"
    return subprocess.run(["sh", "-c", command], cwd=path, capture_output=True, check=True).stdout


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def group(lab: Lab, lab_session: Path) -> Iterator:
    grp = nodes_group(lab_session, ssh_config=lab.ssh_config, connect_timeout=5)
    yield grp
    grp.close()


@pytest.fixture
def where(lab: Lab, tmp_path: Path) -> Iterator[str]:
    """A fresh node-local directory (each node has its own /srv/local)."""
    path = f"/srv/local/t-{os.getpid()}-{tmp_path.name}"
    for node in NODES:
        assert lab.ssh(node, f"mkdir -p {path}").returncode == 0
    yield path
    for node in NODES:
        lab.ssh(node, f"rm -rf {path}")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "data.bin"
    with open(path, "wb") as f:
        for _ in range(BIG // 1_000_000):
            f.write(os.urandom(1_000_000))
    return path


@pytest.fixture
def odd_tree(tmp_path: Path) -> Path:
    root = tmp_path / "odd dir"
    (root / "sub dir" / "deeper").mkdir(parents=True)
    for i, name in enumerate(ODD):
        (root / name).write_bytes(os.urandom(100 + i))
        (root / "sub dir" / name).write_text(f"{i}\n")
    (root / "sub dir" / "deeper" / "empty").write_bytes(b"")
    (root / os.fsdecode(RAW)).write_bytes(b"raw")
    (root / "empty dir").mkdir()
    return root


@pytest.fixture
def env(lab: Lab, lab_session: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MENTO_METADATA": str(lab_session),
        "MENTO_SSH_CONFIG": str(lab.ssh_config),
    }


def _drop_sessions(lab: Lab, node: str) -> None:
    for pid, cmd in lab.node_pids(node).items():
        if cmd.startswith("sshd:"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------ put


def test_put_a_50_mb_file_to_four_nodes(lab: Lab, group, where: str, big: Path) -> None:
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def count(node: str, n: int) -> None:
        with lock:
            seen[node] = seen.get(node, 0) + n

    totals: list[int] = []
    report = put(group, big, where, on_total=totals.append, on_bytes=count)
    assert report.exit_status == 0, [r.as_dict() for r in report.results]
    assert totals == [4 * BIG] and seen == dict.fromkeys(NODES, BIG)
    want = sha256(big)
    for node in NODES:
        assert lab.ssh(node, f"sha256sum {where}/data.bin").stdout.split()[0] == want
        assert report[node].message == f"1 file, 50.0 MB -> {where}/data.bin"
        assert lab.ssh(node, f"ls -A {where}").stdout == "data.bin\n"  # no nonce, no stage left


def test_put_a_directory_with_odd_names(lab: Lab, group, where: str, odd_tree: Path) -> None:
    report = put(group, odd_tree, f"{where}/")
    assert report.exit_status == 0, [r.as_dict() for r in report.results]
    want = local_manifest(odd_tree)
    assert want.count(b"\n") >= 2 * len(ODD) + 2
    for node in NODES:
        assert manifest(lab, node, f"'{where}/odd dir'") == want
        assert lab.ssh(node, f"test -d '{where}/odd dir/empty dir'").returncode == 0
        assert lab.ssh(node, f"ls {where}/odd\\ dir/PWNED {where}/PWNED").returncode != 0
    # A second put merges into the existing directory (scp rules: REMOTE is now a directory).
    (odd_tree / "added.txt").write_text("new")
    report = put(group, odd_tree, where)
    assert report.exit_status == 0
    assert manifest(lab, "cn02", f"'{where}/odd dir'") == local_manifest(odd_tree)


def test_put_to_a_shared_home_writes_once(lab: Lab, group, tmp_path: Path) -> None:
    src = tmp_path / "cfg.txt"
    src.write_text("shared\n")
    target = f"put-{os.getpid()}-{tmp_path.name}.txt"
    try:
        report = put(group, src, f"~/{target}")
        assert report.exit_status == 0, [r.as_dict() for r in report.results]
        writers = [r.node for r in report.results if "->" in (r.message or "")]
        assert len(writers) == 1, [r.message for r in report.results]
        for r in report.results:
            if r.node not in writers:
                assert r.message == f"same directory as {writers[0]} (shared, written once)"
        for node in NODES:
            assert lab.ssh(node, f"cat ~/{target}").stdout == "shared\n"
        assert not list(lab.home.glob(".mento-p*")), "nonce or stage files left in the home"
    finally:
        (lab.home / target).unlink(missing_ok=True)


def test_put_bad_input_writes_nothing(lab: Lab, group, where: str, tmp_path: Path) -> None:
    with pytest.raises(BadPath):
        put(group, tmp_path / "missing", where)
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(RemoteNotFound):
        put(group, src, f"{where}/no/such/dir/f")
    for node in NODES:
        assert lab.ssh(node, f"ls -A {where}").stdout == ""


def test_put_refuses_the_beamtime_key(group, lab_session: Path, tmp_path: Path, where) -> None:
    copy = tmp_path / "project" / "id_copy"
    copy.parent.mkdir()
    copy.write_bytes((lab_session.parent / "shared" / "id_rsa").read_bytes())
    with pytest.raises(UnsafeSourceError, match="private key"):
        put(group, copy.parent, where, metadata=lab_session)


def test_a_node_lost_in_the_middle_of_put(lab: Lab, group, where: str, big: Path) -> None:
    dropped = threading.Event()

    def kill_cn03(node: str, n: int) -> None:
        if node == "cn03" and not dropped.is_set():
            dropped.set()
            _drop_sessions(lab, "cn03")

    report = put(group, big, where, on_bytes=kill_cn03)
    assert dropped.is_set()
    lost = report["cn03"]
    assert lost.error is not None and lost.status == 255, lost.as_dict()
    assert "lost" in lost.error, lost.error
    assert report.exit_status == 255
    for node in ("cn01", "cn02", "cn04"):
        assert report[node].ok
        assert lab.ssh(node, f"sha256sum {where}/data.bin").stdout.split()[0] == sha256(big)
    assert lab.ssh("cn03", f"test -e {where}/data.bin").returncode == 1  # no half file there


# ------------------------------------------------------------------------ get


def test_get_into_per_node_directories(
    lab: Lab, group, where: str, big: Path, odd_tree: Path, tmp_path: Path
) -> None:
    assert put(group, big, where).exit_status == 0
    assert put(group, odd_tree, where).exit_status == 0
    out = tmp_path / "out"
    tracemalloc.start()
    try:
        report = get(group, f"{where}/data.bin", out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.exit_status == 0, [r.as_dict() for r in report.results]
    assert peak < 32 * 1024 * 1024  # streamed: bounded, not 4 x 50 MB
    for node in NODES:
        assert sha256(out / node / "data.bin") == sha256(big)
        assert report[node].message == f"1 file, 50.0 MB -> {out / node}"
    report = get(group, f"{where}/odd dir", out)
    assert report.exit_status == 0, [r.as_dict() for r in report.results]
    for node in NODES:
        assert local_manifest(out / node / "odd dir") == local_manifest(odd_tree)
        assert (out / node / "odd dir" / "empty dir").is_dir()
    assert not list(out.rglob("*.mento-part-*"))


def test_get_a_pattern_keeps_paths_below_its_directory(lab: Lab, group, where, tmp_path) -> None:
    for node in NODES:
        script = (
            f"mkdir -p {where}/run1 {where}/run2 {where}/other && "
            f"echo $(hostname) 1 > {where}/run1/out.h5 && "
            f"echo 2 > {where}/run2/out.h5 && echo no > {where}/other/out.h5"
        )
        assert lab.ssh(node, script).returncode == 0
    lab.ssh("cn04", f"rm -rf {where}/run1 {where}/run2")
    out = tmp_path / "got"
    report = get(group, f"{where}/run*/out.h5", out)
    assert (out / "cn02" / "run1" / "out.h5").read_text() == "cn02 1\n"
    assert (out / "cn02" / "run2" / "out.h5").read_text() == "2\n"
    assert not (out / "cn02" / "other").exists()
    assert report["cn04"].exit == 1 and "nothing matches" in (report["cn04"].message or "")
    assert not (out / "cn04").exists()
    assert report.exit_status == 1


def test_get_does_not_overwrite_unless_asked(lab: Lab, group, where, tmp_path: Path) -> None:
    for node in NODES:
        lab.ssh(node, f"echo $(hostname) > {where}/f.txt")
    out = tmp_path / "out"
    (out / "cn03").mkdir(parents=True)
    (out / "cn03" / "f.txt").write_text("mine\n")
    with pytest.raises(LocalExists, match="overwrite"):
        get(group, f"{where}/f.txt", out)
    assert sorted(p.name for p in out.iterdir()) == ["cn03"]  # nothing half-written
    assert (out / "cn03" / "f.txt").read_text() == "mine\n"
    report = get(group, f"{where}/f.txt", out, overwrite=True)
    assert report.exit_status == 0
    assert [(out / n / "f.txt").read_text() for n in NODES] == [f"{n}\n" for n in NODES]


def test_get_bad_remote_paths_write_nothing(group, where, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for bad in (f"{where}/*/../x", f"{where}/..", "/", "~/.."):
        with pytest.raises(BadPath):
            get(group, bad, out)
    with pytest.raises(RemoteNotFound):
        get(group, f"{where}/nothing-here*", out)
    assert not out.exists()


def test_get_never_writes_the_beamtime_key(
    lab: Lab, group, lab_session: Path, where: str, tmp_path: Path
) -> None:
    key = (lab_session.parent / "shared" / "id_rsa").read_bytes()
    lab.node_exec("cn01", ["sh", "-c", f"cat > {where}/stolen && chmod 644 {where}/stolen"],
                  input=key.decode())  # fmt: skip
    out = tmp_path / "out"
    one = nodes_group(lab_session, nodes="cn01", ssh_config=lab.ssh_config)
    with one:
        report = get(one, f"{where}/stolen", out, metadata=lab_session)
    assert report["cn01"].exit == 1 and "private key" in (report["cn01"].message or "")
    assert not (out / "cn01" / "stolen").exists()


def test_a_node_lost_in_the_middle_of_get(lab: Lab, group, where: str, tmp_path: Path) -> None:
    for node in NODES:
        proc = lab.ssh(node, f"head -c 100000000 /dev/zero > {where}/big.bin")
        assert proc.returncode == 0
    dropped = threading.Event()

    def kill_cn02(node: str, n: int) -> None:
        if node == "cn02" and not dropped.is_set():
            dropped.set()
            _drop_sessions(lab, "cn02")

    out = tmp_path / "out"
    report = get(group, f"{where}/big.bin", out, on_bytes=kill_cn02)
    assert dropped.is_set()
    assert report["cn02"].status == 255 and report["cn02"].error, report["cn02"].as_dict()
    assert "lost" in report["cn02"].error, report["cn02"].error
    assert report.exit_status == 255
    for node in ("cn01", "cn03", "cn04"):
        assert report[node].ok and (out / node / "big.bin").stat().st_size == 100_000_000
    assert not (out / "cn02" / "big.bin").exists()  # no half file under the real name
    assert not list(out.rglob("*.mento-part-*"))


# ------------------------------------------------------------------------ CLI


def test_cli_put_and_get(lab: Lab, env: dict[str, str], where: str, tmp_path: Path) -> None:
    src = tmp_path / "note.txt"
    src.write_text("hello\n")
    proc = mento("put", str(src), where, "--nodes", "cn[01-02]", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"-> {where}/note.txt" in proc.stdout
    assert "2 nodes: 2 ok, 0 failed, 0 unreachable" in proc.stderr
    out = tmp_path / "out"
    proc = mento("get", f"{where}/note.txt", str(out), "--json", env=env)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1  # cn03 and cn04 never got the file
    assert [n["exit"] for n in data["nodes"]] == [0, 0, 1, 1]
    assert (out / "cn01" / "note.txt").read_text() == "hello\n"
    proc = mento("get", f"{where}/note.txt", str(out), "--nodes", "cn01", env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--overwrite" in proc.stderr
    proc = mento("get", f"{where}/x/../../y", str(out), env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    proc = mento("get", f"{where}/none", str(out), env=env)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_ctrl_c_ends_a_transfer_at_once_and_cleans_up(
    lab: Lab, env: dict[str, str], where: str, tmp_path: Path
) -> None:
    for node in NODES:
        assert lab.ssh(node, f"head -c 200000000 /dev/zero > {where}/big.bin").returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mento_fab", "get", f"{where}/big.bin", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(out.rglob("*.mento-part-*")):  # data is flowing
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err
    assert not list(out.rglob("*.mento-part-*"))  # no half file left, under any name
    done = list(out.rglob("big.bin"))  # complete files only, never a half one
    assert {p.stat().st_size for p in done} <= {200_000_000}
    assert len(done) < len(NODES)  # the transfers stopped, they did not run to their end


def test_put_onto_a_directory_of_the_same_name_fails_on_that_node_only(
    lab: Lab, group, where: str, tmp_path: Path
) -> None:
    src = tmp_path / "f.txt"
    src.write_text("x\n")
    assert lab.ssh("cn02", f"mkdir {where}/f.txt").returncode == 0
    report = put(group, src, f"{where}/")
    assert report["cn02"].exit == 1 and "exists and is a directory" in report["cn02"].message
    assert [report[n].ok for n in ("cn01", "cn03", "cn04")] == [True] * 3
    assert report.exit_status == 1
    for node in NODES:  # no nonce or stage file left anywhere
        assert lab.ssh(node, f"ls -A {where}").stdout == "f.txt\n"
