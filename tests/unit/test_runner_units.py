"""Pure logic of nodes, runner and gather: no SSH needed."""

from __future__ import annotations

import threading
from pathlib import Path

import paramiko
import pytest

from mento_fab import gather
from mento_fab.nodes import KnownHosts, SelectionError, fold, select_nodes
from mento_fab.remote import remote_command
from mento_fab.results import NodeResult, RunReport

RESERVED = ["max-p3a001", "max-p3a002", "max-p3a003", "max-p3a004"]


def test_fold_is_a_clustershell_node_set() -> None:
    assert fold(RESERVED) == "max-p3a[001-004]"
    assert fold(["cn02", "cn01", "cn02"]) == "cn[01-02]"


def test_select_defaults_to_the_whole_reservation_without_duplicates() -> None:
    assert select_nodes([*RESERVED, "max-p3a001"]) == RESERVED


def test_select_with_node_set_syntax_and_exclusion() -> None:
    assert select_nodes(RESERVED, "max-p3a[001-003]", "max-p3a002") == ["max-p3a001", "max-p3a003"]
    assert select_nodes(RESERVED, "max-p3a[001-004]!max-p3a001") == RESERVED[1:]


@pytest.mark.parametrize("chosen", ["max-p3a005", "max-p3a[003-006]", "other"])
def test_select_refuses_nodes_outside_the_reservation(chosen: str) -> None:
    with pytest.raises(SelectionError, match="not reserved"):
        select_nodes(RESERVED, chosen)


@pytest.mark.parametrize("chosen", ["cn[01-", "cn[3-1]"])
def test_select_reports_bad_syntax(chosen: str) -> None:
    with pytest.raises(SelectionError):
        select_nodes(["cn01"], chosen)


def test_select_refuses_an_empty_selection() -> None:
    with pytest.raises(SelectionError, match="no nodes"):
        select_nodes(RESERVED, exclude="max-p3a[001-004]")


def test_remote_command_quotes_env_and_wraps_timeout() -> None:
    line = remote_command("echo $X", {"X": "a b'c"}, 5, run_id="r1")
    assert "export MENTO_RUN_ID X='a b'\"'\"'c';" in line
    assert " timeout -k 1.5 5 " in line
    assert "-c 'echo $X'" in line
    assert remote_command("true", None, None, run_id="r1").endswith("; true")
    with pytest.raises(ValueError, match="environment variable"):
        remote_command("true", {"BAD NAME": "x"}, None)
    with pytest.raises(ValueError, match="set by mento_fab"):
        remote_command("true", {"MENTO_RUN_ID": "x"}, None)


def _report() -> RunReport:
    return RunReport(
        command="x",
        results=[
            NodeResult("cn01", exit=0, stdout="same\n"),
            NodeResult("cn02", exit=1, stdout="other\n", stderr="boom\n"),
            NodeResult("cn03", exit=0, stdout="same\n"),
            NodeResult("cn04", error="unreachable: connection refused"),
            NodeResult("cn05", error="unreachable: connection refused"),
            NodeResult("cn06", exit=2),
        ],
    )


def test_exit_status_is_the_largest_with_unreachable_as_255() -> None:
    rep = _report()
    assert rep.exit_status == 255
    rep.results = [r for r in rep.results if r.error is None]
    assert rep.exit_status == 2
    assert RunReport("x", [NodeResult("a", exit=0)]).exit_status == 0


def test_summary_line_and_problems() -> None:
    rep = _report()
    assert gather.summary_line(rep) == (
        "6 nodes: 2 ok, 2 failed (cn02 exit 1, cn06 exit 2), 2 unreachable (cn[04-05])"
    )
    assert gather.problems(rep) == ["cn[04-05]: unreachable: connection refused"]


def test_gathered_folds_identical_output_in_node_order() -> None:
    rep = _report()
    assert list(gather.gathered(rep.results)) == [("cn[01,03]", "same"), ("cn02", "other")]
    assert list(gather.gathered(rep.results, "stderr")) == [("cn02", "boom")]


def test_json_shape() -> None:
    data = _report().as_json()
    assert set(data) == {"command", "nodes", "summary"}
    assert set(data["nodes"][0]) == {
        "node", "exit", "stdout", "stderr", "error", "message", "seconds"
    }  # fmt: skip
    unreachable = data["nodes"][3]
    assert unreachable["exit"] is None and unreachable["error"]
    assert data["summary"]["exit_status"] == 255
    assert data["summary"]["unreachable"] == 2


def test_known_hosts_appends_concurrently_without_losing_lines(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "known_hosts"
    known = KnownHosts(path)
    key = paramiko.RSAKey.generate(1024)
    threads = [
        threading.Thread(target=known.add, args=([f"cn{i:02d}", f"10.0.0.{i}"], key))
        for i in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 20
    reread = KnownHosts(path, system_files=())
    assert reread.lookup(["10.0.0.7"])[key.get_name()] == [key]
    assert reread.lookup(["cn99"]) == {}


def test_known_hosts_reads_system_files_and_never_writes_them(tmp_path: Path) -> None:
    system = tmp_path / "ssh_known_hosts"
    published = paramiko.RSAKey.generate(1024)
    system.write_text(f"cn01 {published.get_name()} {published.get_base64()}\n")
    known = KnownHosts(tmp_path / "user_known_hosts", system_files=[str(system)])
    assert known.lookup(["cn01"]) == {published.get_name(): [published]}
    other = paramiko.RSAKey.generate(1024)
    known.add(["cn02"], other)
    assert "cn02" not in system.read_text()
    assert "cn02" in (tmp_path / "user_known_hosts").read_text()


def test_an_unwritable_known_hosts_names_the_file(tmp_path: Path) -> None:
    from mento_fab.nodes import HostKeyRefused

    known = KnownHosts(tmp_path, system_files=())  # a directory: cannot append
    with pytest.raises(HostKeyRefused, match=f"cannot record the host key of cn01 in {tmp_path}"):
        known.add(["cn01"], paramiko.RSAKey.generate(1024))


def test_describe_error_never_leaves_an_empty_reason() -> None:
    from mento_fab.connection import describe_error

    assert describe_error(EOFError()) == "connection closed by the node"
    assert describe_error(KeyError()) == "KeyError"


def test_map_nodes_with_nothing_to_do_returns_nothing() -> None:
    from mento_fab.runner import map_nodes

    assert map_nodes([], lambda conn: 1) == {}
    with pytest.raises(ValueError, match="fanout"):
        map_nodes([], lambda conn: 1, fanout=0)


def test_capture_keeps_the_head_counts_the_rest_and_never_splits_a_character() -> None:
    from mento_fab.output import Capture

    kept = Capture(limit=4)
    kept.feed("aé€".encode())  # 1 + 2 + 3 bytes: the euro sign does not fit
    kept.feed(b"more")
    assert (kept.text(), kept.dropped) == ("aé", 3 + 4)
    nothing = Capture(limit=0)
    nothing.feed(b"abc")
    assert (nothing.text(), nothing.dropped) == ("", 3)


def test_line_splitter_hands_on_long_lines_in_pieces_with_bounded_memory() -> None:
    import tracemalloc

    from mento_fab.output import PIECE, LineSplitter

    pieces: list[int] = []
    splitter = LineSplitter(lambda text: pieces.append(len(text)))
    chunk = b"x" * 65536
    tracemalloc.start()
    try:
        for _ in range(320):  # one 20 MiB line
            splitter.feed(chunk)
        splitter.feed(b"\nend")
        splitter.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(pieces[:-1]) == 320 * 65536 and pieces[-1] == 3
    assert len(pieces) > 2 and max(pieces) < 2 * PIECE
    assert peak < 4 * PIECE + 3 * 65536  # the line was never held whole


def test_line_splitter_keeps_characters_and_empty_lines_whole() -> None:
    from mento_fab.output import LineSplitter

    lines: list[str] = []
    splitter = LineSplitter(lines.append, piece=1)
    data = "é€\n\nab".encode()
    for i in range(len(data)):  # byte by byte: characters arrive cut
        splitter.feed(data[i : i + 1])
    splitter.close()
    assert lines == ["é", "€", "", "a", "b"]


def test_dropped_output_is_reported_per_stream_with_nodes_folded() -> None:
    rep = RunReport(
        "x",
        [
            NodeResult("cn01", exit=0, stdout_dropped=5 * 2**20),
            NodeResult("cn02", exit=0, stdout_dropped=5 * 2**20),
            NodeResult("cn03", exit=0, stderr_dropped=1000),
        ],
    )
    assert gather.dropped(rep) == [
        "cn[01-02]: 5 MiB of stdout not kept (over the output limit)",
        "cn03: 1000 B of stderr not kept (over the output limit)",
    ]
    assert rep.as_json()["nodes"][2]["dropped"] == {"stdout": 0, "stderr": 1000}
