"""A deploy source holding the beamtime's key or a token is refused, whatever the bytes
around it (issue 8, item 2); nothing derived from a secret is ever written to disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from deploy_helpers import make_project

from mento_fab.deployment import UnsafeSourceError, deploy, digests


def _disguises(beamtime) -> dict[str, str]:
    key = beamtime.key.read_text()
    token = beamtime.token_rw.read_text()  # the file ends with a newline
    return {
        "token.txt": token.strip(),  # no newline: not the same bytes as the file
        "token-lines.txt": "\n\n" + token.strip() + "\r\n\r\n",
        "id_rsa.crlf": key.replace("\n", "\r\n"),
        "config.yaml": f"asapo:\n  endpoint: x:8400\n  token: {token.strip()}  # pasted\n",
        "key.yaml": "ssh_key: |\n" + textwrap.indent(key, "    "),
        "clbt.json": json.dumps({"token": beamtime.token_ro.read_text().strip()}),
        # a key inside a JSON string: its line breaks become the two bytes \\n
        "key.json": json.dumps({"key": key}),
        "key-crlf.json": json.dumps({"key": key.replace("\n", "\r\n")}),
        "key-twice.json": json.dumps(json.dumps({"key": key})),  # \\\\n
        "key.env": "SSH_KEY='" + key.replace("\n", "\\n") + "'\n",
        "token.json": json.dumps({"t": token.strip()[:5] + "\r\n" + token.strip()[5:]}),
    }


def test_a_secret_inside_any_file_is_refused_naming_the_file(beamtime, secrets, tmp_path):
    for name, text in _disguises(beamtime).items():
        src = make_project(tmp_path / name)
        (src / "conf").mkdir()
        (src / "conf" / name).write_bytes(text.encode())
        with pytest.raises(UnsafeSourceError) as caught:
            deploy([], beamtime.metadata, src, "~/x")
        message = str(caught.value)
        assert f"conf/{name}: contains" in message and "refusing to ship" in message, message
        assert "\n" not in message
        assert not any(secret in message for secret in secrets)


def test_an_escaped_line_break_split_between_two_reads_is_still_seen(tmp_path, monkeypatch):
    """Files are read in pieces: ``\\`` ending one piece and ``n`` starting the next."""
    from mento_fab.deployment import secrets as module

    monkeypatch.setattr(module, "_READ", 4)
    scan = module.SecretScan({}, [(b"ABCDEFGHIJ", "an ASAPO token (t)")])
    for offset in range(6):
        path = tmp_path / f"f{offset}"
        path.write_bytes(b"x" * offset + b'{"t": "ABC\\\\nDEF\\r\\nGHIJ"}')
        assert scan.find_in_file(str(path)) == "an ASAPO token (t)", offset
    (tmp_path / "clean").write_bytes(b'"ABC\\nDEF\\nGHI"')  # one character short
    assert scan.find_in_file(str(tmp_path / "clean")) is None


def test_a_file_merely_like_a_secret_is_shipped(beamtime, tmp_path):
    src = make_project(tmp_path / "p")
    token = beamtime.token_rw.read_text().strip()
    (src / "almost.txt").write_text(token[:-1] + "\n")  # one character short
    with pytest.raises(UnsafeSourceError):  # sanity: the whole token is found
        (src / "whole.txt").write_text(token)
        deploy([], beamtime.metadata, src, "~/x", dry_run=True)
    (src / "whole.txt").unlink()
    report = deploy([], beamtime.metadata, src, "~/x", dry_run=True)
    assert report.outcome == "unchanged"  # no nodes: nothing to do, nothing refused


def test_the_digest_cache_never_keeps_a_digest_of_a_secret(
    beamtime, tmp_path, private_home, monkeypatch
):
    monkeypatch.setattr(digests, "RACY_NS", 0)  # remember digests of files written just now
    monkeypatch.delenv("MENTO_DIGEST_CACHE", raising=False)
    forbidden = {
        hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (beamtime.key, beamtime.token_rw, beamtime.token_ro)
    }
    cache = private_home / ".cache" / "mento_fab" / "digests"

    def cached() -> str:
        return "".join(p.read_text() for p in cache.glob("*.json")) if cache.is_dir() else ""

    # the session directory itself (key and tokens in shared/): refused, nothing kept
    with pytest.raises(UnsafeSourceError):
        deploy([], beamtime.metadata, beamtime.dir, "~/x")
    assert not any(d in cached() for d in forbidden)
    # a tree with a renamed copy of the key: refused, nothing kept
    src = make_project(tmp_path / "p")
    (src / "backup").write_bytes(beamtime.key.read_bytes())
    with pytest.raises(UnsafeSourceError):
        deploy([], beamtime.metadata, src, "~/x")
    assert not any(d in cached() for d in forbidden)
    # the same tree without it: its digests are kept (and are no secret's)
    (src / "backup").unlink()
    deploy([], beamtime.metadata, src, "~/x")
    assert cached() and not any(d in cached() for d in forbidden)


def test_cli_refuses_a_pasted_token_in_one_line(beamtime, secrets, tmp_path):
    src = make_project(tmp_path / "p")
    (src / "config.yaml").write_text(_disguises(beamtime)["config.yaml"])
    env = {k: v for k, v in os.environ.items() if k != "MENTO_METADATA"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mento_fab",
            "deploy",
            "--metadata",
            str(beamtime.metadata),
            "--source",
            str(src),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        len(proc.stderr.splitlines()) == 1 and "config.yaml: contains an ASAPO token" in proc.stderr
    )
    assert not any(secret in proc.stderr for secret in secrets)
    assert Path(src / "config.yaml").exists()
