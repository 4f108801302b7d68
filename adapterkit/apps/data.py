"""Byte-level text corpora for the main job, and the windows a language model trains on.

The default data needs no download and was written by nobody on this team: the running
interpreter's own standard library, split in two with ``ast`` and ``tokenize``.

- corpus A (``code``): every module's source with its docstrings and comments removed;
- corpus B (``prose``): those docstrings and comments, i.e. English prose about the code.

Files go to validation by a hash of their path relative to the standard library
(``sha256(path) mod val_every == 0``, about one file in ten), so the split is the same on
every run and every machine with the same Python, and validation text comes from files the
model never trained on. Packages that hold data rather than code (``encodings``,
``pydoc_data``), test suites and third-party packages are left out; see ``SKIP_DIRS``.

Text is read as bytes: the vocabulary is the 256 byte values.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import logging
import os
import re
import sys
import sysconfig
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

VOCAB_SIZE = 256  # byte-level
# Directories of the standard library that are not prose-bearing code: test suites (large,
# odd on purpose), generated tables and documentation dumps, third-party packages.
SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "encodings", "pydoc_data", "lib2to3", "ensurepip",
})
Progress = Callable[[list[Path]], Iterable[Path]]
_EXTRACTOR_VERSION = 1  # bump when the extraction changes, so caches rebuild
# Comments that are tool directives rather than prose.
_DIRECTIVE = re.compile(r"^\s*(!|-\*-|noqa|type:|pragma|fmt:|pylint:)")


class DataError(ValueError):
    """A corpus that cannot be used; the message says what was wrong and what would do."""


@dataclass(frozen=True)
class Corpus:
    """A named text corpus as UTF-8 bytes, already split into training and validation."""

    name: str
    train: bytes
    val: bytes
    source: str  # where it came from, for the output

    def check_fits(self, context: int) -> None:
        """Raise ``DataError`` unless each split holds one full window of ``context + 1`` bytes."""
        for split, data in (("training", self.train), ("validation", self.val)):
            if len(data) < context + 1:
                raise DataError(
                    f"corpus {self.name} ({self.source}) has {len(data)} bytes of {split} text, "
                    f"shorter than the context length {context} + 1; give more text or a "
                    "smaller context"
                )


# -- splitting one source file ---------------------------------------------------------------


def _docstring_nodes(tree: ast.AST) -> Iterator[tuple[ast.Expr, bool]]:
    """Each docstring expression, with whether it is its body's only statement."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                yield body[0], len(body) == 1


def _char_col(line: str, byte_col: int) -> int:
    # ast counts columns in UTF-8 bytes, tokenize in characters.
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def _comment_blocks(comments: list[tuple[int, str, bool]]) -> list[tuple[int, str]]:
    """Comments as ``(first row, paragraph)``; consecutive whole-line comments join into one.

    Tool directives (``# noqa``, ``# type:``, a shebang, a coding line) are not prose.
    """
    blocks: list[tuple[int, list[str]]] = []
    last = -2
    for row, text, whole_line in comments:
        body = text.lstrip("#")
        if _DIRECTIVE.match(body) or not body.strip():
            last = -2
            continue
        body = (body[1:] if body.startswith(" ") else body).rstrip()
        if not whole_line:
            blocks.append((row, [body]))
            last = -2
            continue
        if row == last + 1 and blocks:
            blocks[-1][1].append(body)
        else:
            blocks.append((row, [body]))
        last = row
    return [(row, "\n".join(lines)) for row, lines in blocks]


def split_source(source: str) -> tuple[str, str]:
    """Split Python source into (code without docstrings and comments, the prose removed).

    A docstring that was a body's only statement becomes ``pass``, so the code still parses.
    Raises ``SyntaxError`` for source that does not parse.

    Example:
        >>> code, prose = split_source('def f(x):\\n    \"\"\"Double x.\"\"\"\\n'
        ...                            '    return 2 * x  # twice\\n')
        >>> print(code, end="")
        def f(x):
            return 2 * x
        >>> print(prose)
        Double x.
        <BLANKLINE>
        twice
    """
    tree = ast.parse(source)
    # Split on "\n" only, as tokenize and ast count lines (str.splitlines also splits at
    # form feeds, which some standard-library files hold).
    lines = io.StringIO(source).readlines()
    cuts: list[tuple[int, int, int, int, str]] = []  # (row0, col0, row1, col1, replacement)
    prose: list[tuple[int, str]] = []  # (row, text), sorted afterwards into reading order
    for expr, alone in _docstring_nodes(tree):
        r0, r1 = expr.lineno - 1, (expr.end_lineno or expr.lineno) - 1
        c0 = _char_col(lines[r0], expr.col_offset)
        c1 = _char_col(lines[r1], expr.end_col_offset or 0)
        cuts.append((r0, c0, r1, c1, "pass" if alone else ""))
        prose.append((r0, inspect.cleandoc(expr.value.value)))  # type: ignore[attr-defined]
    comments: list[tuple[int, str, bool]] = []  # (row, text, on a line of its own)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            cuts.append((row - 1, col, row - 1, tok.end[1], ""))
            comments.append((row - 1, tok.string, not tok.line[:col].strip()))
    prose += _comment_blocks(comments)
    code = _apply_cuts(lines, cuts)
    text = "\n\n".join(t for _, t in sorted(prose, key=lambda p: p[0]) if t.strip())
    return code, text


def _apply_cuts(lines: list[str], cuts: list[tuple[int, int, int, int, str]]) -> str:
    out = [line.rstrip("\r\n") for line in lines]
    touched: set[int] = set()
    # Right to left, bottom to top, so that earlier positions stay valid.
    for r0, c0, r1, c1, repl in sorted(cuts, reverse=True):
        out[r0] = out[r0][:c0] + repl + out[r1][c1:]
        for r in range(r1, r0, -1):
            out[r] = None  # type: ignore[call-overload]
        touched.add(r0)
    kept = [
        line.rstrip()
        for i, line in enumerate(out)
        if line is not None and not (i in touched and not line.strip())
    ]
    code = "\n".join(kept).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", code) + "\n"


# -- the standard-library corpora -----------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The ``.py`` files the default corpora are built from, sorted by relative path."""
    root = stdlib_root() if root is None else root
    return sorted(
        (p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def is_validation(relative_path: str, val_every: int = 10) -> bool:
    """Whether a file (by its path relative to the corpus root) belongs to validation.

    Example:
        >>> [is_validation(f"m{i}.py", val_every=2) for i in range(4)]
        [False, True, False, False]
    """
    digest = hashlib.sha256(relative_path.encode()).hexdigest()
    return int(digest[:8], 16) % val_every == 0


def extract_corpora(root: Path | None = None, *, val_every: int = 10,
                    progress: Progress | None = None) -> tuple[Corpus, Corpus]:
    """Corpus A (code) and corpus B (prose) from every ``.py`` file under ``root``.

    ``root`` defaults to the standard library. Files that do not parse are skipped.
    ``progress`` wraps the list of files (e.g. ``tqdm``) to show how far it got.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(4):
        ...     _ = (root / f"m{i}.py").write_text(f"'''Module {i}.'''\\nX = {i}  # the value\\n")
        >>> a, b = extract_corpora(root, val_every=2)  # m1.py validates
        >>> a.train, a.val
        (b'X = 0\\n\\nX = 2\\n\\nX = 3\\n', b'X = 1\\n')
        >>> b.val
        b'Module 1.\\n\\nthe value\\n'
    """
    root = stdlib_root() if root is None else Path(root)
    parts: dict[tuple[str, str], list[str]] = {(c, s): [] for c in "AB" for s in ("train", "val")}
    files = stdlib_files(root)
    for path in files if progress is None else progress(files):
        rel = path.relative_to(root).as_posix()
        try:
            with tokenize.open(path) as fh:  # honours a PEP 263 coding line
                source = fh.read()
            code, prose = split_source(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError) as err:
            log.debug("skipping %s: %s", rel, err)
            continue
        split = "val" if is_validation(rel, val_every) else "train"
        parts["A", split].append(code)
        if prose.strip():
            parts["B", split].append(prose + "\n")
    where = f"{root} ({'standard library of Python ' + sys.version.split()[0]})"
    return (
        Corpus("A", _join(parts["A", "train"]), _join(parts["A", "val"]),
               f"code of {where}, docstrings and comments removed"),
        Corpus("B", _join(parts["B", "train"]), _join(parts["B", "val"]),
               f"docstrings and comments of {where}"),
    )


def _join(chunks: list[str]) -> bytes:
    return "\n".join(chunks).encode("utf-8")


def default_corpora(cache_dir: Path | None = None, progress: Progress | None = None
                    ) -> tuple[Corpus, Corpus]:
    """``extract_corpora()`` of the standard library, cached as files under ``cache_dir``."""
    if cache_dir is None:
        return extract_corpora(progress=progress)
    root = stdlib_root()
    key = hashlib.sha256(
        f"{_EXTRACTOR_VERSION}|{sys.version}|{root}".encode()
    ).hexdigest()[:16]
    where = Path(cache_dir) / f"corpus-{key}"
    names = [f"{c}.{s}.txt" for c in "AB" for s in ("train", "val")]
    meta = where / "source.txt"
    if meta.is_file() and all((where / n).is_file() for n in names):
        a_src, b_src = meta.read_text().splitlines()
        blobs = [(where / n).read_bytes() for n in names]
        return Corpus("A", blobs[0], blobs[1], a_src), Corpus("B", blobs[2], blobs[3], b_src)
    a, b = extract_corpora(root, progress=progress)
    where.mkdir(parents=True, exist_ok=True)
    for name, blob in zip(names, (a.train, a.val, b.train, b.val), strict=True):
        _write_atomic(where / name, blob)
    _write_atomic(meta, f"{a.source}\n{b.source}\n".encode())
    return a, b


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- user text files -------------------------------------------------------------------------


def read_text_file(path: str | os.PathLike[str], name: str, *, val_fraction: float = 0.1
                   ) -> Corpus:
    """A plain UTF-8 text file as a corpus: the last ``val_fraction`` (cut at a line) validates.

    Raises ``DataError`` for a missing, empty or binary file.

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        >>> _ = f.write("".join(f"line {i}\\n" for i in range(100))); f.close()
        >>> c = read_text_file(f.name, "B")
        >>> c.val.decode().splitlines()[0], len(c.train) + len(c.val)
        ('line 91', 790)
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist; give the path of a plain text file")
    if not p.is_file():
        raise DataError(f"data file {p} is not a regular file; give the path of a plain text file")
    data = p.read_bytes()
    if not data.strip():
        raise DataError(f"data file {p} is empty; give a plain text file with some text in it")
    try:
        data.decode("utf-8")
        binary = b"\x00" in data
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise DataError(
            f"data file {p} looks binary (NUL bytes or invalid UTF-8); give a plain UTF-8 "
            "text file"
        )
    cut = int(len(data) * (1 - val_fraction))
    newline = data.find(b"\n", cut)
    cut = newline + 1 if 0 <= newline < len(data) - 1 else cut
    return Corpus(name, data[:cut], data[cut:], str(p))


# -- windows for a language model ------------------------------------------------------------


def as_tokens(data: bytes) -> torch.Tensor:
    """Bytes as a 1-D ``long`` tensor of token ids in ``[0, 256)``.

    Example:
        >>> as_tokens("hé".encode())
        tensor([104, 195, 169])
    """
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_windows(tokens: torch.Tensor, batch: int, context: int, generator: torch.Generator
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(x, y)`` batches of random windows, ``y`` being ``x`` shifted by one.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = next(random_windows(torch.arange(100), batch=4, context=8, generator=g))
        >>> x.shape, bool(torch.equal(x[:, 1:], y[:, :-1]))
        (torch.Size([4, 8]), True)
    """
    if len(tokens) < context + 1:
        raise DataError(f"{len(tokens)} tokens hold no window of context {context} + 1")
    offsets = torch.arange(context + 1)
    while True:
        start = torch.randint(0, len(tokens) - context, (batch,), generator=generator)
        window = tokens[start[:, None] + offsets]  # (B, T + 1)
        yield window[:, :-1], window[:, 1:]


def eval_windows(tokens: torch.Tensor, context: int, count: int, batch: int = 32
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``count`` windows spread evenly over ``tokens``, as a fixed list of batches."""
    if len(tokens) < context + 1:
        raise DataError(f"{len(tokens)} tokens hold no window of context {context} + 1")
    last = len(tokens) - context - 1
    starts = torch.linspace(0, last, min(count, last + 1)).round().long().unique()
    offsets = torch.arange(context + 1)
    windows = tokens[starts[:, None] + offsets]
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch)]
