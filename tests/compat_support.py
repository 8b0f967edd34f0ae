"""Shared pieces of the compatibility tests: outcomes, their comparison, the documented table.

The original package (``desy-mento`` 0.2.2, module ``mento``) is a dev dependency
(pyproject.toml). A function's *outcome* is its result (dataclasses as plain
dicts) or the exception it raised. Two outcomes agree when both returned equal
results, or when the original raised one of the exceptions it raises on purpose
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``, exactly those classes)
or got an ``OSError`` from the system (``mkdir`` on a file), and mento_fab raised
an instance of that class. Anything else the original raises is a crash;
mento_fab raises its documented error there, and every such case, like every
other difference, is a row of the one table in docs/compatibility.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mento_fab.errors import MentoError

DOC = Path(__file__).resolve().parent.parent / "docs" / "compatibility.md"
#: What the original raises on purpose (its own ``raise`` statements).
RAISED_ON_PURPOSE = (ValueError, FileNotFoundError, RuntimeError)


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None

    def __repr__(self) -> str:
        if self.error is not None:
            return f"raised {type(self.error).__name__}({self.error})"
        return f"returned {self.value!r}"

    @property
    def crashed(self) -> bool:
        """The original raised something it never raises on purpose, nor the OS for it."""
        if self.error is None or type(self.error) in RAISED_ON_PURPOSE:
            return False
        return not isinstance(self.error, OSError)  # FileExistsError from mkdir: the OS's word


def plain(value: Any) -> Any:
    """Results of both packages in one form: dataclasses as dicts, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def call(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
    try:
        return Outcome(value=plain(func(*args, **kwargs)))
    except Exception as exc:
        return Outcome(error=exc)


def assert_same(theirs: Outcome, ours: Outcome) -> None:
    """mento_fab gives the original's result, or raises what the original raises on purpose."""
    assert not theirs.crashed, f"the original crashed ({theirs}): record an intended difference"
    if theirs.error is None:
        assert ours.error is None, f"original {theirs}, mento_fab {ours}"
        assert ours.value == theirs.value
    else:
        assert isinstance(ours.error, type(theirs.error)), f"original {theirs}, mento_fab {ours}"


def assert_documented_error(ours: Outcome, expected: type[BaseException]) -> None:
    """Where the original crashes or accepts bad input, mento_fab raises a documented error."""
    assert isinstance(ours.error, expected), f"expected {expected.__name__}, mento_fab {ours}"
    assert isinstance(ours.error, MentoError)


def documented_cases(prefix: str) -> set[str]:
    """Case ids (``prefix-…``) in the intended-differences table of docs/compatibility.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Intended differences", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(rf"^\| `({re.escape(prefix)}-[a-z0-9-]+)` \|", section, re.M))
