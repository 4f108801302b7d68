"""Labelled text for `adapterkit finetune`: the file readers and the default task's builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterkit.apps.data import DataError
from adapterkit.apps.textdata import (
    DEFAULT_PACKAGES,
    make_task,
    package_task,
    read_pairs,
    split_files,
)


@pytest.fixture(scope="module")
def default_task():
    return package_task()


def test_default_task_is_deterministic(default_task) -> None:
    again = package_task()
    assert again.train == default_task.train and again.val == default_task.val


def test_default_task_labels_and_sizes(default_task) -> None:
    assert default_task.labels == tuple(sorted(DEFAULT_PACKAGES))
    train_labels = {label for _, label in default_task.train}
    val_labels = {label for _, label in default_task.val}
    assert train_labels == val_labels == set(DEFAULT_PACKAGES)  # every label in both splits
    # big enough that one accuracy point is 9+ texts, small enough for minutes on 2 cores
    assert 1500 <= len(default_task.train) <= 6000
    assert 500 <= len(default_task.val) <= 2000
    assert all(len(text) >= 30 for text, _ in default_task.train + default_task.val)


def test_default_task_no_text_in_both_splits(default_task) -> None:
    train = {text for text, _ in default_task.train}
    assert not train & {text for text, _ in default_task.val}


def fake_library(root: Path, files_per_package: int = 8) -> None:
    for package in ("alpha", "beta"):
        for i in range(files_per_package):
            body = "".join(f"def f{j}():\n    '''{package} file {i}: function {j} does a thing "
                           f"worth saying.'''\n\n" for j in range(i + 1))
            path = root / package / f"m{i}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    (root / "alpha" / "broken.py").write_text("def (:\n")  # does not parse: skipped


def test_no_source_file_feeds_both_splits(tmp_path: Path) -> None:
    fake_library(tmp_path)
    task = package_task(tmp_path, packages=("alpha", "beta"))
    split_of: dict[str, set[str]] = {}
    for split, pairs in (("train", task.train), ("val", task.val)):
        for text, label in pairs:
            file = text.split(":")[0]  # "alpha file 3"
            assert file.startswith(label)
            split_of.setdefault(file, set()).add(split)
    assert len(split_of) == 16 and all(len(s) == 1 for s in split_of.values())
    for package in ("alpha", "beta"):  # a quarter of each package's texts validate, at most
        n_val = sum(label == package for _, label in task.val)
        n_all = n_val + sum(label == package for _, label in task.train)
        assert 0 < n_val <= 0.25 * n_all


def test_split_files_keeps_one_training_file() -> None:
    assert split_files({"a.py": 5}) == set()
    assert len(split_files({"a.py": 5, "b.py": 5}, val_share=0.9)) == 1
    assert split_files({"big.py": 100, "small.py": 1}, val_share=0.001) == {"small.py"}


def test_package_missing_is_an_error(tmp_path: Path) -> None:
    fake_library(tmp_path)
    with pytest.raises(DataError, match="has no prose in gamma; give --train and --val"):
        package_task(tmp_path, packages=("alpha", "gamma"))


@pytest.mark.parametrize("name, content, expected", [
    ("a.csv", "text,label\nhello there,greet\nbye now,part\n",
     [("hello there", "greet"), ("bye now", "part")]),
    ("a.csv", "\ufefftext,label\n\"one, two\",1\n", [("one, two", "1")]),  # BOM, quoted comma
    ("a.tsv", "label\ttext\nx\tsome text\n", [("some text", "x")]),
    ("a.jsonl", '{"text": "t1", "label": 3}\n\n{"text": "t2", "label": "b", "extra": 1}\n',
     [("t1", "3"), ("t2", "b")]),
])
def test_read_pairs(tmp_path: Path, name: str, content: str, expected) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert read_pairs(path) == expected


@pytest.mark.parametrize("name, content, message", [
    ("a.txt", "text,label\n", "unknown file type '.txt'; give a .csv, .tsv or .jsonl file"),
    ("a.csv", "", "the file is empty"),
    ("a.csv", "text,label\n,x\n", "line 2 has no text in column 'text'"),
    ("a.jsonl", '{"text": "t", "label": null}\n', "the label None in column 'label' is not"),
    ("a.jsonl", '{"text": "t", "label": true}\n', "the label True"),
    ("a.jsonl", '{"text": "t", "label": 1\n', "line 1 is not JSON"),
    ("a.jsonl", '{"txt": "t", "label": 1}\n', "no column 'text' (line 1 has 'txt', 'label'); "
     "name the right one with --text-column"),
])
def test_read_pairs_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_pairs(path)
    assert str(err.value).startswith(f"--train {path}: ")
    assert message in str(err.value)


def test_read_pairs_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_pairs(path)


def test_make_task_checks_labels() -> None:
    with pytest.raises(DataError, match=r"one label only \('a'\); a classifier needs"):
        make_task("t", [("x", "a"), ("y", "a")], [("z", "a")])
    with pytest.raises(DataError, match="validation labels 'c' never occur"):
        make_task("t", [("x", "a"), ("y", "b")], [("z", "c")])
    task = make_task("t", [("x", "2"), ("y", "10")], [("z", "10")])
    assert task.labels == ("2", "10") and task.ids(task.val) == [1]
