"""Processes on lab nodes, as tests that end remote commands look at them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def sleeps(lab: Any, marker: str, nodes: Iterable[str]) -> dict[str, list[int]]:
    """Per node, the pids of ``sleep MARKER...`` processes (not the shells that name them)."""
    return {
        node: [pid for pid, cmd in lab.node_pids(node).items() if cmd.startswith(f"sleep {marker}")]
        for node in nodes
    }


def kill_sleeps(lab: Any, marker: str, nodes: Iterable[str]) -> None:
    """Clean up after a failed test: what it left running is killed."""
    for pids in sleeps(lab, marker, nodes).values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> bool:
    """Whether ``predicate`` holds within ``timeout`` seconds (polled every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def agent_pid(directory: Path) -> int:
    """The pid of the one connection agent in ``directory``."""
    (pidfile,) = directory.glob("agent-*.pid")
    return int(pidfile.read_text())
