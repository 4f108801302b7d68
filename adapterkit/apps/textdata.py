"""Labelled text for ``adapterkit finetune``: CSV and JSONL files, and the embedded default task.

A task is two lists of ``(text, label)`` pairs, training and validation, and the sorted label
names. Labels are read as strings or ints and kept as strings (``"3"``); ints sort by value.

The default task needs no download and was written by nobody on this team: prose of the
running interpreter's standard library (docstrings and comment blocks, split out with ``ast``
and ``tokenize`` as ``adapterkit demo`` does), labelled with the package it comes from
(``asyncio``, ``email``, ...). Files, not texts, are split: each package's files are taken in
a fixed order (a hash of their path) into validation until a quarter of its texts are there,
so no file feeds both splits and every label is in both. A text that occurs twice is kept
once, at its first occurrence.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tokenize
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .data import DataError, _comment_blocks, _docstring_nodes, stdlib_files, stdlib_root

Pair = tuple[str, str]  # (text, label)

# Packages found in every CPython from 3.10 on (tkinter and idlelib are often packaged apart).
DEFAULT_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing",
                    "unittest", "xml")
MIN_CHARS = 30  # shorter prose ("Return self.", "XXX") says little about its package
VAL_SHARE = 0.25


@dataclass(frozen=True)
class Task:
    """A text classification task: training and validation pairs, and the label names."""

    name: str
    train: list[Pair]
    val: list[Pair]
    labels: tuple[str, ...]  # sorted; a label's index is its class id

    def ids(self, pairs: Sequence[Pair]) -> list[int]:
        """The class id of each pair's label."""
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[label] for _, label in pairs]

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train):,} training and {len(self.val):,} validation "
                f"texts, {len(self.labels)} labels ({', '.join(self.labels)})")


# -- files -----------------------------------------------------------------------------------


def read_pairs(path: str | os.PathLike[str], text_column: str = "text",
               label_column: str = "label", flag: str = "--train") -> list[Pair]:
    """The ``(text, label)`` pairs of a CSV (``.csv``, ``.tsv``) or JSON Lines file.

    Raises ``DataError``, naming ``flag`` and the file, for a missing or empty file, a missing
    column, a row without text or label, or a line that is not a JSON object.

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
        >>> _ = f.write('{"text": "good", "label": 1}\\n{"text": "bad", "label": 0}\\n')
        >>> f.close()
        >>> read_pairs(f.name)
        [('good', '1'), ('bad', '0')]
    """
    p = Path(path)
    where = f"{flag} {p}"
    if not p.exists():
        raise DataError(f"{where}: no such file; give a CSV or JSONL file of labelled texts")
    if not p.is_file():
        raise DataError(f"{where}: not a regular file; give a CSV or JSONL file")
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json", ".ndjson"):
        raise DataError(f"{where}: unknown file type {suffix or '(none)'!r}; give a .csv, "
                        ".tsv or .jsonl file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text; give a UTF-8 CSV or JSONL file") from None
    rows = _json_rows(text, where) if suffix in (".jsonl", ".json", ".ndjson") else \
        _csv_rows(text, where, "\t" if suffix == ".tsv" else ",")
    if not rows:
        raise DataError(f"{where}: the file is empty (no rows); give at least one labelled "
                        "text per label")
    return [_pair(row, line, text_column, label_column, where) for line, row in rows]


def _csv_rows(text: str, where: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise DataError(f"{where}: not valid CSV ({err})") from None


def _json_rows(text: str, where: str) -> list[tuple[int, dict]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: line {line} is not JSON ({err.msg}); give one JSON "
                            "object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: line {line} is a JSON {type(row).__name__}, not an "
                            "object; give one object per line, e.g. "
                            '{"text": "...", "label": "..."}')
        rows.append((line, row))
    return rows


def _pair(row: dict, line: int, text_column: str, label_column: str, where: str) -> Pair:
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in row:
            have = ", ".join(repr(c) for c in row if c is not None) or "none"
            raise DataError(f"{where}: no column {column!r} (line {line} has {have}); name "
                            f"the right one with {flag}")
    text, label = row[text_column], row[label_column]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: line {line} has no text in column {text_column!r}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
        raise DataError(f"{where}: line {line}: the label {label!r} in column {label_column!r} "
                        "is not a string or an integer")
    return text, str(label).strip()


def sort_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Distinct labels, sorted by value if all are integers, else as strings.

    Example:
        >>> sort_labels(["10", "2", "2"]), sort_labels(["b", "a"])
        (('2', '10'), ('a', 'b'))
    """
    distinct = set(labels)
    if all(_is_int(label) for label in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def make_task(name: str, train: list[Pair], val: list[Pair]) -> Task:
    """A ``Task`` from two lists of pairs, checked: two labels at least, none new in ``val``.

    Example:
        >>> make_task("t", [("a", "x"), ("b", "y")], [("c", "y")]).labels
        ('x', 'y')
    """
    labels = sort_labels(label for _, label in train)
    if len(labels) < 2:
        only = f" ({labels[0]!r})" if labels else ""
        raise DataError(f"{name}: the training data has one label only{only}; a classifier "
                        "needs at least two")
    unseen = sorted(set(label for _, label in val) - set(labels))
    if unseen:
        raise DataError(f"{name}: validation labels {', '.join(map(repr, unseen[:5]))} never "
                        "occur in the training data; every validation label must be trained")
    return Task(name, train, val, labels)


def read_task(train: str | os.PathLike[str], val: str | os.PathLike[str],
              text_column: str = "text", label_column: str = "label") -> Task:
    """The task in a training file and a validation file (see ``read_pairs``)."""
    pairs = [read_pairs(path, text_column, label_column, flag)
             for path, flag in ((train, "--train"), (val, "--val"))]
    return make_task(f"{Path(train).name} / {Path(val).name}", *pairs)


# -- the default task ------------------------------------------------------------------------


def prose_of(source: str, min_chars: int = MIN_CHARS) -> list[str]:
    """The docstrings and comment blocks of Python source, each at least ``min_chars`` long.

    Example:
        >>> prose_of('def f():\\n    \"\"\"Return the answer to everything, as an int.\"\"\"\\n'
        ...          '    return 42  # short\\n')
        ['Return the answer to everything, as an int.']
    """
    import ast
    import inspect

    tree = ast.parse(source)
    texts = [inspect.cleandoc(expr.value.value) for expr, _ in _docstring_nodes(tree)]
    flat = (" ".join(t.split()) for t in texts + comment_blocks_of(source))
    return [t for t in flat if len(t) >= min_chars]


def comment_blocks_of(source: str) -> list[str]:
    """The comment blocks of Python source (consecutive whole-line comments), in order."""
    comments = [(tok.start[0] - 1, tok.string, not tok.line[:tok.start[1]].strip())
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT]
    return [text for _, text in _comment_blocks(comments)]


def _file_key(relative: str) -> str:
    return hashlib.sha256(relative.encode()).hexdigest()


def split_files(sizes: dict[str, int], val_share: float = VAL_SHARE) -> set[str]:
    """Which files validate: in hash order, each that keeps validation within ``val_share``
    of the texts; if none fits, the smallest. One file at least always trains.

    Example:
        >>> sorted(split_files({"a.py": 10, "b.py": 10, "c.py": 10, "d.py": 10}, 0.25))
        ['d.py']
        >>> sorted(split_files({"a.py": 30, "b.py": 20, "c.py": 50}, 0.1))
        ['b.py']
    """
    if len(sizes) < 2:
        return set()
    budget, val, chosen = val_share * sum(sizes.values()), 0, set()
    for relative in sorted(sizes, key=_file_key):
        if val + sizes[relative] <= budget and len(chosen) < len(sizes) - 1:
            chosen.add(relative)
            val += sizes[relative]
    return chosen or {min(sizes, key=lambda f: (sizes[f], _file_key(f)))}


def package_task(root: Path | None = None, packages: Sequence[str] = DEFAULT_PACKAGES,
                 val_share: float = VAL_SHARE, min_chars: int = MIN_CHARS) -> Task:
    """Prose of the standard library (or of ``root``), labelled with its top-level package."""
    root = stdlib_root() if root is None else Path(root)
    by_file: dict[str, dict[str, list[str]]] = defaultdict(dict)  # package -> file -> texts
    for path in stdlib_files(root):
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in packages:
            continue
        try:
            with tokenize.open(path) as fh:
                texts = prose_of(fh.read(), min_chars)
        except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError):
            continue
        by_file[parts[0]][path.relative_to(root).as_posix()] = texts
    missing = [p for p in packages if not by_file.get(p)]
    if missing:
        raise DataError(f"the standard library at {root} has no prose in {', '.join(missing)}; "
                        "give --train and --val files instead")
    seen: set[str] = set()
    train: list[Pair] = []
    val: list[Pair] = []
    for package in packages:
        files = by_file[package]
        held_out = split_files({f: len(t) for f, t in files.items()}, val_share)
        for relative in sorted(files):
            for text in files[relative]:
                if text not in seen:
                    seen.add(text)
                    (val if relative in held_out else train).append((text, package))
    version = sys.version.split()[0]
    return make_task(f"standard-library prose by package (Python {version})", train, val)
