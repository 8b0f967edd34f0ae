"""Connections against the lab: host keys of another type, unprotected keys, name lookup.

Each test provokes the fault on real sshd's (issue 8 items 1, 4, 15); node-set input
limits (item 14) need only a metadata file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab
from mento_fab import nodes_group, run_on_nodes
from mento_fab.errors import BadInput, SelectionError
from mento_fab.nodes import node_count, select_nodes


def mento(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "mento_fab", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture
def known_hosts(lab: Lab, tmp_path: Path) -> Path:
    """A private copy of the lab's known_hosts (ed25519 keys of every node)."""
    path = tmp_path / "known_hosts"
    shutil.copyfile(lab.known_hosts, path)
    return path


@pytest.fixture
def cli_env(lab: Lab, lab_session: Path) -> dict[str, str]:
    env = {"MENTO_METADATA": str(lab_session), "MENTO_SSH_CONFIG": str(lab.ssh_config)}
    return {**os.environ, **env}


@contextlib.contextmanager
def offering(lab: Lab, node: str, tmp: Path, *types: str) -> Iterator[dict[str, str]]:
    """The node's sshd offers host keys of these types only (ed25519: its usual key).

    Yields each type's public key line (``ecdsa-sha2-nistp256 AAAA...``).
    """
    config = lab.node_dir(node) / "sshd_config"
    original = config.read_text()
    keys: dict[str, Path] = {}
    for kind in types:
        if kind == "ed25519":
            keys[kind] = lab.node_dir(node) / "ssh_host_ed25519_key"
            continue
        keys[kind] = tmp / f"{node}_host_{kind}_key"
        if not keys[kind].exists():
            extra = ["-b", "2048"] if kind == "rsa" else []
            subprocess.run(
                ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-f", str(keys[kind])],
                check=True,
            )
    lines = [line for line in original.splitlines() if not line.startswith("HostKey ")]
    config.write_text("\n".join([f"HostKey {p}" for p in keys.values()] + lines) + "\n")
    try:
        lab.restart_sshd(node)
        yield {
            kind: " ".join(path.with_suffix(".pub").read_text().split()[:2])
            for kind, path in keys.items()
        }
    finally:
        config.write_text(original)
        lab.restart_sshd(node)


# ------------------------------------------------------------ item 1: host keys
@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_a_key_of_another_type_is_a_changed_key(
    lab: Lab, lab_session: Path, known_hosts: Path, tmp_path: Path, kind: str
) -> None:
    before = known_hosts.read_text()
    with offering(lab, "cn04", tmp_path, kind):
        report = run_on_nodes(
            "true", metadata=lab_session, ssh_config=lab.ssh_config, known_hosts=known_hosts
        )
        strict = run_on_nodes(
            "true", metadata=lab_session, nodes="cn04", ssh_config=lab.ssh_config,
            known_hosts=known_hosts, host_keys="strict",
        )  # fmt: skip
    assert report["cn04"].exit is None
    assert "host key of cn04 CHANGED" in report["cn04"].error
    assert "ssh-ed25519" in report["cn04"].error  # what known_hosts holds
    assert "ssh-keygen -R cn04" in report["cn04"].error
    assert len(report.succeeded) == 3
    assert known_hosts.read_text() == before  # nothing recorded
    assert "CHANGED" in strict["cn04"].error and "unknown" not in strict["cn04"].error


def test_the_known_key_type_is_negotiated_first(
    lab: Lab, lab_session: Path, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    with offering(lab, "cn04", tmp_path, "ed25519", "ecdsa") as public:
        # Only the ECDSA key is known: paramiko alone would ask for ed25519 first.
        known.write_text(f"cn04 {public['ecdsa']}\n")
        report = run_on_nodes(
            "true", metadata=lab_session, nodes="cn04", ssh_config=lab.ssh_config,
            known_hosts=known, host_keys="strict",
        )  # fmt: skip
    assert report.ok, report.results
    assert known.read_text() == f"cn04 {public['ecdsa']}\n"


def test_a_jump_host_with_a_key_of_another_type_is_refused(
    lab: Lab, lab_session: Path, known_hosts: Path, tmp_path: Path
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host cn02\n  ProxyJump cn01\n\n" + lab.ssh_config.read_text())
    before = known_hosts.read_text()
    with offering(lab, "cn01", tmp_path, "ecdsa"):
        report = run_on_nodes(
            "true", metadata=lab_session, nodes="cn02", ssh_config=config,
            known_hosts=known_hosts,
        )  # fmt: skip
    assert report["cn02"].exit is None
    assert "host key of cn01 CHANGED" in report["cn02"].error
    assert known_hosts.read_text() == before


def test_the_cli_refuses_a_changed_key_of_another_type(
    lab: Lab, cli_env: dict[str, str], known_hosts: Path, tmp_path: Path
) -> None:
    with offering(lab, "cn03", tmp_path, "ecdsa"):
        proc = mento("run-on-nodes", "--known-hosts", str(known_hosts), "true", env=cli_env)
    assert proc.returncode == 255
    assert "cn03: host key of cn03 CHANGED" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------- a bad known_hosts line is skipped, as OpenSSH
BAD_LINE = "cn01 ssh-ed25519 !!not-base64!!"


def test_a_bad_known_hosts_line_is_skipped_with_a_warning(
    lab: Lab, cli_env: dict[str, str], known_hosts: Path
) -> None:
    known_hosts.write_text(f"# nodes\n{BAD_LINE}\n" + known_hosts.read_text())
    proc = mento("run-on-nodes", "--known-hosts", str(known_hosts), "true", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert f"{known_hosts}:2: skipping a bad known_hosts line" in proc.stderr
    assert "internal error" not in proc.stderr


def test_a_bad_line_in_the_system_file_is_skipped(
    lab: Lab, lab_session: Path, known_hosts: Path, tmp_path: Path, caplog
) -> None:
    system = tmp_path / "ssh_known_hosts"
    system.write_text(f"{BAD_LINE}\n")
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n    GlobalKnownHostsFile {system}\n\n" + lab.ssh_config.read_text())
    with caplog.at_level(logging.WARNING, logger="mento_fab"):
        report = run_on_nodes(
            "true", metadata=lab_session, ssh_config=config, known_hosts=known_hosts
        )
    assert len(report.succeeded) == 4, report
    assert any(f"{system}:1: skipping" in r.getMessage() for r in caplog.records)


def test_a_changed_key_after_a_bad_line_is_still_refused(
    lab: Lab, lab_session: Path, known_hosts: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    kept = [line for line in known_hosts.read_text().splitlines() if not line.startswith("cn04")]
    known_hosts.write_text("\n".join([BAD_LINE, f"cn04 {wrong}", *kept]) + "\n")
    before = known_hosts.read_text()
    report = run_on_nodes(
        "true", metadata=lab_session, ssh_config=lab.ssh_config, known_hosts=known_hosts
    )
    assert "host key of cn04 CHANGED" in report["cn04"].error
    assert len(report.succeeded) == 3
    assert known_hosts.read_text() == before  # the node's real key was not recorded


# --------------------------------------------- ssh_config mistakes are bad input (exit 2)
@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("Host cn02\n    Port notaport\n", "Port 'notaport' (for cn02) is not a port number"),
        ("Host cn02\n    ForwardAgent maybe\n", "ForwardAgent 'maybe' (for cn02) is not yes"),
        ("Host cn02\n    ProxyJump cn01:notaport\n", "a setting fabric cannot use (ValueError"),
        ("Host cn02\nthis-line-is-broken\n", "Unparsable line this-line-is-broken"),
    ],
)
def test_an_ssh_config_mistake_is_bad_input_naming_file_and_key(
    lab: Lab, lab_session: Path, known_hosts: Path, tmp_path: Path, setting: str, named: str
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(setting + "\n" + lab.ssh_config.read_text())
    env = {**os.environ, "MENTO_METADATA": str(lab_session), "MENTO_SSH_CONFIG": str(config)}
    proc = mento("run-on-nodes", "--known-hosts", str(known_hosts), "true", env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"{config}: {named}" in proc.stderr
    assert "internal error" not in proc.stderr
    with pytest.raises(BadInput, match=re.escape(f"{config}: ")):
        nodes_group(lab_session, ssh_config=config, known_hosts=known_hosts)


# --------------------------------------------------- item 4: an unprotected key
def test_a_key_others_can_read_warns_on_every_command(
    lab: Lab, lab_session: Path, cli_env: dict[str, str], known_hosts: Path, caplog
) -> None:
    key = lab_session.parent / "shared" / "id_rsa"
    quiet = mento("run-on-nodes", "--known-hosts", str(known_hosts), "true", env=cli_env)
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr, quiet.stderr
    key.chmod(0o644)
    try:
        runs = [
            mento("run-on-nodes", "--known-hosts", str(known_hosts), "true", env=cli_env)
            for _ in range(2)
        ]
        check = mento("check", "--known-hosts", str(known_hosts), env=cli_env)
        with caplog.at_level(logging.WARNING, logger="mento_fab"):
            nodes_group(lab_session, ssh_config=lab.ssh_config, known_hosts=known_hosts).close()
    finally:
        key.chmod(0o600)
    for proc in [*runs, check]:
        warning = [line for line in proc.stderr.splitlines() if "WARNING" in line]
        assert len(warning) == 1, proc.stderr
        assert warning[0].startswith(f"mento-fab: WARNING: SSH key {key} ")
        assert "mode 0644" in warning[0] and "chmod 600" in warning[0]
    assert [p.returncode for p in runs] == [0, 0]  # used, as the facility made it
    assert check.returncode == 1 and "chmod 600" in check.stdout  # check still fails on it
    assert any("mode 0644" in r.getMessage() for r in caplog.records)


# ---------------------------------------------- item 14: input that must not explode
@pytest.mark.parametrize(
    "args",
    [
        ("--nodes", "cn[1-99999999]"),
        ("--nodes", "cn[1-9999999999]"),
        ("--nodes", "cn[1-2]-[1-99999999]"),
        ("--nodes", "@foo:bar"),
        ("--exclude", "@all"),
        ("--exclude", "cn[1-99999999]"),
        ("--fanout", "inf"),
        ("--fanout", "nan"),
        ("--connect-timeout", "inf"),
        ("--connect-timeout", "nan"),
    ],
)
@pytest.mark.parametrize("task", ["run-on-nodes", "check"])
def test_huge_node_sets_groups_and_infinities_are_bad_input(
    beamtime, task: str, args: tuple[str, str]
) -> None:
    argv = [task, "--metadata", str(beamtime.metadata), *args]
    proc = mento(*argv, *(["true"] if task == "run-on-nodes" else []))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mento-fab: ")
    assert args[0] in proc.stderr or args[1][:8] in proc.stderr


def test_node_sets_are_counted_before_they_are_expanded() -> None:
    assert node_count("cn[01-04]") == 4
    assert node_count("cn[1-10/2],x[1-2]-[1-3],y") == 5 + 6 + 1
    assert node_count("cn[-3--1]!cn[1-2]") == 5
    with pytest.raises(SelectionError, match="at most 10000"):
        select_nodes(["cn01"], "cn[1-10001]")
    with pytest.raises(SelectionError, match="node groups"):
        select_nodes(["cn01"], "cn01", exclude="@down")
    with pytest.raises(SelectionError, match="bad node set"):
        select_nodes(["cn01"], "cn[1-1e9]")
    assert select_nodes(["cn01", "cn02", "cn03"], "cn[01-03]", exclude="cn02") == ["cn01", "cn03"]


# --------------------------------------------- item 15: name lookup is bounded too
@pytest.fixture
def silent_dns() -> Iterator[str]:
    """A name server on a loopback address that reads queries and never answers."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(20):
        address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.53"
        try:
            sock.bind((address, 53))
            break
        except OSError:
            continue
    else:
        pytest.skip("no free loopback address for a name server")
    try:
        yield address
    finally:
        sock.close()


def test_an_unresolvable_host_name_waits_no_longer_than_the_connect_timeout(
    lab: Lab, cli_env: dict[str, str], known_hosts: Path, tmp_path: Path, silent_dns: str
) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {silent_dns}\noptions timeout:20 attempts:1\n")
    config = tmp_path / "ssh_config"
    name = "cn04.mento-lab-unresolvable.invalid"
    config.write_text(f"Host cn04\n  HostName {name}\n\n" + lab.ssh_config.read_text())
    # The command runs in its own mount namespace whose /etc/resolv.conf names the
    # silent server (the C resolver's own timeout there: 20 s).
    in_namespace = ("unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                    str(resolv))  # fmt: skip
    proc = mento(
        "run-on-nodes", "--connect-timeout", "2", "--known-hosts", str(known_hosts),
        "--ssh-config", str(config), "true", env=cli_env, prefix=in_namespace,
    )  # fmt: skip
    assert proc.returncode == 255, proc.stderr
    assert f"cn04: unknown host: no answer resolving {name} within 2 s" in proc.stderr
    assert "3 ok" in proc.stderr


# ------------------------------------------- one connection, however many callers
def test_threads_opening_one_connection_at_once_share_one_transport(
    lab: Lab, lab_session: Path, known_hosts: Path
) -> None:
    import threading

    from mento_fab.connection import ensure_open

    group = nodes_group(lab_session, ssh_config=lab.ssh_config, known_hosts=known_hosts)
    callers = 3
    start = threading.Barrier(callers * len(group))
    seen: dict[str, list] = {}

    def open_it(conn) -> None:
        start.wait()
        transport = ensure_open(conn)
        seen.setdefault(conn.original_host, []).append(transport)

    threads = [
        threading.Thread(target=open_it, args=(conn,)) for conn in group for _ in range(callers)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(seen) == ["cn01", "cn02", "cn03", "cn04"]
        for node, transports in seen.items():
            assert len(transports) == callers and len({id(t) for t in transports}) == 1, node
            assert transports[0].is_active()
    finally:
        group.close()
