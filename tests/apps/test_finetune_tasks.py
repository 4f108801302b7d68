"""`adapterkit finetune --task NAME TRAIN VAL ...`: several tasks on one base, each an adapter
set with its own head (its own number of labels) and LayerNorms, trained in mixed batches.

The tiny BERT of test_finetune.py, and two tiny tasks written as CSV files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapterkit

transformers = pytest.importorskip("transformers", reason="needs the 'hf' extra")

from adapterkit.apps import classify, cli, multitask  # noqa: E402
from adapterkit.apps.classify import Classifier, Recipe, encode, predict  # noqa: E402
from adapterkit.apps.textdata import read_task  # noqa: E402
from tests.apps.test_finetune import ANIMALS, MONEY, tiny_model, write_csv  # noqa: E402, F401

COLOURS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """topic: animal or money (2 labels); colour: red, green or blue (3 labels)."""
    root = tmp_path_factory.mktemp("tasks")
    words = ANIMALS + MONEY

    def topic(n: int, offset: int) -> list[tuple[str, str]]:
        return [(f"the {words[(i + offset) % 12]} {COLOURS[i % 3]}",
                 "animal" if (i + offset) % 12 < 6 else "money") for i in range(n)]

    def colour(n: int, offset: int) -> list[tuple[str, str]]:
        return [(f"a {words[(i + offset) % 12]} is {COLOURS[(i + offset) % 3]}",
                 COLOURS[(i + offset) % 3]) for i in range(n)]

    return {name: (write_csv(root / f"{name}-train.csv", make(30, 0)),
                   write_csv(root / f"{name}-val.csv", make(12, 5)))
            for name, make in (("topic", topic), ("colour", colour))}


def task_args(two_tasks: dict[str, tuple[Path, Path]]) -> list[str]:
    return [a for name, (train, val) in two_tasks.items()
            for a in ("--task", name, str(train), str(val))]


@pytest.fixture(scope="module")
def trained(tiny_model: Path, two_tasks: dict[str, tuple[Path, Path]],  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of `finetune --task topic ... --task colour ...` (8 steps)."""
    out = tmp_path_factory.mktemp("multitask") / "out"
    code = cli.main(["finetune", "--no-progress", "--model", str(tiny_model),
                     *task_args(two_tasks), "--steps", "8", "--bottleneck", "4",
                     "--evals", "2", "--out", str(out)])
    assert code == 0
    return out


def test_two_tasks_on_one_base_each_saved_and_reloaded_alone(
        tiny_model: Path, two_tasks: dict[str, tuple[Path, Path]], trained: Path,  # noqa: F811
        ) -> None:
    out = trained
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["topic", "colour"]
    for name, labels in (("topic", 2), ("colour", 3)):
        r = results["tasks"][name]["adapters"]  # the fields of a single-task regime
        assert 0 <= r["accuracy"] <= 1 and r["steps"] == 8
        assert [s for s, _ in r["curves"][0]] == [0, 4, 8]
        assert r["curves"][0][-1][1] == r["accuracy"]
        reload = results["reload"][name]
        assert reload["matches"] and reload["accuracy_reloaded"] == r["accuracy"]
        saved = out / name
        assert sorted(p.name for p in saved.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "labels.json"]
        meta = json.loads((saved / "adapter_config.json").read_text())
        assert meta["owned"]["head"]["shapes"]["weight"] == [labels, 32]
        # the set loads alone into a fresh base and gives that accuracy
        task = read_task(*two_tasks[name])
        val = encode(transformers.AutoTokenizer.from_pretrained(tiny_model),
                     [t for t, _ in task.val], task.ids(task.val), Recipe().max_length)
        fresh = Classifier(transformers.AutoModel.from_pretrained(tiny_model), 2)
        adapterkit.load_adapters(fresh, saved)
        preds = predict(fresh, val)
        assert (preds == val.labels).float().mean().item() == r["accuracy"]
        # a task's trainable parameters: its adapters, its LayerNorms and its head
        n_norms = 5 * 2 * 32
        assert r["trainable"] == 2 * 2 * (2 * 32 * 4 + 4 + 32) + n_norms + 32 * labels + labels
    assert (out / "curves.png").is_file()


def test_mixed_batches_train_each_set_on_its_own_examples_only(
        tiny_model: Path, two_tasks: dict[str, tuple[Path, Path]]) -> None:  # noqa: F811
    """A step on texts of one task changes that set and nothing else: the base, and the
    other task's adapters, LayerNorms and head stay as they were."""
    from adapterkit.apps.classify import load_encoder

    fresh, tokenizer = load_encoder(tiny_model)
    recipe = Recipe(steps=1, batch_size=4, bottleneck=4, probe=False, evals=1)
    data = []
    for name, (train, val) in two_tasks.items():
        task = read_task(train, val)
        rows = task.train[:4] if name == "topic" else task.train[:1]
        data.append(multitask.TaskData(
            name, task, encode(tokenizer, [t for t, _ in rows], task.ids(rows), 48),
            encode(tokenizer, [t for t, _ in task.val], task.ids(task.val), 48)))
    model = multitask.build_tasks(fresh, data, recipe, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lengths = [len(i) for t in data for i in t.train.ids]  # 4 topic texts, then 1 colour
    batch = classify.train_order(lengths, 4, 1, torch.Generator().manual_seed(0))[0]
    seen = {"topic" if r < 4 else "colour" for r in batch}
    assert len(seen) == 1  # seed 0 draws one task's texts: the other set must not move
    multitask.train_tasks(model, data, recipe, 0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    sets = {name for name in ("topic", "colour") if any(f".adapterkit.{name}." in k
                                                         for k in changed)}
    assert sets == seen  # only the sets whose texts were in the batch
    assert all(any(f".adapterkit.{name}." in k for name in seen) for k in changed)  # no base


def test_task_flags_refuse_mixing_with_train_and_other_regimes(
        two_tasks: dict[str, tuple[Path, Path]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    train, val = two_tasks["topic"]
    cases = {("--train", str(train), "--val", str(val)): "not both",
             ("--regimes", "full"): "--regimes adapters only",
             ("--task", "topic", str(train), str(val)): "given twice",
             ("--task", "adapters", str(train), str(val)): "not 'adapters'",
             ("--task", "third", str(train), str(tmp_path / "nope.csv")):
                 "--task third: --val " + str(tmp_path / "nope.csv") + ": no such file"}
    for extra, phrase in cases.items():
        code = cli.main(["finetune", "--no-progress", *task_args(two_tasks), *extra,
                         "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and phrase in err, (extra, err)
    assert not (tmp_path / "out").exists()


def alone(tiny_model: Path, folder: Path, texts: list[str]) -> list[str]:  # noqa: F811
    """What the task saved at ``folder``, loaded alone into a fresh base, predicts."""
    labels = json.loads((folder / "labels.json").read_text())
    model = Classifier(transformers.AutoModel.from_pretrained(tiny_model), 2)
    adapterkit.load_adapters(model, folder)
    data = encode(transformers.AutoTokenizer.from_pretrained(tiny_model), texts,
                  [0] * len(texts), Recipe().max_length)
    return [labels[i] for i in predict(model, data).tolist()]


def test_serving_mixed_requests_gives_what_each_task_alone_gives(
        tiny_model: Path, two_tasks: dict[str, tuple[Path, Path]], trained: Path,  # noqa: F811
        ) -> None:
    from adapterkit.apps.serve import MultiTask

    serving = MultiTask.load(tiny_model, {name: trained / name for name in two_tasks})
    texts = {name: [t for t, _ in read_task(*files).val] for name, files in two_tasks.items()}
    requests = [(name, text) for pair in zip(*[[(n, t) for t in ts] for n, ts in texts.items()],
                                             strict=True) for name, text in pair]
    requests += [("topic", "the fish"), ("colour", "a green bank is blue red")]
    got = serving.classify(requests, batch_size=5)  # batches mix the tasks and the lengths
    for name in two_tasks:
        mine = [i for i, (n, _) in enumerate(requests) if n == name]
        assert [got[i] for i in mine] == alone(tiny_model, trained / name,
                                               [requests[i][1] for i in mine])
    assert set(got) <= {"animal", "money", "red", "green", "blue"}
    assert serving.classify([]) == []
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        serving.classify([("nope", "the cat")])


def test_serving_refuses_a_folder_saved_with_include(tiny_model: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    from adapterkit.apps.serve import MultiTask

    model = Classifier(transformers.AutoModel.from_pretrained(tiny_model), 2)
    adapterkit.inject(model.encoder, "auto", adapterkit.AdapterConfig(bottleneck=4))
    path = adapterkit.save_adapters(model, tmp_path / "old", include=["head"])
    (path / "labels.json").write_text('["a", "b"]\n')
    with pytest.raises(ValueError, match="written before sets owned their heads"):
        MultiTask.load(tiny_model, {"old": path})
