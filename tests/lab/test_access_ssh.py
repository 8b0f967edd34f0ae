"""``mento-fab ssh``: the OpenSSH client with the beamtime's account, key and host-key policy."""

from __future__ import annotations

import doctest
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import Lab
from mento_fab import openssh
from mento_fab.errors import BadInput, SelectionError
from mento_fab.hostkeys import HostKeyPolicy
from mento_fab.openssh import ssh_argv


def mento(
    *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mento_fab", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        input=input,
    )


@pytest.fixture
def env(lab: Lab, lab_session: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MENTO_METADATA": str(lab_session),
        "MENTO_SSH_CONFIG": str(lab.ssh_config),
    }


@pytest.fixture
def known_hosts(lab: Lab, tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    shutil.copyfile(lab.known_hosts, path)
    return path


# --------------------------------------------------------------------- pure logic


def test_doctest() -> None:
    assert doctest.testmod(openssh).failed == 0


def test_policy_maps_to_strict_host_key_checking(lab_session_free: Path) -> None:
    for policy, value in (("accept-new", "accept-new"), ("strict", "yes"), ("off", "no")):
        argv = ssh_argv(lab_session_free, "max-p3a002", host_keys=policy, check_files=False)
        assert f"StrictHostKeyChecking={value}" in argv
    assert set(openssh.STRICT_HOST_KEY_CHECKING) == set(HostKeyPolicy)


def test_argv_has_the_key_path_only_and_no_agent(lab_session_free: Path) -> None:
    argv = ssh_argv(
        lab_session_free, "max-p3a001", "echo hi", connect_timeout=2.5, known_hosts="/k/h 1%"
    )
    key = str(lab_session_free.parent / "shared" / "id_rsa")
    assert argv[argv.index("-i") + 1] == key
    assert "KEYSECRET" not in " ".join(argv)
    for option in ("IdentitiesOnly=yes", "IdentityAgent=none", "BatchMode=yes", "ConnectTimeout=3",
                   "ServerAliveInterval=15", "ServerAliveCountMax=4",
                   'UserKnownHostsFile="/k/h 1%%"'):  # fmt: skip
        assert option in argv, option
    assert argv[-3:] == ["--", "max-p3a001", "echo hi"]


def test_a_node_outside_the_reservation_is_bad_input(lab_session_free: Path) -> None:
    with pytest.raises(SelectionError, match="not reserved"):
        ssh_argv(lab_session_free, "max-p3a099", check_files=False)
    with pytest.raises(SelectionError, match="one node"):
        ssh_argv(lab_session_free, "max-p3a[001-002]", check_files=False)
    with pytest.raises(BadInput):
        ssh_argv(lab_session_free, "max-p3a001", ssh_config="/nonexistent/ssh_config")


@pytest.fixture
def lab_session_free(beamtime) -> Path:
    """A metadata file (no lab needed): nodes max-p3a001..004, key in shared/id_rsa."""
    return beamtime.metadata


# --------------------------------------------------------------------------- lab


def test_ssh_runs_a_command_on_the_node(env: dict[str, str]) -> None:
    proc = mento("ssh", "cn01", "--", "hostname", env=env)
    assert (proc.returncode, proc.stdout) == (0, "cn01\n"), proc.stderr
    proc = mento("ssh", "cn02", "--command", "echo $(hostname) x", env=env)
    assert (proc.returncode, proc.stdout) == (0, "cn02 x\n"), proc.stderr


def test_ssh_passes_the_exit_status_through(env: dict[str, str]) -> None:
    proc = mento("ssh", "cn03", "--", "echo out; echo err >&2; exit 7", env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")


def test_ssh_login_reads_stdin(env: dict[str, str]) -> None:
    proc = mento("ssh", "cn04", env=env, input="hostname\nexit 3\n")
    assert (proc.returncode, proc.stdout.strip()) == (3, "cn04"), proc.stderr


def test_ssh_to_a_node_outside_the_reservation_is_one_line_exit_2(env: dict[str, str]) -> None:
    proc = mento("ssh", "cn05", "--", "hostname", env=env)  # a lab node, not in the session
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not reserved" in proc.stderr
    assert proc.stdout == ""


def test_dry_run_prints_the_command_line(env: dict[str, str], lab_session: Path) -> None:
    proc = mento("ssh", "cn01", "--dry-run", "--json", "--", "ls", "-l", env=env)
    argv = json.loads(proc.stdout)["argv"]
    assert argv[-3:] == ["--", "cn01", "ls -l"]
    assert str(lab_session.parent / "shared" / "id_rsa") in argv
    assert subprocess.run(argv, capture_output=True, text=True, timeout=30).returncode == 0


def _node_names(lab: Lab, node: str) -> str:
    return f"{node},{lab.addresses[node]}"


def test_a_changed_host_key_is_refused(lab: Lab, env: dict[str, str], known_hosts: Path) -> None:
    """The node presents another key than known_hosts holds for it: ssh refuses."""
    lines = [
        f"{_node_names(lab, 'cn01')} {lab.host_key('cn02')}" if line.startswith("cn01,") else line
        for line in known_hosts.read_text().splitlines()
    ]
    known_hosts.write_text("\n".join(lines) + "\n")
    before = known_hosts.read_text()
    for policy in ("accept-new", "strict", "off"):
        proc = mento(
            "ssh", "cn01", "--known-hosts", str(known_hosts), "--host-keys", policy,
            "--", "hostname", env=env,
        )  # fmt: skip
        if policy == "off":  # trusts anything, as the other tasks do, and says so
            assert proc.returncode == 0 and "OFF" in proc.stderr
            continue
        assert proc.returncode == 255, (policy, proc.stderr)
        assert proc.stdout == ""
        assert "HOST IDENTIFICATION HAS CHANGED" in proc.stderr
    assert known_hosts.read_text() == before


def test_a_host_key_of_another_type_is_refused(
    lab: Lab, env: dict[str, str], known_hosts: Path, tmp_path: Path
) -> None:
    """known_hosts has only an ECDSA key for the node, which presents ed25519: not 'new'."""
    key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(key)], check=True)
    pub = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    lines = [
        f"{_node_names(lab, 'cn02')} {pub}" if line.startswith("cn02,") else line
        for line in known_hosts.read_text().splitlines()
    ]
    known_hosts.write_text("\n".join(lines) + "\n")
    proc = mento("ssh", "cn02", "--known-hosts", str(known_hosts), "--", "hostname", env=env)
    assert proc.returncode == 255 and proc.stdout == ""
    assert "HOST IDENTIFICATION HAS CHANGED" in proc.stderr


def test_unknown_host_keys_follow_the_policy(lab: Lab, env: dict[str, str], tmp_path: Path) -> None:
    known = tmp_path / "empty_known_hosts"
    known.write_text("")
    strict = mento(
        "ssh", "cn03", "--known-hosts", str(known), "--host-keys", "strict", "--", "true", env=env
    )
    assert strict.returncode == 255 and known.read_text() == ""
    new = mento("ssh", "cn03", "--known-hosts", str(known), "--", "hostname", env=env)
    assert (new.returncode, new.stdout) == (0, "cn03\n"), new.stderr
    assert lab.host_key("cn03").split()[1] in known.read_text()
