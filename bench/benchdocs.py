"""What the benchmark scripts share: their section of a document, compiling, the exit.

Each script measures on its own lab and then rewrites one ``## `` section of a
Markdown file (``docs/benchmarks.md`` or ``docs/scaling.md``), leaving every other
section as it is::

    from benchdocs import replace_section
    replace_section(DOCS, "## Start-up", text)  # replaced in place, or appended
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

__all__ = ["compile_package", "exit_with", "replace_section"]


def replace_section(
    path: Path,
    heading: str,
    text: str,
    *,
    after: str | None = None,
    first: bool = False,
    empty: str = "# Benchmarks\n",
) -> None:
    """Put ``text`` in place of the section ``heading`` (up to the next ``## ``).

    A document without that section gets it after the section ``after`` when there
    is one, before the first section when ``first``, else at the end; a missing
    document starts as ``empty``.
    """
    current = path.read_text() if path.exists() else empty
    section = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if section.search(current):
        updated = section.sub(lambda _: text.rstrip("\n") + "\n\n", current, count=1)
    else:
        anchor = None
        if after is not None:
            found = re.compile(rf"^{re.escape(after)}\n.*?(?=^## |\Z)", re.M | re.S).search(current)
            anchor = found.end() if found else None
        elif first:
            found = re.search(r"^## ", current, re.M)
            anchor = found.start() if found else None
        if anchor is None:
            updated = current.rstrip("\n") + "\n\n" + text
        else:
            updated = current[:anchor] + text.rstrip("\n") + "\n\n" + current[anchor:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated.rstrip("\n") + "\n")


def compile_package(root: Path) -> None:
    """Compile a package's bytecode, as ``pip install`` does.

    With PYTHONDONTWRITEBYTECODE set (as on some machines) an editable checkout
    would compile every module on every run, which installed peers never pay.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip


def exit_with(main: Callable[[], int], name: str, expected: type[BaseException]) -> NoReturn:
    """Run a script's ``main``: its own failures as one line and status 1, Ctrl-C as 130."""
    try:
        sys.exit(main())
    except expected as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
