"""Labelled tasks for checking `adapterkit finetune`'s recipe beyond its default task.

- `package`: the default task (standard-library prose by package, `textdata.package_task`);
- `library`: prose (docstrings, comment blocks) of third-party libraries installed on this
  machine, labelled with the library; other text and other labels than the default task's;
- `kind`: standard-library prose of other packages than the default task's, labelled with
  what it documents: a module, a class, a function, or a comment block.

Every task is split by file, as the default task is. `python benchmarks/finetune_tasks.py
DIR` writes each as DIR/<task>.train.csv and DIR/<task>.val.csv, for `adapterkit finetune
--train --val`.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import inspect
import sys
import sysconfig
import tokenize
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterkit.apps.data import stdlib_files, stdlib_root  # noqa: E402
from adapterkit.apps.textdata import (  # noqa: E402
    DEFAULT_PACKAGES,
    MIN_CHARS,
    Pair,
    Task,
    comment_blocks_of,
    make_task,
    package_task,
    split_files,
)

LIBRARIES = ("hypothesis", "jinja2", "matplotlib", "networkx", "numpy", "requests")
PER_LABEL = 700  # texts kept per label (before the split), so no library dominates


def _texts_by_file(files: dict[str, Path], label_of: Callable[[str, str], str | None]
                   ) -> dict[str, dict[str, list[Pair]]]:
    """label -> file -> [(text, label)] for the prose of each file."""
    out: dict[str, dict[str, list[Pair]]] = defaultdict(lambda: defaultdict(list))
    for relative, path in sorted(files.items()):
        try:
            with tokenize.open(path) as fh:
                source = fh.read()
            for text, kind in _prose_with_kind(source):
                label = label_of(relative, kind)
                if label is not None:
                    out[label][relative].append((text, label))
        except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError):
            continue
    return out


def _prose_with_kind(source: str) -> list[tuple[str, str]]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        kinds = ((ast.Module, "module"), (ast.ClassDef, "class"),
                 ((ast.FunctionDef, ast.AsyncFunctionDef), "function"))
        kind = next((k for t, k in kinds if isinstance(node, t)), None)
        if kind and (doc := ast.get_docstring(node)):
            found.append((inspect.cleandoc(doc), kind))
    found += [(text, "comment") for text in comment_blocks_of(source)]
    flat = ((" ".join(t.split()), k) for t, k in found)
    return [(t, k) for t, k in flat if len(t) >= MIN_CHARS]


def _capped_split(name: str, by_label: dict[str, dict[str, list[Pair]]]) -> Task:
    """Keep PER_LABEL texts a label (fixed by a hash), dedupe, split by file (a quarter)."""
    seen: set[str] = set()
    train: list[Pair] = []
    val: list[Pair] = []
    for label in sorted(by_label):
        files = by_label[label]
        pairs = [(f, p) for f in sorted(files) for p in files[f]]
        keep = sorted(pairs, key=lambda fp: hashlib.sha256(fp[1][0].encode()).hexdigest())
        kept: dict[str, list[Pair]] = defaultdict(list)
        for f, p in keep[:PER_LABEL]:
            kept[f].append(p)
        held_out = split_files({f: len(ps) for f, ps in kept.items()})
        for f in sorted(kept):
            for text, lab in kept[f]:
                if text not in seen:
                    seen.add(text)
                    (val if f in held_out else train).append((text, lab))
    return make_task(name, train, val)


def library_task() -> Task:
    site = Path(sysconfig.get_paths()["purelib"])
    files = {path.relative_to(site).as_posix(): path
             for lib in LIBRARIES for path in stdlib_files(site / lib)}
    return _capped_split("third-party library prose by library",
                         _texts_by_file(files, lambda rel, kind: rel.split("/")[0]))


def kind_task() -> Task:
    root = stdlib_root()
    files = {p.relative_to(root).as_posix(): p for p in stdlib_files(root)
             if p.relative_to(root).parts[0] not in DEFAULT_PACKAGES}
    return _capped_split("standard-library prose by kind (module, class, function, comment)",
                         _texts_by_file(files, lambda rel, kind: kind))


TASKS: dict[str, Callable[[], Task]] = {
    "package": package_task, "library": library_task, "kind": kind_task,
}


def write_csv(task: Task, stem: Path) -> None:
    for split, pairs in (("train", task.train), ("val", task.val)):
        with open(f"{stem}.{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(pairs)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/tasks")
    out.mkdir(parents=True, exist_ok=True)
    for name, make in TASKS.items():
        task = make()
        write_csv(task, out / name)
        print(task.describe())
