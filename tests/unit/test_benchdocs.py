"""The benchmarks' shared writer replaces its own section and leaves the others."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from benchdocs import replace_section

DOC = "# B\n\nintro\n\n## A\n\na\n\n## C\n\nc\n"


def test_a_section_is_replaced_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text(DOC)
    replace_section(doc, "## A", "## A\n\nnew\n")
    assert doc.read_text() == "# B\n\nintro\n\n## A\n\nnew\n\n## C\n\nc\n"


def test_a_new_section_goes_where_it_is_asked(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text(DOC)
    replace_section(doc, "## T", "## T\n\nt\n", after="## A")
    replace_section(doc, "## R", "## R\n\nr\n", first=True)
    replace_section(doc, "## Z", "## Z\n\nz\n")
    headings = [line for line in doc.read_text().splitlines() if line.startswith("## ")]
    assert headings == ["## R", "## A", "## T", "## C", "## Z"]


def test_a_missing_document_starts_from_its_intro(tmp_path: Path) -> None:
    doc = tmp_path / "new" / "b.md"
    replace_section(doc, "## A", "## A\n\na\n", empty="# Intro\n")
    assert doc.read_text() == "# Intro\n\n## A\n\na\n"
