"""The trigger's agent path without the lab: the command line it sends, which errors
start the connect back-off, and that importing the trigger needs no fabric/paramiko."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mento_fab.hostkeys import HostKeyPolicy
from mento_fab.trigger_agent import agent_argv, connect_failed


def test_the_command_line_carries_the_triggers_ssh_options() -> None:
    argv = agent_argv(
        "cn02", "echo 'a b'; -x", 5, Path("/s/md.json"),
        {"host_keys": HostKeyPolicy.STRICT, "connect_timeout": 3, "ssh_config": Path("/c"),
         "known_hosts": None},
    )  # fmt: skip
    assert argv == [
        "mento-fab", "run-on-nodes", "--json", "--nodes", "cn02", "--metadata", "/s/md.json",
        "--host-keys", "strict", "--connect-timeout", "3.0", "--ssh-config", "/c",
        "--timeout", "5.0", "--command=echo 'a b'; -x",
    ]  # fmt: skip


def test_only_connect_and_login_failures_start_the_back_off() -> None:
    for error in ("connect timed out after 2 s", "unreachable: connection refused",
                  "authentication failed (key not accepted for this account)",
                  "no SSH server answered (no SSH banner within 2 s)"):  # fmt: skip
        assert connect_failed(error), error
    for error in (None, "", "timed out after 5 s", "connection closed by the node",
                  "the connection agent (pid 1) was lost before the command finished"):  # fmt: skip
        assert not connect_failed(error), error


def test_importing_the_trigger_needs_no_fabric_or_paramiko() -> None:
    code = (
        "import sys; from mento_fab.trigger import Trigger, TriggerMethod; "
        "print(sorted(m for m in ('fabric', 'paramiko', 'invoke') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
