"""Fixtures of the deploy tests: a project tree, the lab session's group, targets.

Node-local targets live on each node's private ``/srv/local`` tmpfs; shared targets
in the lab user's home, which every node sees (like a cluster home).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import NODES, make_project

from mento_fab.metadata import parse_metadata_file
from mento_fab.nodes import nodes_group


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture
def session(lab, lab_session: Path):
    md = parse_metadata_file(lab_session)
    grp = nodes_group(md, ssh_config=lab.ssh_config)
    try:
        yield md, grp, lab_session
    finally:
        grp.close()


@pytest.fixture
def local_target(lab) -> Iterator[str]:
    target = f"/srv/local/deploy-{uuid.uuid4().hex[:8]}"
    yield target
    for node in NODES:
        lab.node_exec(node, ["rm", "-rf", "--", target])


@pytest.fixture
def shared_target(lab) -> Iterator[str]:
    name = f"deploy-{uuid.uuid4().hex[:8]}"
    yield f"~/{name}"
    shutil.rmtree(lab.home / name, ignore_errors=True)
