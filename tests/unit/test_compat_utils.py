"""mento_fab.utils and the two command builders against the original (desy-mento 0.2.2).

Path helpers that create directories run each package in its own copy of the
tree; results are compared with the tree's root taken out. Differences are
``path-…``/``cmd-…`` rows of the table in docs/compatibility.md.
"""

from __future__ import annotations

import copy
import os
import shlex
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mento
import mento.trigger
import mento.utils
import pytest
from compat_support import Outcome, assert_documented_error, assert_same, call, documented_cases

import mento_fab
import mento_fab.trigger
import mento_fab.utils
from mento_fab.errors import NoOnlineAnalysis, SelectionError

CORE = "/asap3/petra3/gpfs/p11/2024/data/11019999"
DATA = "/gpfs/current/raw/scan_042/img_0001.h5"
RESULTS = "/gpfs/current/processed/onlineanalysis/scan_042/img_0001_results.h5"


# ---------------------------------------------------------------------------- pure path mapping

PURE_CASES: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = [
    ("core-default", "get_path_core", (DATA, CORE), {}),
    ("core-split-at-processed", "get_path_core", (RESULTS, CORE), {"split_at": "processed"}),
    ("core-split-positional", "get_path_core", (RESULTS, CORE, "processed"), {}),
    ("core-first-occurrence", "get_path_core", ("/gpfs/current/raw/a/raw/b.h5", CORE), {}),
    ("core-relative-path", "get_path_core", ("current/raw/b.h5", CORE), {}),
    ("core-path-objects", "get_path_core", (Path(DATA), Path(CORE)), {}),
    ("core-empty-remote-dir", "get_path_core", (DATA, ""), {}),
    ("core-no-raw", "get_path_core", ("/gpfs/current/scratch/a.h5", CORE), {}),
    ("core-raw-is-a-prefix", "get_path_core", ("/gpfs/current/rawdata/a.h5", CORE), {}),
    ("core-split-at-the-file", "get_path_core", (DATA, CORE), {"split_at": "img_0001.h5"}),
    ("mount-default", "get_path_mountpoint", (RESULTS, "/beamline/p11"), {}),
    (
        "mount-commissioning",
        "get_path_mountpoint",
        ("/gpfs/commissioning/processed/x.h5", "/beamline/p04"),
        {"split_at": "commissioning"},
    ),
    ("mount-no-processed", "get_path_mountpoint", (DATA, "/beamline/p11"), {}),
    ("mount-path-objects", "get_path_mountpoint", (Path(RESULTS), Path("/beamline/p11")), {}),
]


@pytest.mark.parametrize(
    ("name", "args", "kwargs"), [c[1:] for c in PURE_CASES], ids=[c[0] for c in PURE_CASES]
)
def test_path_mapping_as_the_original(name: str, args: tuple, kwargs: dict) -> None:
    assert_same(
        call(getattr(mento.utils, name), *args, **kwargs),
        call(getattr(mento_fab.utils, name), *args, **kwargs),
    )


def test_an_unmappable_path_is_also_bad_input() -> None:
    with pytest.raises(FileNotFoundError) as info:
        mento_fab.utils.get_path_core("/gpfs/current/scratch/a.h5", CORE)
    assert isinstance(info.value, ValueError)
    assert "'raw'" in str(info.value) and "/gpfs/current/scratch/a.h5" in str(info.value)


# ---------------------------------------------------------------------------- remote_dir left out


@pytest.fixture
def active(beamtime, monkeypatch) -> Any:
    """The active session is the test's tree (as MENTO_ROOT_DIR would say)."""
    monkeypatch.delenv("MENTO_METADATA", raising=False)
    monkeypatch.setenv("MENTO_ROOT_DIR", str(beamtime.root))
    return beamtime


def test_path_remote_dir_omitted(active) -> None:
    """path-remote-dir-omitted: the original raises TypeError; here it comes from the metadata."""
    core = active.doc["corePath"]
    theirs = call(mento.utils.get_path_core, DATA, None)
    assert theirs.crashed
    assert mento_fab.utils.get_path_core(DATA) == mento.utils.get_path_core(DATA, core)
    assert mento_fab.utils.get_path_core(DATA, None) == f"{core}/raw/scan_042/img_0001.h5"
    assert call(mento.utils.get_path_mountpoint, RESULTS, None).crashed
    expected = mento.utils.get_path_mountpoint(RESULTS, "/beamline/p11")
    assert mento_fab.utils.get_path_mountpoint(RESULTS) == expected


def test_path_remote_dir_omitted_without_reserved_nodes(active) -> None:
    doc = copy.deepcopy(active.doc)
    del doc["onlineAnalysis"]
    active.rewrite(doc)
    with pytest.raises(NoOnlineAnalysis, match="no onlineAnalysis block"):
        mento_fab.utils.get_path_mountpoint(RESULTS)
    assert mento_fab.utils.get_path_core(DATA).startswith(doc["corePath"])


def test_remote_dir_omitted_in_a_commissioning_run_maps_to_commissioning(
    commissioning, monkeypatch
) -> None:
    monkeypatch.delenv("MENTO_METADATA", raising=False)
    monkeypatch.setenv("MENTO_ROOT_DIR", str(commissioning.root))
    results = "/gpfs/commissioning/processed/onlineanalysis/x_results.h5"
    expected = "/beamline/p04/commissioning/processed/onlineanalysis/x_results.h5"
    assert mento_fab.utils.get_path_mountpoint(results) == expected
    assert mento_fab.utils.get_path_mountpoint(results, split_at="current").startswith(
        "/beamline/p04/current/"
    )  # a value the caller gives is used as it is


def test_the_active_session_is_read_on_every_call(active) -> None:
    doc = copy.deepcopy(active.doc)
    assert mento_fab.utils.get_path_core(DATA).startswith(doc["corePath"] + "/")
    doc["corePath"] = "/asap3/petra3/gpfs/p11/2024/data/11020000"
    active.rewrite(doc)
    assert mento_fab.utils.get_path_core(DATA).startswith(doc["corePath"] + "/")


# ---------------------------------------------------------------------------- directories


def _tree(base: Path) -> Path:
    (base / "gpfs" / "current" / "raw" / "scan_042").mkdir(parents=True)
    return base / "gpfs"


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_dir()
    }


DIR_CASES: list[tuple[str, str, Callable[[Path], tuple], dict[str, Any]]] = [
    (
        "results-default",
        "prepare_results_filename",
        lambda g: (f"{g}/current/raw/scan_042/img_0001.h5",),
        {},
    ),
    (
        "results-multi-suffix",
        "prepare_results_filename",
        lambda g: (f"{g}/current/raw/scan_042/img.tar.gz",),
        {},
    ),
    ("results-no-suffix", "prepare_results_filename", lambda g: (f"{g}/current/raw/scan",), {}),
    ("results-hidden-file", "prepare_results_filename", lambda g: (f"{g}/current/raw/.h5",), {}),
    (
        "results-path-object",
        "prepare_results_filename",
        lambda g: (g / "current" / "raw" / "scan_042" / "a.h5",),
        {},
    ),
    (
        "results-data-root",
        "prepare_results_filename",
        lambda g: (f"{g}/current/raw/scan_042/a.h5",),
        {"data_root": "scan_042"},
    ),
    (
        "results-results-root",
        "prepare_results_filename",
        lambda g: (f"{g}/current/raw/scan_042/a.h5", None, "processed/mine"),
        {},
    ),
    (
        "results-absolute-results-root",
        "prepare_results_filename",
        lambda g: (f"{g}/current/raw/scan_042/a.h5", None, f"{g}/elsewhere"),
        {},
    ),
    (
        "results-empty-roots",
        "prepare_results_filename",
        lambda g: (f"{g}/current/raw/scan_042/a.h5", "", ""),
        {},
    ),
    ("results-no-raw", "prepare_results_filename", lambda g: (f"{g}/current/a.h5",), {}),
    ("results-raw-is-the-file", "prepare_results_filename", lambda g: (f"{g}/current/raw",), {}),
    (
        "results-not-writable-parent",
        "prepare_results_filename",
        lambda g: (f"{g}/current/raw/scan_042/a.h5", None, "/proc/mento/results"),
        {},
    ),
    ("dir-new", "make_writable_dir", lambda g: (g / "a" / "b" / "c",), {}),
    ("dir-existing", "make_writable_dir", lambda g: (g / "current",), {}),
    ("dir-str", "make_writable_dir", lambda g: (f"{g}/current/new",), {}),
    ("dir-is-a-file", "make_writable_dir", lambda g: (g / "file",), {}),
    ("dir-under-a-file", "make_writable_dir", lambda g: (g / "file" / "sub",), {}),
]


@pytest.mark.parametrize(
    ("name", "args", "kwargs"), [c[1:] for c in DIR_CASES], ids=[c[0] for c in DIR_CASES]
)
def test_directories_as_the_original(tmp_path, name, args, kwargs) -> None:
    old_umask = os.umask(0o022)  # the restrictive umask the original's chmod is there for
    try:
        outcomes, modes = [], []
        for package, side in ((mento.utils, "theirs"), (mento_fab.utils, "ours")):
            gpfs = _tree(tmp_path / side)
            (gpfs / "current").chmod(0o755)
            (gpfs / "file").write_text("x")
            outcome = call(getattr(package, name), *args(gpfs), **kwargs)
            if isinstance(outcome.value, str):
                outcome.value = outcome.value.replace(str(tmp_path / side), "<tmp>")
            outcomes.append(outcome)
            modes.append(_modes(tmp_path / side))
    finally:
        os.umask(old_umask)
    assert_same(*outcomes)
    assert modes[0] == modes[1]


def test_make_writable_dir_gives_the_leaf_mode_0777(tmp_path) -> None:
    old_umask = os.umask(0o077)
    try:
        mento_fab.utils.make_writable_dir(tmp_path / "a" / "b")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o777
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700


# ---------------------------------------------------------------------------- command builders


def _metadata(
    package: Any,
    *,
    online: bool = True,
    nodes: list[str] | None = None,
    key: str = "/gpfs/current/shared/id_rsa",
) -> Any:
    """The same BeamtimeMetadata, built from the package's own dataclasses."""
    md = package.metadata if package is mento else mento_fab
    info = md.OnlineInfo(
        ssh=md.SSHInfo(user="bttest02", key=key),
        slurm=md.SlurmInfo(partition="ponline_p11", reservation="11019999"),
        nodes=["max-p3a001", "max-p3a002"] if nodes is None else nodes,
        blfs_mountpoint="/beamline/p11",
    )
    return md.BeamtimeMetadata("p11", "11019999", CORE, "current", info if online else None)


def _host_keys_checked(theirs: Outcome, ours: Outcome) -> None:
    """cmd-ssh-host-keys: the only difference in every ssh command."""
    assert theirs.value.count("StrictHostKeyChecking=no") == 1
    assert ours.value == theirs.value.replace(
        "StrictHostKeyChecking=no", "StrictHostKeyChecking=accept-new"
    )


SSH_CASES: list[tuple[str, dict[str, Any], dict[str, Any], Any]] = [
    ("cmd-ssh-host-keys", {}, {}, _host_keys_checked),
    ("ssh-destination", {}, {"destination": "max-p3a002"}, _host_keys_checked),
    ("ssh-destination-fqdn", {}, {"destination": "max-p3a009.desy.de"}, _host_keys_checked),
    ("ssh-empty-destination", {}, {"destination": ""}, _host_keys_checked),
    ("cmd-ssh-hostile-destination", {}, {"destination": "-oProxyCommand=x"}, SelectionError),
    ("cmd-ssh-user-at-destination", {}, {"destination": "root@max-p3a001"}, SelectionError),
    ("cmd-ssh-no-online", {"online": False}, {}, NoOnlineAnalysis),
    ("cmd-ssh-no-nodes", {"nodes": []}, {}, SelectionError),
    ("cmd-ssh-key-path-with-space", {"key": "/gpfs/current/my dir/id_rsa"}, {}, None),
]
SBATCH_CASES: list[tuple[str, dict[str, Any], dict[str, Any], Any]] = [
    ("sbatch-defaults", {}, {}, None),
    (
        "sbatch-everything",
        {},
        {
            "job_name": "scan42",
            "job_maxtime": "0-01:00",
            "job_dependency": "afterok:123",
            "logfile_path": "/tmp/x.log",
        },
        None,
    ),
    ("sbatch-positional", {}, {"__args__": ("scan42", "10", "singleton", "/tmp/x.log")}, None),
    ("sbatch-empty-strings", {}, {"job_name": "", "job_maxtime": "", "logfile_path": ""}, None),
    ("cmd-sbatch-no-online", {"online": False}, {}, NoOnlineAnalysis),
    ("cmd-sbatch-job-name-with-space", {}, {"job_name": "scan 42"}, None),
]


def _compare(function: str, md_kwargs: dict, kwargs: dict, expected: Any) -> None:
    args = kwargs.pop("__args__", ())
    theirs = call(getattr(mento, function), _metadata(mento, **md_kwargs), *args, **kwargs)
    ours = call(getattr(mento_fab, function), _metadata(mento_fab, **md_kwargs), *args, **kwargs)
    if expected is None:
        if theirs.value != ours.value and theirs.error is None and ours.error is None:
            # Quoting: the same words for a shell, one of them kept together.
            assert shlex.split(ours.value) != theirs.value.split()
            assert " ".join(shlex.split(ours.value)) == theirs.value.replace(
                "StrictHostKeyChecking=no", "StrictHostKeyChecking=accept-new"
            )
            return
        assert_same(theirs, ours)
    elif isinstance(expected, type):
        assert theirs.crashed or theirs.error is None
        assert_documented_error(ours, expected)
    else:
        expected(theirs, ours)


@pytest.mark.parametrize(
    ("md_kwargs", "kwargs", "expected"), [c[1:] for c in SSH_CASES], ids=[c[0] for c in SSH_CASES]
)
def test_ssh_command_as_the_original(md_kwargs, kwargs, expected) -> None:
    _compare("get_ssh_command", md_kwargs, dict(kwargs), expected)


@pytest.mark.parametrize(
    ("md_kwargs", "kwargs", "expected"),
    [c[1:] for c in SBATCH_CASES],
    ids=[c[0] for c in SBATCH_CASES],
)
def test_sbatch_command_as_the_original(md_kwargs, kwargs, expected) -> None:
    _compare("get_sbatch_command", md_kwargs, dict(kwargs), expected)


def test_commands_are_quoted_shell_words() -> None:
    md = _metadata(mento_fab, key="/gpfs/current/my dir/id_rsa")
    words = shlex.split(mento_fab.get_ssh_command(md))
    assert words[words.index("-i") + 1] == "/gpfs/current/my dir/id_rsa"
    sbatch = shlex.split(mento_fab.get_sbatch_command(md, job_name="scan 42; rm -rf ~"))
    assert "--job-name=scan 42; rm -rf ~" in sbatch


# ---------------------------------------------------------------------------- the public names


def test_the_original_top_level_names() -> None:
    """``from mento_fab import Trigger, …`` as ``from mento import …``, and the same objects."""
    for name in (
        "Trigger",
        "TriggerMethod",
        "get_ssh_command",
        "get_sbatch_command",
        "get_beamtime_metadata",
    ):
        assert hasattr(mento, name) and name in mento_fab.__all__
    assert mento_fab.get_ssh_command is mento_fab.trigger.get_ssh_command
    assert mento_fab.get_sbatch_command is mento_fab.trigger.get_sbatch_command
    assert [m.name for m in mento_fab.TriggerMethod] == [m.name for m in mento.TriggerMethod]
    assert [int(m) for m in mento_fab.TriggerMethod] == [int(m) for m in mento.TriggerMethod]


def test_the_original_utils_signatures() -> None:
    import inspect

    for name in (
        "get_path_core",
        "get_path_mountpoint",
        "prepare_results_filename",
        "make_writable_dir",
    ):
        theirs = inspect.signature(getattr(mento.utils, name)).parameters
        ours = inspect.signature(getattr(mento_fab.utils, name)).parameters
        assert list(ours) == list(theirs)
        for param, original in theirs.items():
            if original.default is inspect.Parameter.empty and param == "remote_dir":
                assert ours[param].default is None  # may be left out: from the metadata
            else:
                assert ours[param].default == original.default
    for name in ("get_ssh_command", "get_sbatch_command"):
        theirs = inspect.signature(getattr(mento.trigger, name)).parameters
        ours = inspect.signature(getattr(mento_fab.trigger, name)).parameters
        assert [(p.name, p.default) for p in ours.values()] == [
            (p.name, p.default) for p in theirs.values()
        ]


def test_every_intended_difference_is_documented() -> None:
    intended = {c[0] for c in SSH_CASES + SBATCH_CASES if c[0].startswith("cmd-")}
    assert documented_cases("cmd") == intended
    assert documented_cases("path") == {"path-remote-dir-omitted"}
