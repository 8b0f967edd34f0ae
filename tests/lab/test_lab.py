"""The lab's own tests: real nodes, real sshd, real teardown."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lab import Lab, LabError


def test_up_without_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        Lab(tmp_path / "w", 2, prefix="mentonr", subnet="198.18.9").up()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Lab(nodes=0)
    with pytest.raises(ValueError):
        Lab(nodes=65)
    with pytest.raises(ValueError):
        Lab(user="root")
    with pytest.raises(ValueError):
        Lab(prefix="Bad-Prefix")
    with pytest.raises(ValueError):
        Lab(subnet="198.18.256")


def test_every_node_answers_ssh_with_its_own_host_name(lab: Lab) -> None:
    def ask(node: str) -> tuple[str, str]:
        proc = lab.ssh(node, "hostname; id -un")
        assert proc.returncode == 0, proc.stderr
        host, user = proc.stdout.split()
        return host, user

    with ThreadPoolExecutor(16) as pool:
        answers = dict(zip(lab.nodes, pool.map(ask, lab.nodes), strict=True))
    assert answers == {n: (n, lab.user) for n in lab.nodes}


def test_fabric_with_the_lab_ssh_config_and_known_hosts(lab: Lab) -> None:
    import fabric
    import paramiko

    config = fabric.Config(runtime_ssh_path=str(lab.ssh_config))
    conn = fabric.Connection("cn02", config=config, connect_kwargs={"key_filename": str(lab.key)})
    conn.client.load_host_keys(str(lab.known_hosts))
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with conn:
        result = conn.run("hostname; echo $SLURM_CONF", hide=True, in_stream=False)
    assert conn.user == lab.user
    assert conn.host == lab.addresses["cn02"]
    assert result.stdout.split() == ["cn02", str(lab.workdir / "slurm" / "slurm.conf")]


def test_srv_local_is_per_node_and_home_is_shared(lab: Lab) -> None:
    tag = uuid.uuid4().hex
    assert lab.ssh("cn01", f"echo {tag} > /srv/local/{tag}; echo {tag} > ~/{tag}").returncode == 0
    try:
        assert lab.ssh("cn01", f"cat /srv/local/{tag}").stdout.strip() == tag
        assert lab.ssh("cn02", f"test -e /srv/local/{tag}").returncode == 1
        assert lab.ssh("cn02", f"cat ~/{tag}").stdout.strip() == tag
        assert lab.node_exec("cn01", ["cat", f"/srv/local/{tag}"]).stdout.strip() == tag
        assert not Path(f"/srv/local/{tag}").exists()  # not on the host either
        assert lab.node_exec("cn03", ["hostname"]).stdout.strip() == "cn03"
    finally:
        (lab.home / tag).unlink(missing_ok=True)
        lab.node_exec("cn01", ["rm", "-f", f"/srv/local/{tag}"])


def test_node_pids_tell_nodes_apart(lab: Lab) -> None:
    tag = uuid.uuid4().hex[:8]
    cmd = f"nohup sh -c 'sleep 300' {tag} >/dev/null 2>&1 </dev/null & echo started"
    assert lab.ssh("cn05", cmd).returncode == 0
    mine = [p for p, c in lab.node_pids("cn05").items() if tag in c]
    assert mine, lab.node_pids("cn05")
    assert not [p for p, c in lab.node_pids("cn06").items() if tag in c]
    lab.node_exec("cn05", ["kill", *map(str, mine)])


def test_stop_and_start_sshd(lab: Lab) -> None:
    node = lab.nodes[-1]
    lab.stop_sshd(node)
    try:
        assert not lab.status()[node]["ssh"]
        proc = lab.ssh(node, "true", timeout=15)
        assert proc.returncode == 255
    finally:
        lab.start_sshd(node)
    assert lab.ssh(node, "hostname").stdout.strip() == node
    lab.restart_sshd(node)
    assert lab.ssh(node, "hostname").stdout.strip() == node


def test_changed_host_key_is_refused(lab: Lab) -> None:
    node = lab.nodes[-2]
    old = lab.host_key(node)
    lab.rotate_host_key(node)
    try:
        assert lab.host_key(node) != old
        proc = lab.ssh(node, "true")
        assert proc.returncode == 255
        assert "IDENTIFICATION HAS CHANGED" in proc.stderr or "verification failed" in proc.stderr
    finally:
        lab.rotate_host_key(node, trust=True)
    assert lab.ssh(node, "hostname").stdout.strip() == node


def test_session_tree(lab: Lab, lab_session: Path) -> None:
    doc = json.loads(lab_session.read_text())
    assert lab_session.name == f"beamtime-metadata-{doc['beamtimeId']}.json"
    assert lab_session.parent.name == "current"
    online = doc["onlineAnalysis"]
    assert online["reservedNodes"] == lab.nodes[:4]
    assert online["userAccount"] == lab.user
    assert online["slurmPartition"] == lab.partition
    assert online["slurmReservation"] == lab.reservation
    shared = lab_session.parent
    key = shared / online["sshPrivateKeyPath"]
    assert key.read_bytes() == lab.key.read_bytes()
    for rel in (
        online["sshPrivateKeyPath"],
        doc["asapo"]["beamtimeTokenPath"],
        doc["asapo"]["beamtimeClbtTokenPath"],
    ):
        assert stat.S_IMODE((shared / rel).stat().st_mode) == 0o600
    assert (shared / online["sshPublicKeyPath"]).exists()
    assert doc["corePath"] == f"/asap3/petra3/gpfs/p11/2026/data/{doc['beamtimeId']}"

    other = lab.make_session(
        lab_session.parents[2] / "other", ["cn07"], beamtimeId="11010001", contact=None
    )
    doc2 = json.loads(other.read_text())
    assert other.name == "beamtime-metadata-11010001.json"
    assert doc2["onlineAnalysis"]["reservedNodes"] == ["cn07"]
    assert "contact" not in doc2


def test_session_loads_with_the_seed_api(lab: Lab, lab_session: Path) -> None:
    metadata = pytest.importorskip("mento_fab.metadata")
    md = metadata.get_beamtime_metadata(lab_session.parents[1])
    assert md.online.nodes == lab.nodes[:4]
    assert md.online.ssh.user == lab.user


def test_from_state_reattaches(lab: Lab) -> None:
    again = Lab.from_state(lab.workdir)
    assert again.nodes == lab.nodes
    assert again.addresses == lab.addresses
    assert again.is_up()


def test_teardown_leaves_nothing(lab: Lab, spare_lab_args: dict[str, Any], tmp_path: Path) -> None:
    """A second small lab next to the session's: crash it, then clean it from its state."""
    args = spare_lab_args
    prefix = args["prefix"]
    small = Lab(tmp_path / "w", 2, slurm=True, **args)
    small.up()
    try:
        assert small.ssh("cn02", "hostname").stdout.strip() == "cn02"
        daemons = dict(small.slurm_pids)
        assert set(daemons) == {"munged", "slurmctld", "slurmd:cn01", "slurmd:cn02"}
        # A user process that outlives its session must not survive the teardown.
        small.ssh("cn01", "nohup sleep 600 >/dev/null 2>&1 </dev/null &")
        assert small.node_pids("cn01")
        # Simulate a crashed run: forget everything, reattach by state file only.
        Lab(tmp_path / "w", 2, **args).down()
        assert small.leftovers() == []
        assert not [
            p
            for p in daemons.values()
            if Path(f"/proc/{p}/status").exists()
            and "State:\tZ" not in Path(f"/proc/{p}/status").read_text()
        ]
        # Again without any state file: found by name.
        small.up()
        small.state_file.unlink()
        Lab(tmp_path / "w", 2, **args).down()
    finally:
        small.down()
        small.down()  # idempotent
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{prefix}-" not in netns
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f" {prefix}0" not in links and f" {prefix}v" not in links
    assert f"{prefix}-local" not in Path("/proc/mounts").read_text()
    assert lab.is_up()  # the session's lab is untouched


@pytest.mark.slurm
def test_srun_over_ssh_reaches_every_reserved_node(slurm_lab: Lab, slurm_session: Path) -> None:
    doc = json.loads(slurm_session.read_text())["onlineAnalysis"]
    nodes = doc["reservedNodes"]
    cmd = (
        f"srun --reservation={doc['slurmReservation']} -p {doc['slurmPartition']}"
        f" -N {len(nodes)} -w {','.join(nodes)} --immediate=10 -t 1 hostname"
    )
    proc = slurm_lab.ssh(nodes[0], cmd, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == nodes


@pytest.mark.slurm
def test_sbatch_and_squeue_as_the_lab_user(slurm_lab: Lab) -> None:
    out = slurm_lab.ssh(
        "cn02",
        f"sbatch --parsable --reservation={slurm_lab.reservation} -p {slurm_lab.partition}"
        " -N 1 -t 1 --wrap 'hostname' -o /dev/null",
    )
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    squeue = slurm_lab.ssh("cn03", f"squeue -h -j {job} -o %u")
    assert squeue.returncode == 0, squeue.stderr
    assert squeue.stdout.strip() in ("", slurm_lab.user)  # may already be done
    slurm_lab.ssh("cn02", f"scancel {job}")
