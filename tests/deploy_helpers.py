"""Helpers shared by the deploy tests: a project tree, commands on nodes, a deploy call."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from mento_fab.deployment import deploy
from mento_fab.deployment.secrets import SecretScan

HOSTILE = "-rf $(touch pwned) 'it''s' \"q\"; `x`.py"
NODES = ["cn01", "cn02", "cn03", "cn04"]
#: A secret scan that looks for nothing (pure scanning tests have no beamtime).
NO_SECRETS = SecretScan({})


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


def run_deploy(session, source: Path, target: str, **kw):
    """Deploy with the session fixture's group, naming the session by its metadata file."""
    _, grp, path = session
    return deploy(grp, path, source, target, **kw)


def current_of(lab, node: str, target: str) -> str:
    return on_node(lab, node, f"readlink {target}/current").strip()


def release_dirs(lab, node: str, target: str) -> list[str]:
    return on_node(lab, node, f"ls -A {target}/releases").split()


def quote(name: str) -> str:
    return shlex.quote(name)


def sh_run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True)


def break_current(lab, node: str, target: str) -> None:
    """Make ``current`` a non-empty real directory: the switch's rename fails there."""
    on_node(lab, node, f"rm {target}/current && mkdir {target}/current && : > {target}/current/f")
