"""Deploy when things go wrong on purpose: signals, a second deploy, a lost node, a full
disk, interrupted deploys (issue 8, items 5-9). Each test provokes the fault on the lab."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from deploy_helpers import NODES, current_of, make_project, on_node, release_dirs, run_deploy

from mento_fab import connection
from mento_fab.deployment import deploy, lock, releases, rollback
from mento_fab.deployment.remote import LOCK
from mento_fab.errors import DeployLocked
from mento_fab.nodes import nodes_group

HERE = Path(__file__).parent


def cli_env(lab) -> dict[str, str]:
    env = {**os.environ, "MENTO_SSH_CONFIG": str(lab.ssh_config)}
    env.pop("MENTO_METADATA", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    return env


def as_user(lab, node: str, command: str) -> str:
    """A shell command on a node as the lab user (files it must be able to remove)."""
    proc = lab.ssh(node, command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------- 5: signals


@pytest.mark.parametrize(
    ("sig", "status", "fanout"), [("SIGINT", 130, 1), ("SIGTERM", 143, 2), ("SIGHUP", 129, 3)]
)
def test_a_signal_while_switching_waits_until_every_node_switched(
    lab, lab_session, project, local_target, sig, status, fanout
):
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "mento_fab",
            "deploy",
            "--metadata",
            str(lab_session),
            "--source",
            str(project),
            "--target",
            local_target,
        ],
        capture_output=True,
        text=True,
        env=cli_env(lab),
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    (project / "analysis.py").write_text("VERSION = 2\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "signal_deploy.py"),
            sig,
            "cn01",
            "-",
            "deploy",
            "--metadata",
            str(lab_session),
            "--source",
            str(project),
            "--target",
            local_target,
            "--fanout",
            str(fanout),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=cli_env(lab),
        timeout=120,
    )
    assert proc.returncode == status, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["outcome"] == "switched", doc
    assert {d["state"] for d in doc["details"].values()} == {"switched"}
    assert f"stopped by {sig}" in proc.stderr
    # every node switched: none was left behind by the signal
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{doc['release']}"}


def test_a_second_ctrl_c_aborts_and_the_report_names_every_nodes_release(
    lab, lab_session, project, local_target
):
    first = run_deploy_cli(lab, lab_session, project, local_target)
    (project / "analysis.py").write_text("VERSION = 2\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "signal_deploy.py"),
            "SIGINT",
            "cn01",
            "cn02",
            "deploy",
            "--metadata",
            str(lab_session),
            "--source",
            str(project),
            "--target",
            local_target,
            "--fanout",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=cli_env(lab),
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["outcome"] == "interrupted"
    new = f"releases/{doc['release']}"
    states = {n: d["state"] for n, d in doc["details"].items()}
    assert states["cn01"] == "switched" and "aborted" in states.values(), states
    for node, info in doc["details"].items():
        actual = current_of(lab, node, local_target)
        if info["state"] == "switched":
            assert actual == new
        elif info["state"] == "aborted":
            assert actual == info["current"] == f"releases/{first}"
        else:
            assert info["state"] == "unknown" and actual in (new, f"releases/{first}")


@pytest.mark.parametrize("count", [3, 6])
def test_ctrl_c_hammered_while_switching_still_reports_and_unlocks(
    lab, lab_session, project, local_target, count
):
    """Three (or six) Ctrl-C 50 ms apart: the second aborts, the later ones must not cut
    the report or the release of the locks short."""
    first = run_deploy_cli(lab, lab_session, project, local_target)
    (project / "analysis.py").write_text("VERSION = 2\n")
    argv = [
        sys.executable, str(HERE / "signal_deploy.py"), "SIGINT", "cn01", f"x{count}",
        "deploy", "--metadata", str(lab_session), "--source", str(project),
        "--target", local_target, "--fanout", "1",
    ]  # fmt: skip
    for json_out in (True, False):
        if not json_out:  # again, from the first release, for the table
            (project / "analysis.py").write_text(f"VERSION = {count}\n")
        proc = subprocess.run(
            argv + (["--json"] if json_out else []),
            capture_output=True, text=True, env=cli_env(lab), timeout=120,
        )  # fmt: skip
        assert proc.returncode == 130, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        for node in NODES:  # every lock given back
            assert on_node(lab, node, f"test -e {local_target}/{LOCK} && echo held") == ""
        if not json_out:
            for node in NODES:  # the table names every node and where it is
                row = next(ln for ln in proc.stdout.splitlines() if node in ln)
                assert any(s in row for s in ("switched", "aborted", "unknown")), proc.stdout
            assert "interrupted" in proc.stdout, proc.stdout
            continue
        doc = json.loads(proc.stdout)
        assert doc["outcome"] == "interrupted"
        new = f"releases/{doc['release']}"
        for node, info in doc["details"].items():
            actual = current_of(lab, node, local_target)
            if info["state"] == "switched":
                assert actual == new
            elif info["state"] == "aborted":
                assert actual == info["current"] == f"releases/{first}"
            else:
                assert info["state"] == "unknown" and actual in (new, f"releases/{first}")


def run_deploy_cli(lab, lab_session: Path, project: Path, target: str, *extra: str) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mento_fab",
            "deploy",
            "--metadata",
            str(lab_session),
            "--source",
            str(project),
            "--target",
            target,
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=cli_env(lab),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["release"]


# ---------------------------------------------------------------- 6: the lock


def test_a_second_deploy_waits_for_the_first(lab, lab_session, project, local_target, tmp_path):
    other = make_project(tmp_path / "other")
    (other / "analysis.py").write_text("VERSION = 'other'\n")
    grp_a = nodes_group(lab_session, ssh_config=lab.ssh_config)
    grp_b = nodes_group(lab_session, ssh_config=lab.ssh_config)
    second: dict[str, object] = {}

    def start_the_other_deploy(node: str, event: str) -> None:
        if node == "cn04" and event == "staged" and "thread" not in second:

            def run_b() -> None:
                second["report"] = deploy(grp_b, lab_session, other, local_target)

            thread = threading.Thread(target=run_b)
            second["thread"] = thread
            thread.start()
            thread.join(timeout=5)  # long enough for an unlocked deploy to finish
            second["finished while the first ran"] = not thread.is_alive()

    try:
        first = deploy(grp_a, lab_session, project, local_target, on_event=start_the_other_deploy)
        second["thread"].join(timeout=120)  # type: ignore[attr-defined]
    finally:
        grp_a.close()
        grp_b.close()
    later = second["report"]
    assert first.outcome == "switched" and later.outcome == "switched"  # type: ignore[attr-defined]
    assert second["finished while the first ran"] is False
    # both said "switched", and every node is on the release of the one that ran last
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{later.release}"}  # type: ignore[attr-defined]


def _fake_lock(lab, node: str, target: str, **owner: str) -> None:
    record = "\n".join(f"{k}={v}" for k, v in owner.items())
    as_user(
        lab,
        node,
        f"mkdir -p {target}/.mento-lock && printf '%s\\n' '{record}' > {target}/.mento-lock/owner",
    )


def test_a_held_lock_makes_the_deploy_fail_naming_its_holder(
    lab, lab_session, project, local_target
):
    first = run_deploy_cli(lab, lab_session, project, local_target)
    (project / "analysis.py").write_text("VERSION = 2\n")
    holder = {
        "run": "f00d",
        "host": "beamline-pc7",
        "pid": "4242",
        "started": "2026-01-02T03:04:05Z",
        "proc": "",
    }
    _fake_lock(lab, "cn02", local_target, **holder)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mento_fab",
            "deploy",
            "--metadata",
            str(lab_session),
            "--source",
            str(project),
            "--target",
            local_target,
            "--lock-timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        env=cli_env(lab),
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    for part in ("cn02", "host beamline-pc7", "pid 4242", "started 2026-01-02T03:04:05Z"):
        assert part in proc.stderr
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{first}"}
    assert "run=f00d" in on_node(lab, "cn02", f"cat {local_target}/.mento-lock/owner")
    # rollback respects it too
    grp = nodes_group(lab_session, ssh_config=lab.ssh_config)
    try:
        with pytest.raises(DeployLocked, match="host beamline-pc7"):
            rollback(grp, lab_session, local_target, lock_timeout=0.5)
    finally:
        grp.close()


def test_the_lock_of_a_dead_deploy_is_taken_over(lab, lab_session, project, local_target):
    first = run_deploy_cli(lab, lab_session, project, local_target)
    # a deploy of this host that was killed: its pid is gone
    gone = subprocess.Popen(["true"])
    gone.wait()
    system = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    system += f":{os.stat('/proc/self/ns/pid').st_ino}"
    _fake_lock(
        lab,
        "cn01",
        local_target,
        run="dead1",
        host=socket.gethostname(),
        pid=str(gone.pid),
        started="2026-01-01T00:00:00Z",
        proc=f"{system}:1",
    )
    # a deploy of another host whose heartbeat stopped long ago
    _fake_lock(
        lab,
        "cn03",
        local_target,
        run="dead2",
        host="beamline-pc7",
        pid="1",
        started="2026-01-01T00:00:00Z",
        proc="",
    )
    as_user(
        lab,
        "cn03",
        f"touch -d '-{int(lock.STALE_AFTER) + 60} seconds' {local_target}/.mento-lock/owner",
    )
    (project / "analysis.py").write_text("VERSION = 2\n")
    release = run_deploy_cli(lab, lab_session, project, local_target, "--lock-timeout", "5")
    assert release != first
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{release}"}
    for node in NODES:  # given back at the end
        assert ".mento-lock" not in on_node(lab, node, f"ls -A {local_target}")


def test_a_deploy_never_removes_another_runs_probe_files(lab, session, project, shared_target):
    home = lab.home / shared_target[2:]
    first = run_deploy(session, project, shared_target)
    assert first.ok and first.shared == [NODES]
    # another deploy is detecting shared targets right now; a dead one left an old file
    as_user(
        lab,
        "cn01",
        f"touch {home}/releases/.probe-0therrun-0 && touch -d '-2 hours' "
        f"{home}/releases/.probe-deadrun-0",
    )
    (project / "analysis.py").write_text("VERSION = 2\n")
    second = run_deploy(session, project, shared_target)
    assert second.outcome == "switched" and second.shared == [NODES], second.run.results
    names = {p.name for p in (home / "releases").iterdir()}
    assert ".probe-0therrun-0" in names and ".probe-deadrun-0" not in names
    assert not any(n.startswith(".probe-") and "0therrun" not in n for n in names), names


# ------------------------------------------------------- 7: live history


def test_never_live_releases_do_not_count_and_are_never_rolled_back_to(
    lab, session, project, local_target
):
    _, grp, path = session
    first = run_deploy(session, project, local_target)
    assert first.ok

    def interrupt(node: str, event: str) -> None:
        if event == "staged":
            raise KeyboardInterrupt  # the user gave up after staging: nothing switched

    for version in range(2, 7):
        (project / "analysis.py").write_text(f"VERSION = {version}\n")
        with pytest.raises(KeyboardInterrupt):
            deploy(grp, path, project, local_target, on_event=interrupt)
    _, found = releases(grp, path, local_target)
    never = [r for r in found["cn01"].releases if r not in found["cn01"].live]
    assert len(never) >= 1 and all(f.current == first.release for f in found.values())
    refused = rollback(grp, path, local_target, to=never[-1])
    assert refused.outcome == "aborted" and "never went live" in refused.run["cn01"].message

    (project / "analysis.py").write_text("VERSION = 7\n")
    good = run_deploy(session, project, local_target, keep=1)
    assert good.outcome == "switched", good.run.results
    for node in NODES:  # the never-live ones are gone and did not push the live one out
        assert sorted(release_dirs(lab, node, local_target)) == [first.release, good.release]
    back = rollback(grp, path, local_target)
    assert back.outcome == "switched" and back.release == first.release
    for node in NODES:
        assert on_node(lab, node, f"cat {local_target}/current/analysis.py") == "VERSION = 1\n"
    _, found = releases(grp, path, local_target)
    assert [h[1] for h in found["cn01"].history or []][-3:] == [
        first.release,
        good.release,
        first.release,
    ]


# ------------------------------------------------- 8: a node lost in the switch


def test_a_node_lost_right_after_its_switch_is_unknown_then_reconciled(
    lab, lab_session, project, local_target, monkeypatch
):
    # a lost link is noticed after 3 s instead of a minute
    monkeypatch.setattr(connection, "DEAD_PEER_TIMEOUT", 3.0)
    monkeypatch.setattr(connection, "KEEPALIVE_INTERVAL", 1.0)
    grp = nodes_group(lab_session, ssh_config=lab.ssh_config, connect_timeout=3)
    first = deploy(grp, lab_session, project, local_target)
    assert first.ok
    (project / "analysis.py").write_text("VERSION = 2\n")

    def lose_answers(node: str, event: str) -> None:
        # the command reaches cn02, nothing comes back: packets leaving the node are dropped
        if node == "cn02" and event == "switching":
            lab.node_exec(
                "cn02", ["tc", "qdisc", "add", "dev", "eth0", "root", "pfifo", "limit", "0"]
            )

    try:
        report = deploy(grp, lab_session, project, local_target, on_event=lose_answers)
    finally:
        lab.node_exec("cn02", ["tc", "qdisc", "del", "dev", "eth0", "root"])
        grp.close()
    assert report.outcome == "aborted" and report.exit_status == 255, report.run.results
    assert report.details["cn02"].state == "unknown"
    assert report.run["cn02"].message == f"unknown: may be on release {report.release}"
    assert current_of(lab, "cn02", local_target) == f"releases/{report.release}"
    for node in ("cn01", "cn03", "cn04"):
        assert report.details[node].state == "reverted"
        assert current_of(lab, node, local_target) == f"releases/{first.release}"

    grp = nodes_group(lab_session, ssh_config=lab.ssh_config)
    try:
        run, found = releases(grp, lab_session, local_target)
        assert found["cn02"].unconfirmed and not found["cn01"].unconfirmed
        assert "never went live on every node" in run["cn02"].message
        (project / "analysis.py").write_text("VERSION = 3\n")
        again = deploy(grp, lab_session, project, local_target)
    finally:
        grp.close()
    assert again.outcome == "switched", again.run.results
    assert "reconciled" in again.run["cn02"].message and report.release in again.run["cn02"].message
    assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{again.release}"}


# ------------------------------------------------------------ 9: a full disk


def _fill(lab, node: str, leave: int) -> None:
    """Fill the node's /srv/local until only ``leave`` bytes are free."""
    on_node(lab, node, "rm -f /srv/local/filler")
    free = int(on_node(lab, node, "df -B1 --output=avail /srv/local | tail -n 1"))
    on_node(lab, node, f"fallocate -l {max(free - leave, 0)} /srv/local/filler")


def test_a_full_disk_is_reported_as_no_space_left(lab, lab_session, project, local_target):
    first = run_deploy_cli(lab, lab_session, project, local_target)
    (project / "data" / "big.bin").write_bytes(os.urandom(3_000_000))
    argv = [
        sys.executable,
        "-m",
        "mento_fab",
        "deploy",
        "--metadata",
        str(lab_session),
        "--source",
        str(project),
        "--target",
        local_target,
        "--json",
    ]
    expected = f"no space left on cn03:{local_target}"
    try:
        for leave in (1_000_000, 4_500_000):  # the upload fails; then the unpacking
            _fill(lab, "cn03", leave)
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=cli_env(lab), timeout=120
            )
            assert proc.returncode != 0, proc.stderr
            doc = json.loads(proc.stdout)
            cn03 = next(n for n in doc["nodes"] if n["node"] == "cn03")
            assert cn03["message"] == expected, (leave, cn03)
            assert "checksum" not in json.dumps(cn03)
            assert {current_of(lab, n, local_target) for n in NODES} == {f"releases/{first}"}
            # cn03 answered: it failed, it is not unreachable; the others were held back
            assert cn03["error"] is None and cn03["exit"] not in (None, 0), cn03
            counts = {k: doc["summary"].get(k) for k in ("ok", "failed", "unreachable")}
            assert counts == {"ok": 0, "failed": 1, "unreachable": 0}, doc["summary"]
            assert doc["summary"]["held_back"] == 3
            for node in doc["nodes"]:
                if node["node"] != "cn03":
                    assert node["exit"] is None and node["error"] is None, node
                    assert node["message"].startswith("not switched: cn03 failed"), node
            # no partial upload or staging directory left behind
            assert release_dirs(lab, "cn03", local_target) == [first], leave
            text = subprocess.run(
                argv[:-1], capture_output=True, text=True, env=cli_env(lab), timeout=120
            )
            assert text.returncode == proc.returncode, text.stderr
            assert (text.stdout + text.stderr).count(expected) == 1, text.stdout + text.stderr
            assert text.stderr.splitlines()[-1] == (
                f"4 nodes: 0 ok, 1 failed (cn03 exit {cn03['exit']}), 0 unreachable, "
                "3 held back (cn[01-02,04])"
            ), text.stderr
            assert release_dirs(lab, "cn03", local_target) == [first], leave
    finally:
        on_node(lab, "cn03", "rm -f /srv/local/filler")
    assert run_deploy_cli(lab, lab_session, project, local_target) != first


def test_an_unchanged_redeploy_removes_leftovers_of_failed_runs(
    lab, lab_session, project, local_target
):
    """A failed or killed run's upload holds space: even a deploy with nothing to do
    removes it (under the lock, so never another running deploy's)."""
    first = run_deploy_cli(lab, lab_session, project, local_target)
    junk = [".20990101-000000-dead.tar", ".20990101-000000-dead.drop", ".staging-20990101-x"]
    as_user(lab, "cn02", f"cd {local_target}/releases && : > {junk[0]} && : > {junk[1]} && "
            f"mkdir {junk[2]} && : > {junk[2]}/f")  # fmt: skip
    assert sorted(release_dirs(lab, "cn02", local_target)) == sorted([*junk, first])
    run_deploy_cli(lab, lab_session, project, local_target)  # nothing changed: no new release
    for node in NODES:
        assert release_dirs(lab, node, local_target) == [first], node
        assert current_of(lab, node, local_target) == f"releases/{first}"
