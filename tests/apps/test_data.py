"""The default corpora (code vs. docstrings and comments), user text files, and LM windows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from adapterkit.apps.data import (
    Corpus,
    DataError,
    as_tokens,
    default_corpora,
    eval_windows,
    extract_corpora,
    is_validation,
    random_windows,
    read_text_file,
    split_source,
    stdlib_files,
    stdlib_root,
)

SOURCE = '''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docstring: what this module is for."""

import os  # noqa: F401


class Greeter:
    """Says hello to someone."""

    def greet(self, name):  # the only public method
        """Return a greeting for ``name``."""
        # Build the text in one place,
        # so that subclasses can change it.
        return f"hello {name}"  # done


def only_doc():
    """Nothing but a docstring."""


def unicode_inside():
    x = "é"; """not a docstring"""  # café
    return x
'''


def test_split_source_moves_docstrings_and_comments_to_prose() -> None:
    code, prose = split_source(SOURCE)
    for text in ("Module docstring", "Says hello", "Return a greeting", "the only public method",
                 "Build the text in one place,\nso that subclasses can change it.", "café"):
        assert text in prose and text not in code
    for text in ('return f"hello {name}"', "class Greeter:", "def greet(self, name):",
                 '"not a docstring"', 'x = "é"'):
        assert text in code
    assert "#" not in code
    # tool directives are not prose
    assert "noqa" not in prose and "coding" not in prose and "/usr/bin" not in prose


def test_split_source_code_still_parses_and_keeps_structure() -> None:
    code, _ = split_source(SOURCE)
    tree = ast.parse(code)  # a docstring-only body became `pass`
    names = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert names == ["Greeter", "only_doc", "unicode_inside", "greet"]
    assert ast.get_docstring(tree) is None
    assert "\n\n\n" not in code and all(line == line.rstrip() for line in code.splitlines())


def test_split_source_counts_lines_as_python_does() -> None:
    # a form feed is not a line break for ast and tokenize
    code, prose = split_source('x = 1\n\x0c\ndef f():\n    """Doc."""  # c\n    return 1\n')
    assert prose == "Doc.\n\nc"
    assert "return 1" in code and "Doc" not in code


def test_split_source_refuses_invalid_python() -> None:
    with pytest.raises(SyntaxError):
        split_source("def broken(:\n")


def _tree(root: Path, n: int) -> None:
    for i in range(n):
        sub = root / ("pkg" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"m{i}.py").write_text(f'"""Doc of m{i}."""\nVALUE_{i} = {i}  # note {i}\n')
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text('"""Skipped test docs."""\n')
    (root / "bad.py").write_text("def broken(:\n")


def test_extract_corpora_splits_by_file_deterministically(tmp_path: Path) -> None:
    _tree(tmp_path, 12)
    a, b = extract_corpora(tmp_path, val_every=3)
    assert (a, b) == extract_corpora(tmp_path, val_every=3)
    for i in range(12):
        rel = f"pkg/m{i}.py" if i % 2 else f"m{i}.py"
        code, doc = f"VALUE_{i} = {i}".encode(), f"Doc of m{i}.".encode()
        if is_validation(rel, 3):
            assert code in a.val and code not in a.train
            assert doc in b.val and doc not in b.train
        else:
            assert code in a.train and code not in a.val
            assert doc in b.train and doc not in b.val
    everything = a.train + a.val + b.train + b.val
    assert b"Skipped" not in everything and b"broken" not in everything  # tests/, bad syntax
    assert b"Doc of" not in a.train + a.val and b"VALUE_" not in b.train + b.val


def test_stdlib_files_skip_tests_and_data_packages() -> None:
    root = stdlib_root()
    rels = [p.relative_to(root).parts for p in stdlib_files(root)]
    assert ("json", "decoder.py") in rels and ("os.py",) in rels
    assert not any({"test", "site-packages", "encodings"} & set(parts[:-1]) for parts in rels)


def test_default_corpora_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A small stand-in for the standard library keeps this test fast.
    _tree(tmp_path / "lib", 6)
    monkeypatch.setattr("adapterkit.apps.data.stdlib_root", lambda: tmp_path / "lib")
    first = default_corpora(tmp_path / "cache")
    assert first == extract_corpora(tmp_path / "lib")
    (tmp_path / "lib" / "m0.py").write_text('"""Changed."""\n')  # the cache wins over the tree
    assert default_corpora(tmp_path / "cache") == first
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"  \n\n ", "is empty"),
        (b"text\x00with a NUL", "looks binary"),
        (b"\xff\xfe\xfa invalid utf-8", "looks binary"),
    ],
)
def test_read_text_file_refuses_bad_files(tmp_path: Path, content: bytes | None,
                                          message: str) -> None:
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text_file(path, "A")


def test_read_text_file_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a regular file"):
        read_text_file(tmp_path, "A")


def test_read_text_file_splits_at_a_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("".join(f"sentence number {i}.\n" for i in range(50)))
    c = read_text_file(path, "B")
    assert c.train + c.val == path.read_bytes()
    assert c.train.endswith(b"\n") and 0.05 < len(c.val) / len(path.read_bytes()) < 0.15


def test_check_fits_names_the_short_split() -> None:
    c = Corpus("B", b"x" * 100, b"y" * 10, "here")
    c.check_fits(9)
    with pytest.raises(DataError, match="10 bytes of validation text.*context length 10"):
        c.check_fits(10)


def test_windows_are_shifted_views_of_the_tokens() -> None:
    tokens = as_tokens("héllo wörld, " .encode() * 20)
    assert tokens.dtype == torch.long and int(tokens.max()) < 256
    x, y = next(random_windows(tokens, 5, 16, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    batches = eval_windows(tokens, 16, count=40, batch=16)
    assert [len(b[0]) for b in batches] == [16, 16, 8]
    assert torch.equal(batches[0][0][0], tokens[:16])  # the first window starts at 0
    last_x, last_y = batches[-1][0][-1], batches[-1][1][-1]
    assert torch.equal(last_y[-1:], tokens[-1:]) and torch.equal(last_x[1:], last_y[:-1])
