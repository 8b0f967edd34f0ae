"""Bounded output: what is kept per node and stream, what is dropped and said, --stream.

Memory is measured as the peak RSS of the command-line process, never by timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from mento_fab import defaults
from mento_fab.output import PIECE

MiB = 1024 * 1024
TIME = "/usr/bin/time"  # Debian package "time", installed by .ci/setup
# 37-byte lines: many lines is what costs memory per line when gathering
LINES = "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}"


@dataclass
class Outcome:
    returncode: int
    stdout: bytes
    stderr: str
    peak_mib: float


def mento_peak(env: dict[str, str], tmp_path: Path, *args: str) -> Outcome:
    """Run the command line; its output and its peak resident memory.

    Under ``/usr/bin/time``: a child measured with ``wait4`` from here would start
    from this test process's own high-water mark (the kernel keeps it across exec).
    """
    peak = tmp_path / "peak"
    proc = subprocess.Popen(
        [TIME, "-f", "%M", "-o", str(peak), sys.executable, "-m", "mento_fab", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def drain(name: str) -> None:
        stream = getattr(proc, name)
        while chunk := stream.read(1 << 20):
            chunks[name].append(chunk)

    readers = [threading.Thread(target=drain, args=(n,)) for n in chunks]
    for reader in readers:
        reader.start()
    proc.wait()
    for reader in readers:
        reader.join()
    return Outcome(
        proc.returncode,
        b"".join(chunks["stdout"]),
        b"".join(chunks["stderr"]).decode(),
        int(peak.read_text().split()[-1]) / 1024,  # KiB
    )


@pytest.fixture
def cli_env(lab, lab_session) -> dict[str, str]:
    return {
        **os.environ,
        "MENTO_METADATA": str(lab_session),
        "MENTO_SSH_CONFIG": str(lab.ssh_config),
    }


def test_gathered_output_is_capped_per_node_and_what_was_dropped_is_said(
    lab, cli_env, tmp_path
) -> None:
    size = 100_000_000
    out = mento_peak(
        cli_env, tmp_path, "run-on-nodes", "--nodes", "cn01", "--known-hosts", str(lab.known_hosts),
        LINES.format(size=size),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    body = out.stdout.split(b"\n", 3)[3]  # after the cn01 header
    assert len(body) <= defaults.MAX_OUTPUT + 1
    assert body.startswith(b"0123456789abcdefghijklmnopqrstuvwxyz\n")
    dropped = (size - defaults.MAX_OUTPUT) / MiB
    assert f"cn01: {dropped:.1f} MiB of stdout not kept (over the output limit)" in out.stderr
    assert "1 node: 1 ok" in out.stderr
    # Kept without a limit, and gathered line by line, this took 1.7 GB.
    assert out.peak_mib < 250, out.peak_mib


def test_max_output_and_json_count_the_dropped_bytes(lab, cli_env, tmp_path) -> None:
    size = 40_000_000
    out = mento_peak(
        cli_env, tmp_path, "run-on-nodes", "--json", "--max-output", "1M", "--nodes", "cn[01-02]",
        "--known-hosts", str(lab.known_hosts),
        LINES.format(size=size) + "; " + LINES.format(size=1000) + " >&2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout)["nodes"]
    for node in nodes:
        assert len(node["stdout"]) == MiB
        assert node["dropped"] == {"stdout": size - MiB, "stderr": 0}
        assert len(node["stderr"]) == 1000
    assert out.peak_mib < 200, out.peak_mib  # 40 MB twice, kept whole: more than 300 MB
    bad = mento_peak(cli_env, tmp_path, "run-on-nodes", "--max-output", "lots", "true")
    assert bad.returncode == 2 and "--max-output" in bad.stderr


def test_stream_keeps_nothing_and_prints_a_huge_line_in_pieces(lab, cli_env, tmp_path) -> None:
    size = 60_000_000
    out = mento_peak(
        cli_env, tmp_path, "run-on-nodes", "--stream", "--nodes", "cn01",
        "--known-hosts", str(lab.known_hosts),
        f"head -c {size} /dev/zero | tr '\\0' x; echo; echo after",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split(b"\n")
    assert lines[-2:] == [b"cn01: after", b""]
    pieces = lines[:-2]
    assert all(p.startswith(b"cn01: ") for p in pieces)
    assert sum(len(p) - len(b"cn01: ") for p in pieces) == size
    assert len(pieces) > 1 and max(len(p) for p in pieces) <= 2 * PIECE + 100
    assert "not kept" not in out.stderr  # printed is not dropped
    # The old line splitter held the growing line and the run kept the output: 400 MB
    # and minutes (it was quadratic in the line's length).
    assert out.peak_mib < 150, out.peak_mib
