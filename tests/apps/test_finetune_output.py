"""What `adapterkit finetune` shows while it runs and after: progress without a terminal, the
curves (accuracy and training loss, step 0 explained), and a time per step a user can check.

A 2-layer BERT of width 32 built from a config, so that these tests need no download.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the 'hf' extra")

from adapterkit.apps import cli, finetune_results, progress  # noqa: E402
from adapterkit.apps.classify import Recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORDS = "cat dog bird fish stock bond price bank the a is runs fell rose".split()
LINE = re.compile(r"^adapters, seed 0: step (\d+)/(\d+)( \(linear probe\))?"
                  r"(?:, training loss (\d+\.\d{4}))?, validation accuracy (\d\.\d{4}), \d+ s$")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(model directory, train.csv, val.csv): a tiny BERT, as save_pretrained writes it."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    files = []
    for name, n in (("train", 40), ("val", 12)):
        rows = [(f"the {WORDS[i % 4 + 4 * (i % 2)]} {WORDS[11 + i % 3]}",
                 ("animal", "money")[i % 2]) for i in range(n)]
        with (root / f"{name}.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([("text", "label"), *rows])
        files.append(root / f"{name}.csv")
    return root / "model", files[0], files[1]


def args_of(task: tuple[Path, Path, Path], out: Path, *extra: str) -> list[str]:
    model, train, val = task
    return ["finetune", "--model", str(model), "--train", str(train), "--val", str(val),
            "--bottleneck", "4", "--out", str(out), *extra]


# -- progress without a terminal --------------------------------------------------------------


def test_without_a_terminal_each_evaluation_prints_a_line(
        task: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args_of(task, tmp_path / "out", "--steps", "20")) == 0  # stderr: no tty
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("adapters, seed 0: step")]
    found = [LINE.match(line) for line in lines]
    assert all(found), lines
    assert [int(m[1]) for m in found] == list(range(0, 21, 2))  # step 0, then every 2 of 20
    assert {m[2] for m in found} == {"20"}
    assert found[0][3] and found[0][4] is None  # step 0 is the probe: no training loss yet
    assert all(m[4] for m in found[1:])
    # the lines are the numbers results.json keeps
    r = json.loads((tmp_path / "out" / "results.json").read_text())["regimes"]["adapters"]
    assert [float(m[5]) for m in found] == [round(a, 4) for _, a in r["curves"][0]]
    assert [float(m[4]) for m in found[1:]] == [round(v, 4) for _, v in r["loss_curves"][0]]
    assert re.search(r"^features of the frozen encoder: 52 texts, \d+ s$", err, re.M)
    assert "validation accuracy 0." not in out  # progress stays off stdout


def test_a_terminal_keeps_its_bars_and_gets_no_lines(
        task: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main(args_of(task, tmp_path / "out", "--steps", "4")) == 0
    err = capsys.readouterr().err
    assert re.search(r"adapters, seed 0: +\d+%\|.*\| \d/4 \[", err), err  # tqdm's bar
    assert "validation accuracy" not in err  # as before: the bars alone


def test_no_progress_means_neither_bars_nor_lines(
        task: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args_of(task, tmp_path / "out", "--steps", "4", "--no-progress")) == 0
    assert capsys.readouterr().err == ""


def test_a_progress_line_is_flushed_after_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    class Stream(io.StringIO):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def write(self, text: str) -> int:
            events.append(f"{self.name} write")
            return super().write(text)

        def flush(self) -> None:
            events.append(f"{self.name} flush")

    monkeypatch.setattr(sys, "stdout", Stream("stdout"))
    monkeypatch.setattr(sys, "stderr", Stream("stderr"))
    _, note = progress.finetune_progress(None)
    assert note is not None
    note("adapters, seed 0: step 2/4")
    assert events[0] == "stdout flush" and events[-1] == "stderr flush"
    assert sys.stderr.getvalue() == "adapters, seed 0: step 2/4\n"


@pytest.mark.slow
def test_a_shared_log_gets_every_line_in_order(task: tuple[Path, Path, Path],
                                               tmp_path: Path) -> None:
    """``adapterkit finetune > log 2>&1`` (nohup, CI): the real process, stdout a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "adapterkit",
                          *args_of(task, tmp_path / "out", "--steps", "8", "--evals", "2")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stdout
    log = run.stdout
    marks = ["task: ", "model: ", "features of the frozen encoder", "step 0/8", "step 4/8",
             "step 8/8", "adapters, seed 0: accuracy", "validation accuracy over", "results: "]
    where = [log.find(mark) for mark in marks]
    assert -1 not in where and where == sorted(where), log


# -- the curves -------------------------------------------------------------------------------


def test_about_ten_points_whatever_the_length(task: tuple[Path, Path, Path],
                                              tmp_path: Path) -> None:
    for steps, evals, expected in (("40", [], range(0, 41, 4)), ("9", ["--evals", "3"],
                                                                 (0, 3, 6, 9))):
        out = tmp_path / steps
        assert cli.main(args_of(task, out, "--no-progress", "--steps", steps, *evals)) == 0
        results = json.loads((out / "results.json").read_text())
        r = results["regimes"]["adapters"]
        assert [p[0] for p in r["curves"][0]] == list(expected)
        assert all(len(p) == 2 and 0 <= p[1] <= 1 for p in r["curves"][0])  # as before
        assert [p[0] for p in r["loss_curves"][0]] == list(expected)[1:]
        assert all(p[1] > 0 for p in r["loss_curves"][0])
        assert results["recipe"]["evals"] == (10 if not evals else 3)
    assert Recipe().evals == 10


def _summary() -> dict:
    return {
        "adapters": {"accuracy": 0.7, "accuracies": [0.7], "std": 0.0, "trainable": 10,
                     "total": 100, "seconds": 90.0, "steps": 600, "seconds_per_step": 0.15,
                     "step_seconds": 0.1, "curves": [[[0, 0.66], [300, 0.68], [600, 0.7]]],
                     "loss_curves": [[[300, 0.9], [600, 0.7]]]},
        "head": {"accuracy": 0.66, "accuracies": [0.66], "std": 0.0, "trainable": 1,
                 "total": 90, "seconds": 1.0, "steps": 600, "seconds_per_step": 1 / 600,
                 "step_seconds": 0.001, "curves": [[[0, 0.12], [300, 0.6], [600, 0.66]]],
                 "loss_curves": [[[300, 1.2], [600, 1.0]]]},
    }


def test_the_plot_has_the_loss_beside_and_says_what_step_0_is() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = finetune_results.curves_figure(_summary(), "a task")
    try:
        acc, loss = fig.axes
        assert "accuracy" in acc.get_ylabel() and "training loss" in loss.get_ylabel()
        assert [list(line.get_xdata()) for line in loss.get_lines()] == [[300, 600]] * 2
        assert list(loss.get_lines()[0].get_ydata()) == [0.9, 0.7]
        texts = " ".join(t.get_text() for t in acc.texts).replace("\n", " ")
        assert "step 0: the linear probe" in texts and "frozen encoder" in texts
        assert "66.0%" in texts  # the adapters' start, where the arrow points
        labels = [line.get_label() for line in acc.get_lines()]
        assert "head (66.0%; step 0: untrained head, 12.0%)" in labels
        assert acc.get_ylim()[0] > 12  # that start, near chance, does not flatten the rest
    finally:
        plt.close(fig)
    fig = finetune_results.curves_figure(_summary(), "a task", probe=False)
    try:
        assert not fig.axes[0].texts  # without a probe there is none to explain
    finally:
        plt.close(fig)


# -- the time per step ------------------------------------------------------------------------


def test_the_table_reports_wall_time_per_step() -> None:
    table = finetune_results.results_table(_summary())
    header, rule, adapters, head, note = table.splitlines()
    assert header.split()[-2:] == ["time", "time/step"]
    assert adapters.split()[-2:] == ["90s", "150ms"]  # 90 s / 600 steps, what a user can check
    assert head.split()[-2:] == ["1s", "2ms"]
    assert note == finetune_results.TIME_NOTE and "over their steps" in note


def test_results_hold_the_wall_time_per_step(task: tuple[Path, Path, Path],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args_of(task, tmp_path / "out", "--no-progress", "--steps", "6",
                            "--seeds", "2", "--regimes", "adapters", "head")) == 0
    out = capsys.readouterr().out
    for name, r in json.loads((tmp_path / "out" / "results.json").read_text())[
            "regimes"].items():
        assert r["steps"] == 6
        assert r["seconds_per_step"] == pytest.approx(r["seconds"] / 12)
        assert r["step_seconds"] > 0  # the median step, kept for whoever read it
        row = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert row.split()[-1] == f"{1000 * r['seconds_per_step']:.0f}ms"


def test_the_docs_show_the_table_as_it_prints() -> None:
    header = finetune_results.results_table(_summary()).splitlines()[0].split()
    for doc in (ROOT / "docs" / "cli.md", ROOT / "README.md"):
        text = doc.read_text()
        shown = [line.split() for line in text.splitlines() if line.startswith("regime ")
                 and "accuracy %" in line]
        assert all(line == header for line in shown), doc
        assert shown or doc.name == "README.md"  # docs/cli.md shows the output
        assert text.count(finetune_results.TIME_NOTE) == len(shown), doc
