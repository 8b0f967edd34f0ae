"""Plain fixtures for the metadata tests: session trees written to temporary directories.

A tree looks like the beamline PC's ``/gpfs``: ``<root>/local/`` (never a session) and
``<root>/current/`` or ``<root>/commissioning/`` holding the metadata file and the real
key and token files it names (``shared/...``).
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import NODES, make_project

from mento_fab.metadata import parse_metadata_file
from mento_fab.nodes import nodes_group

# Recognisable secrets: tests assert that they never appear in any output or message.
# The key is a fake with a PEM-like frame (built up so no key header sits in the source).
_PEM = "OPENSSH " + "PRIVATE KEY"
KEY_SECRET = f"-----BEGIN {_PEM}-----\nKEYSECRET-b3BlbnNzaC1rZXktdjEAAAAA\n-----END {_PEM}-----\n"
TOKEN_RW_SECRET = "TOKENSECRETRW-eyJhbGciOiJIUzI1NiJ9.cmVhZHdyaXRl"
TOKEN_RO_SECRET = "TOKENSECRETRO-eyJhbGciOiJIUzI1NiJ9.cmVhZG9ubHk"
SECRETS = (KEY_SECRET.splitlines()[1], TOKEN_RW_SECRET, TOKEN_RO_SECRET)

#: The user beamtime example of metadata-format.md.
USER_DOC: dict[str, Any] = {
    "applicant": {
        "email": "a@example.org",
        "institute": "Example Univ.",
        "lastname": "Doe",
        "userId": "100001",
        "username": "jdoe",
    },
    "asapo": {
        "beamtimeClbtTokenPath": "shared/asapo-token-clbt.txt",
        "beamtimeTokenPath": "shared/asapo-token.txt",
        "endpoint": "asapo-services.example.org:8400",
    },
    "beamline": "p11",
    "beamlineAlias": "P11",
    "beamlineSetup": "free text",
    "beamtimeId": "11019999",
    "contact": "None",
    "corePath": "/asap3/petra3/gpfs/p11/2024/data/11019999",
    "eventEnd": "2024-05-03 09:00:00",
    "eventStart": "2024-05-01 09:00:00",
    "facility": "PETRA III",
    "generated": "2024-04-30 15:12:44",
    "leader": {"email": "l@example.org", "userId": "100002", "username": "rroe"},
    "onlineAnalysis": {
        "reservedNodes": ["max-p3a001", "max-p3a002", "max-p3a003", "max-p3a004"],
        "slurmPartition": "ponline_p11",
        "slurmReservation": "11019999",
        "sshPrivateKeyPath": "shared/id_rsa",
        "sshPublicKeyPath": "shared/id_rsa.pub",
        "userAccount": "bttest02",
    },
    "pi": {"email": "p@example.org", "userId": "100003", "username": "ppoe"},
    "proposalId": "20240001",
    "proposalType": "I",
    "retentionPeriod": "default",
    "title": "Example experiment",
    "unixId": "None",
    "users": {"doorDb": ["jdoe", "rroe"], "special": [], "unknown": []},
}

#: The commissioning example of metadata-format.md, with the optional blocks added.
COMMISSIONING_DOC: dict[str, Any] = {
    "beamline": "P04",
    "corePath": "/asap3/petra3/gpfs/p04/2021/commissioning/c20210823_000_MAA",
    "generated": "2021-08-23 10:00:00",
    "id": "c20210823_000_MAA",
    "tag": "MAA",
    "onlineAnalysis": {
        "reservedNodes": ["max-p3a010", "max-p3a011"],
        "slurmPartition": "ponline_p04",
        "slurmReservation": "c20210823_000_MAA",
        "sshPrivateKeyPath": "shared/id_rsa",
        "userAccount": "commtest01",
    },
    "asapo": {
        "beamtimeClbtTokenPath": "shared/asapo-token-clbt.txt",
        "beamtimeTokenPath": "shared/asapo-token.txt",
        "endpoint": "asapo-services.example.org:8400",
    },
}


@dataclass
class Session:
    """One session tree: ``root`` is the tool's root dir, ``dir`` the session directory."""

    root: Path
    dir: Path
    metadata: Path
    doc: Any

    def rewrite(self, doc: Any) -> Path:
        """Replace the metadata file's contents (a JSON document, or raw ``bytes``)."""
        self.doc = doc
        write_document(self.metadata, doc)
        return self.metadata

    @property
    def key(self) -> Path:
        return self.dir / "shared" / "id_rsa"

    @property
    def token_rw(self) -> Path:
        return self.dir / "shared" / "asapo-token.txt"

    @property
    def token_ro(self) -> Path:
        return self.dir / "shared" / "asapo-token-clbt.txt"


def write_document(path: Path, doc: Any) -> None:
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def write_secret_files(session_dir: Path) -> None:
    """The key pair and the two token files the example documents name."""
    shared = session_dir / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    (shared / "id_rsa").write_text(KEY_SECRET)
    (shared / "id_rsa").chmod(0o600)
    (shared / "id_rsa.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI bttest02\n")
    (shared / "asapo-token.txt").write_text(TOKEN_RW_SECRET + "\n")
    (shared / "asapo-token-clbt.txt").write_text(TOKEN_RO_SECRET + "\n")


def build_session(
    root: Path,
    kind: str = "current",
    doc: Any = None,
    name: str | None = None,
    files: bool = True,
) -> Session:
    """Write ``root/local/`` and a ``root/<kind>/`` session holding ``doc`` and its files."""
    (root / "local").mkdir(parents=True, exist_ok=True)
    session_dir = root / kind
    session_dir.mkdir(parents=True, exist_ok=True)
    if doc is None:
        doc = copy.deepcopy(USER_DOC if kind == "current" else COMMISSIONING_DOC)
    if name is None:
        name = (
            f"beamtime-metadata-{USER_DOC['beamtimeId']}.json"
            if kind == "current"
            else f"commissioning-metadata-{COMMISSIONING_DOC['id']}.json"
        )
    if files:
        write_secret_files(session_dir)
    metadata = session_dir / name
    write_document(metadata, doc)
    return Session(root=root, dir=session_dir, metadata=metadata, doc=doc)


@pytest.fixture
def gpfs(tmp_path: Path) -> Path:
    """An empty root dir with only ``local/`` (which is never a session)."""
    root = tmp_path / "gpfs"
    (root / "local").mkdir(parents=True)
    return root


@pytest.fixture
def make_session(gpfs: Path) -> Callable[..., Session]:
    """``make_session(kind="current", doc=None, name=None, files=True)`` under ``gpfs``."""

    def make(kind: str = "current", doc: Any = None, **kwargs: Any) -> Session:
        return build_session(gpfs, kind, doc, **kwargs)

    return make


@pytest.fixture
def beamtime(make_session: Callable[..., Session]) -> Session:
    """A user beamtime (``current``) with onlineAnalysis and asapo blocks."""
    return make_session("current")


@pytest.fixture
def commissioning(make_session: Callable[..., Session]) -> Session:
    """A commissioning run (beamline written ``P04``) with onlineAnalysis and asapo blocks."""
    return make_session("commissioning")


@pytest.fixture
def secrets() -> tuple[str, ...]:
    """Strings from the key and token files: none may appear in any output or message."""
    return SECRETS


@pytest.fixture
def user_doc() -> dict[str, Any]:
    """A fresh copy of the user beamtime example document."""
    return copy.deepcopy(USER_DOC)


@pytest.fixture
def commissioning_doc() -> dict[str, Any]:
    """A fresh copy of the commissioning example document."""
    return copy.deepcopy(COMMISSIONING_DOC)


@pytest.fixture
def session_at() -> Callable[..., Session]:
    """``session_at(root, kind="current", doc=None, name=None, files=True)``: any root dir."""
    return build_session


# ------------------------------------------------------------------ deploy fixtures
# Node-local targets live on each node's private ``/srv/local`` tmpfs; shared targets
# in the lab user's home, which every node sees (like a cluster home).


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
