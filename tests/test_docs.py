"""The docs name tests as evidence (docs/security.md above all): every named test exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
_TEST_PATHS = sorted((ROOT / "tests").rglob("test_*.py"))
_TEST_FILES = {p.name for p in _TEST_PATHS}
_ALL_TESTS = "\n".join(p.read_text() for p in _TEST_PATHS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_test_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = [name for name in set(re.findall(r"::(test_\w+)", text))
               if f"def {name}" not in _ALL_TESTS]
    files = [name for name in set(re.findall(r"tests/[\w/]+?/?(test_\w+\.py)", text))
             if name not in _TEST_FILES]
    assert (sorted(missing), sorted(files)) == ([], [])
