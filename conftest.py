"""Project-wide pytest fixtures: the lab cluster, shared by every test that needs real nodes.

``tests/unit/`` holds tests that run anywhere (no root, no lab); ``tests/lab/`` the ones
that need real sshd and Slurm; ``tests/conftest.py`` the shared session-tree fixtures.

One 32-node lab serves the whole session (bring-up costs about a second); Slurm is
started lazily by the first test that asks for ``slurm_lab``.  Lab tests are skipped,
not failed, when pytest does not run as root, so the unit tests still run anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from lab import Lab

LAB_NODES = int(os.environ.get("MENTO_LAB_NODES", "32"))
# Each pytest process claims its own slot (namespaces, bridge, subnet, slurmctld port,
# work dir) with a lock held until it exits, so several test runs on one machine never
# tear down each other's lab; none collides with ``inv lab.up`` (mentolab, 198.18.0.0/24).
LAB_SLOTS = 50
_slot_locks: list[IO[str]] = []


def _claim_slot() -> int:
    """The first free slot from pid % 50 on (``MENTO_LAB_SLOT`` forces one)."""
    if "MENTO_LAB_SLOT" in os.environ:
        return int(os.environ["MENTO_LAB_SLOT"]) % LAB_SLOTS
    start = os.getpid() % LAB_SLOTS
    for i in range(LAB_SLOTS):
        slot = (start + i) % LAB_SLOTS
        f = open(f"/tmp/mento-lab-pytest-{slot}.lock", "a")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _slot_locks.append(f)
        return slot
    raise RuntimeError(f"all {LAB_SLOTS} lab slots are busy")


def lab_args(slot: int, *, spare: bool = False) -> dict[str, Any]:
    """Names of the slot's lab; ``spare`` gives a second small lab of the same slot."""
    offset = 50 if spare else 0
    return {
        "prefix": f"{'mspare' if spare else 'mtest'}{slot}",
        "subnet": f"198.18.{100 + offset + slot}",
        "slurmctld_port": 6900 + offset + slot,
        # Its own account, so concurrent runs never share a home directory (deploy
        # targets, worker state): the home is shared by a lab's nodes, as on a cluster.
        "user": f"mlab{slot}",
    }


SESSION_NODES = 4

_LAB_FIXTURES = {"lab", "slurm_lab", "lab_session", "slurm_session", "lab_slot", "spare_lab_args"}
_NOT_ROOT = "lab tests need root (network namespaces, bridge, sshd): run pytest as root"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs the lab cluster (root only; skipped otherwise)")
    config.addinivalue_line("markers", "slurm: needs Slurm running in the lab")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test using a lab fixture, and skip them all up front when not root."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _LAB_FIXTURES:
            if "unit" in Path(str(item.fspath)).parent.parts[-1:]:
                raise pytest.UsageError(
                    f"{item.nodeid} needs the lab: lab tests belong in tests/lab/, "
                    "tests/unit/ runs anywhere without root"
                )
            item.add_marker(pytest.mark.lab)
        if fixtures & {"slurm_lab", "slurm_session"}:
            item.add_marker(pytest.mark.slurm)
        if os.geteuid() != 0 and item.get_closest_marker("lab"):
            item.add_marker(pytest.mark.skip(reason=_NOT_ROOT))


@pytest.fixture(scope="session")
def lab_slot() -> int:
    """This pytest process's lab slot (0..49), claimed for the whole run."""
    if os.geteuid() != 0:
        pytest.skip(_NOT_ROOT)
    return _claim_slot()


@pytest.fixture(scope="session")
def spare_lab_args(lab_slot: int) -> dict[str, Any]:
    """Lab names (prefix, subnet, port) for a second, short-lived lab next to ``lab``."""
    return lab_args(lab_slot, spare=True)


@pytest.fixture(scope="session")
def lab(lab_slot: int) -> Iterator[Lab]:
    """The session's lab: 32 nodes cn01..cn32 answering SSH; torn down at session end."""
    workdir = os.environ.get("MENTO_LAB_WORKDIR", f"/tmp/mento-lab-pytest-{lab_slot}")
    cluster = Lab(Path(workdir), LAB_NODES, **lab_args(lab_slot))
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()  # raises if anything (netns, link, process) is left behind


@pytest.fixture(scope="session")
def slurm_lab(lab: Lab) -> Lab:
    """The session's lab with Slurm running (started on first use, stopped with the lab)."""
    if not lab.slurm:
        lab.start_slurm()
    return lab


@pytest.fixture
def lab_session(lab: Lab, tmp_path: Path) -> Path:
    """A 4-node session (cn01..cn04) of the lab: returns its metadata file path.

    The tool's root dir is ``tmp_path / "gpfs"``; ``lab.ssh_config`` reaches the nodes.
    """
    return lab.make_session(tmp_path, lab.nodes[:SESSION_NODES])


@pytest.fixture
def slurm_session(slurm_lab: Lab, tmp_path: Path) -> Path:
    """Like ``lab_session``, with Slurm running (partition and reservation in the file)."""
    return slurm_lab.make_session(tmp_path, slurm_lab.nodes[:SESSION_NODES])


@pytest.fixture(autouse=True)
def private_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own HOME and cache directory: nothing is read from or written
    to the real ``~/.cache/mento_fab``, ``~/.ssh`` or ``~/.mento_fab.yaml``."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    return home


@pytest.fixture(autouse=True)
def private_agent(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Every test gets its own connection-agent directory, and any agent started in it
    is stopped afterwards: no test leaves an agent running or meets another's.

    The command line runs without the agent (``MENTO_AGENT=0``) unless the test turns
    it on, or ``MENTO_TEST_AGENT=1`` runs every CLI test through it.
    """
    directory = tmp_path_factory.mktemp("agent")
    directory.chmod(0o700)
    monkeypatch.setenv("MENTO_AGENT_DIR", str(directory))
    monkeypatch.setenv("MENTO_AGENT", os.environ.get("MENTO_TEST_AGENT", "0"))
    yield directory
    stop_agents(directory)


def stop_agents(directory: Path) -> None:
    """Stop every agent in ``directory``; kill one that does not stop."""
    import signal

    from mento_fab.agent import wire
    from mento_fab.cli import client

    for names in wire.Names.all_in(directory):
        with contextlib.suppress(OSError, EOFError, ValueError):
            client.stop(names, timeout=15)
    for pidfile in directory.glob("agent-*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            if client.alive(pid):
                os.kill(pid, signal.SIGKILL)
