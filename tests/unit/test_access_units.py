"""Pure logic of put/get/tunnel: remote paths and patterns, tar streams, ports, HTML reports."""

from __future__ import annotations

import doctest
import io
import os
import tarfile
from pathlib import Path

import pytest

from mento_fab import remotefs, tarstream
from mento_fab.errors import BadPath, BadPort, LocalExists
from mento_fab.remotefs import glob_word, parse_listing, parse_probe, remote_path, split_pattern
from mento_fab.results import NodeResult, RunReport
from mento_fab.tarstream import UnsafeArchive, extract, scan, write_tar
from mento_fab.tunnel import check_port


def test_doctests() -> None:
    for module in (remotefs, tarstream):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize(
    ("remote", "expected"),
    [
        ("~/a/b.h5", ("a", "b.h5")),
        ("b.h5", (".", "b.h5")),
        ("~/scans/run*/out.h5", ("scans", "run*/out.h5")),
        ("/srv/local/run[12]/x", ("/srv/local", "run[12]/x")),
        ("/*/x", ("/", "*/x")),
        ("~/results/", (".", "results")),
        ("/a/../b/c", ("/a/../b", "c")),  # '..' before the wildcard part stays on the node
    ],
)
def test_split_pattern(remote: str, expected: tuple[str, str]) -> None:
    assert split_pattern(remote) == expected


@pytest.mark.parametrize("remote", ["", "/", "~", "~/..", "a/..", "a/*/../b", "~root/x", "a\nb"])
def test_split_pattern_refuses(remote: str) -> None:
    with pytest.raises(BadPath):
        split_pattern(remote)


def test_remote_path_is_home_relative() -> None:
    assert [remote_path(p) for p in ("~", "~/", "~/x", "x", "/abs")] == [".", ".", "x", "x", "/abs"]


def test_glob_word_quotes_everything_but_wildcards(tmp_path: Path) -> None:
    import subprocess

    names = ["a b*", "$(touch PWNED)", "it's", "run1", "run2", "x[1]"]
    for name in names:
        (tmp_path / name).write_text("")
    cases = [
        ("run*", ["run1", "run2"]),
        ("run?", ["run1", "run2"]),
        ("run[2]", ["run2"]),
        ("$(touch PWNED)", ["$(touch PWNED)"]),
        ("it's", ["it's"]),
        ("a b*", ["a b*"]),
    ]
    for pattern, want in cases:
        out = subprocess.run(
            ["sh", "-c", f"for p in {glob_word(pattern)}; do printf '%s\\n' \"$p\"; done"],
            cwd=tmp_path, capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert out == want, pattern
    assert not (tmp_path / "PWNED").exists()


def test_parse_probe() -> None:
    text = "state=ok\ncase=dir\nthere=none\nwritable=yes\npwd=/srv/local/x\n"
    target = parse_probe(text, "/srv/local/x", "data.bin")
    assert (target.into, target.name, target.writable) == ("/srv/local/x", "data.bin", True)
    target = parse_probe(text.replace("case=dir", "case=new"), "/srv/local/x", "data.bin")
    assert (target.into, target.name) == ("/srv/local", "x")
    assert parse_probe("state=nodir\n", "/srv/local/x", "d") is None


def test_parse_listing_keeps_odd_bytes() -> None:
    items = parse_listing(b"d 60 ./run1\0f 3 ./run1/a b\nc\0f 2 ./caf\xe9\0")
    found = [(i.kind, i.size, i.name) for i in items[:2]]
    assert found == [("d", 60, "run1"), ("f", 3, "run1/a b\nc")]
    assert os.fsencode(items[2].name) == b"caf\xe9"


# ------------------------------------------------------------------ tar streams


def _roundtrip(src: Path, dest: Path, **kw: object) -> tarstream.ExtractStats:
    entries, _ = scan(src, src.name)
    buf = io.BytesIO()
    assert write_tar(entries, buf.write) == []
    buf.seek(0)
    return extract(buf, dest, **kw)  # type: ignore[arg-type]


def test_scan_follows_links_and_skips_loops_and_dangling(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    (src / "loop").symlink_to(".")
    (src / "dangling").symlink_to("nowhere")
    (src / "link").symlink_to("d/f")
    os.mkfifo(src / "fifo")
    entries, skipped = scan(src, "src")
    assert sorted(e.name for e in entries) == ["src", "src/d", "src/d/f", "src/link"]
    assert len(skipped) == 3 and any("loop" in s for s in skipped)
    with pytest.raises(BadPath):
        scan(tmp_path / "missing", "x")


def test_extract_writes_complete_files_and_never_overwrites(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a").write_bytes(os.urandom(3_000_000))
    (src / "b").write_text("b")
    dest = tmp_path / "dest"
    stats = _roundtrip(src, dest)
    assert (stats.files, stats.bytes) == (2, 3_000_001)
    assert (dest / "src" / "sub" / "a").read_bytes() == (src / "sub" / "a").read_bytes()
    (src / "b").write_text("new")
    with pytest.raises(LocalExists):
        _roundtrip(src, dest)
    assert (dest / "src" / "b").read_text() == "b"
    _roundtrip(src, dest, overwrite=True)
    assert (dest / "src" / "b").read_text() == "new"
    assert not list(dest.rglob("*.mento-part-*"))


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name", ["../evil", "a/../../evil"])
def test_extract_refuses_members_outside(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeArchive):
        extract(_tar((tarfile.TarInfo(name), b"x")), tmp_path / "dest")
    assert not list(tmp_path.rglob("evil"))


def test_absolute_names_land_inside(tmp_path: Path) -> None:
    extract(_tar((tarfile.TarInfo("/etc/evil"), b"x")), tmp_path / "dest")
    assert (tmp_path / "dest" / "etc" / "evil").read_bytes() == b"x"


def test_extract_never_creates_links_or_specials(tmp_path: Path) -> None:
    link = tarfile.TarInfo("out")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    stats = extract(_tar((link, b""), (tarfile.TarInfo("out/passwd"), b"x")), tmp_path / "d1")
    assert not (tmp_path / "d1" / "out").is_symlink()
    assert (tmp_path / "d1" / "out" / "passwd").read_bytes() == b"x"
    assert stats.skipped == ["out: not a regular file"]
    fifo = tarfile.TarInfo("fifo")
    fifo.type = tarfile.FIFOTYPE
    stats = extract(_tar((fifo, b""), (tarfile.TarInfo("ok"), b"y")), tmp_path / "d2")
    assert stats.files == 1 and stats.skipped == ["fifo: not a regular file"]


def test_extract_never_writes_through_a_local_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UnsafeArchive, match="outside"):
        extract(_tar((tarfile.TarInfo("sub/f"), b"x")), dest)
    assert not (outside / "f").exists()


def test_extract_refuses_secret_content(tmp_path: Path) -> None:
    import hashlib

    secret = b"-----KEY-----"
    refuse = {len(secret): {hashlib.sha256(secret).hexdigest(): "the SSH private key"}}
    stats = extract(_tar((tarfile.TarInfo("k"), secret), (tarfile.TarInfo("x" * 13), b"z" * 13)),
                    tmp_path / "d", refuse=refuse)  # fmt: skip
    assert not (tmp_path / "d" / "k").exists() and (tmp_path / "d" / ("x" * 13)).exists()
    assert stats.skipped == ["k: not written (same content as the SSH private key)"]


def test_a_truncated_stream_raises(tmp_path: Path) -> None:
    data = _tar((tarfile.TarInfo("big"), os.urandom(100_000))).getvalue()
    with pytest.raises(tarfile.ReadError):
        extract(io.BytesIO(data[:50_000]), tmp_path / "d")
    assert not list((tmp_path / "d").iterdir())  # no half file, no temporary file


@pytest.mark.parametrize("value", ["0", "65536", "-1", "http", "", "8888.5"])
def test_ports_out_of_range_are_bad_input(value: str) -> None:
    with pytest.raises(BadPort):
        check_port(value, "port")
    assert check_port("0", "port", allow_zero=True) == 0
    assert check_port(8888, "port") == 8888


def test_run_report_renders_as_html() -> None:
    report = RunReport("get <x> out", [NodeResult("cn01", exit=0, message="1 file -> out/<cn01>"),
                                       NodeResult("cn02", error="connection lost")])  # fmt: skip
    text = report._repr_html_()
    assert text.startswith("<table>") and text.count("<tr>") == 3
    assert "&lt;x&gt;" in text and "out/&lt;cn01&gt;" in text and "connection lost" in text
    assert "<x>" not in text and "<cn01>" not in text
