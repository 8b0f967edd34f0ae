"""Project-wide pytest fixtures: the lab cluster, shared by every test that needs real nodes.

One 32-node lab serves the whole session (bring-up costs about a second); Slurm is
started lazily by the first test that asks for ``slurm_lab``.  Lab tests are skipped,
not failed, when pytest does not run as root, so the unit tests still run anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab

LAB_NODES = int(os.environ.get("MENTO_LAB_NODES", "32"))
# Each pytest process gets its own slot (namespaces, bridge, subnet, slurmctld port), so
# several test runs on one machine never tear down each other's lab; and none of them
# collides with a lab from ``inv lab.up`` (prefix mentolab, 198.18.0.0/24).
LAB_SLOT = int(os.environ.get("MENTO_LAB_SLOT", os.getpid() % 100))
LAB_WORKDIR = Path(os.environ.get("MENTO_LAB_WORKDIR", f"/tmp/mento-lab-pytest-{LAB_SLOT}"))
LAB_PREFIX = f"mtest{LAB_SLOT}"
LAB_SUBNET = f"198.18.{100 + LAB_SLOT}"
LAB_SLURMCTLD_PORT = 6900 + LAB_SLOT
SESSION_NODES = 4

_LAB_FIXTURES = {"lab", "slurm_lab", "lab_session", "slurm_session"}
_NOT_ROOT = "lab tests need root (network namespaces, bridge, sshd): run pytest as root"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs the lab cluster (root only; skipped otherwise)")
    config.addinivalue_line("markers", "slurm: needs Slurm running in the lab")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test using a lab fixture, and skip them all up front when not root."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _LAB_FIXTURES:
            item.add_marker(pytest.mark.lab)
        if fixtures & {"slurm_lab", "slurm_session"}:
            item.add_marker(pytest.mark.slurm)
        if os.geteuid() != 0 and item.get_closest_marker("lab"):
            item.add_marker(pytest.mark.skip(reason=_NOT_ROOT))


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The session's lab: 32 nodes cn01..cn32 answering SSH; torn down at session end."""
    if os.geteuid() != 0:
        pytest.skip(_NOT_ROOT)
    cluster = Lab(
        LAB_WORKDIR,
        LAB_NODES,
        prefix=LAB_PREFIX,
        subnet=LAB_SUBNET,
        slurmctld_port=LAB_SLURMCTLD_PORT,
    )
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
