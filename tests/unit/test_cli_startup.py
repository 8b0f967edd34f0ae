"""Start-up shortcuts of the command line give the answers of the long way."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mento_fab.cli import app

ARGVS = [
    ["run-on-nodes", "--bogus", "x"],
    ["nosuchtask"],
    ["run-on-nodes", "-h"],
    ["-h", "run-on-nodes"],
    ["--help=info"],
    ["-h", "nosuch"],
    ["info", "info", "--metadata", "/nonexistent"],
    ["run_on_nodes", "--metadata", "/nonexistent", "true"],
    ["ps", "--json", "w1", "--metadata", "/nonexistent"],
    ["check", "--nodes"],
    ["--list"],
    ["-h"],
]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        app.make_program().run(["mento-fab", *argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_parsing_against_the_named_tasks_only_changes_nothing(argv, capsys, monkeypatch) -> None:
    short = _run(argv, capsys)
    monkeypatch.setattr(app, "_named", lambda collection, words: collection)
    assert short == _run(argv, capsys)


def test_invoke_comes_without_unittest_mock_and_mockcontext_still_works() -> None:
    code = (
        "import sys\n"
        "from mento_fab.cli.startup import import_invoke\n"
        "import_invoke()\n"
        "import mento_fab.cli.app, fabric\n"
        "print(sorted(m for m in ('asyncio', 'unittest', 'unittest.mock') if m in sys.modules))\n"
        "from invoke import MockContext\n"
        "print(MockContext(run={'x': 'y'}).run('x').stdout)\n"
        "import unittest.mock\n"
        "print(unittest.mock.Mock.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ["[]", "y", "unittest.mock"], proc.stderr
