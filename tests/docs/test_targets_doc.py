"""docs/targets.md's example table is checked against the code, row by row."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adapterkit.select import select_modules
from adapterkit.tree import candidates
from tests.conftest import make_gpt

DOC = Path(__file__).resolve().parents[2] / "docs" / "targets.md"


def rows():
    text = DOC.read_text().split("## Examples on the reference GPT")[1].split("## Errors")[0]
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 2 and cells[0].startswith("`"):
            selector = cells[0].strip("`").replace("\\|", "|")
            expected = re.findall(r"`([^`]+)`", cells[1])
            yield selector, ([] if cells[1].startswith("nothing") else expected)


ROWS = list(rows())


def test_the_table_is_there():
    assert len(ROWS) >= 10


@pytest.mark.parametrize(("selector", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_documented_example(selector, expected):
    named = candidates(make_gpt(layers=2))
    if not expected:
        with pytest.raises(ValueError, match="no module matches"):
            select_modules(named, selector)
    else:
        assert list(select_modules(named, selector)) == expected
