"""save_adapters / load_adapters: round trips, atomic writes, and every refusal."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import adapterkit
from adapterkit import AdapterConfig, AdapterFileError
from tests.conftest import MLP, assert_same, make_gpt, snapshot

NONZERO = AdapterConfig(bottleneck=4, init="normal", init_std=0.5, dropout=0.0)


def trained(seed=0, targets=("mha_block", "ffn_block"), name="default"):
    model = make_gpt(seed).eval()
    adapterkit.inject(model, list(targets), NONZERO, name=name)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        model.cls.weight.add_(torch.randn_like(model.cls.weight))  # a head worth saving
    return model


def fresh_base_like(model, seed=99):
    """A base built with another seed, then given the trained model's base weights."""
    other = make_gpt(seed).eval()
    base = {k: v for k, v in model.state_dict().items() if ".adapterkit." not in k}
    other.load_state_dict(base)
    return other


@settings(max_examples=10, deadline=None)
@given(
    st.lists(st.sampled_from(["mha_block", "ffn_block", "q_proj", "layernorm1"]), min_size=1,
             max_size=2, unique=True).filter(lambda t: not {"q_proj", "mha_block"} <= set(t)),
    st.integers(0, 20),
)
def test_round_trip_onto_a_fresh_base(tmp_path_factory, targets, seed):
    model = trained(seed, targets)
    path = adapterkit.save_adapters(model, tmp_path_factory.mktemp("a") / "set",
                                    include=["cls"])
    other = adapterkit.load_adapters(fresh_base_like(model), path)
    x = torch.randint(0, 61, (2, 7))
    assert torch.equal(other(x), model(x))
    assert set(adapterkit.adapters(other)) == set(adapterkit.adapters(model))


def test_files_and_config_contents(tmp_path):
    model = trained()
    adapterkit.freeze(model, train=["adapters", "cls"])
    path = adapterkit.save_adapters(model, tmp_path / "out", include=["cls"])
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["format_version"] == 2 and meta["name"] == "default"
    assert meta["layouts"]["decoder_blocks.0.mha_block"] == {"d_model": 32, "feature_dim": -1}
    assert meta["config"] == NONZERO.to_dict()
    assert meta["targets"] == [f"decoder_blocks.{i}.{m}" for i in range(2)
                               for m in ("mha_block", "ffn_block")]
    assert meta["include"] == ["cls"]
    assert meta["freeze"] == {"train": ["adapters", "cls"], "freeze": []}
    assert meta["base"]["class"] == "GPT"
    assert meta["base"]["modules"]["decoder_blocks.0.mha_block"]["q_proj.weight"] == [32, 32]
    from safetensors import safe_open
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "adapters.decoder_blocks.0.mha_block.down.weight" in keys
    assert "modules.cls.weight" in keys
    assert not any("q_proj" in k for k in keys)  # adapter weights only, plus includes


def test_load_under_another_name_and_cast_to_the_model_dtype(tmp_path):
    model = trained()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    other = fresh_base_like(model).to(torch.float64)
    adapterkit.load_adapters(other, path, name="task2")
    assert adapterkit.active(other) == ["task2"]
    adapter = adapterkit.adapters(other)["decoder_blocks.0.mha_block"]
    assert adapter.up.weight.dtype == torch.float64
    source = adapterkit.adapters(model)["decoder_blocks.0.mha_block"]
    assert torch.equal(adapter.up.weight, source.up.weight.double())


def test_load_into_an_existing_set_overwrites_its_weights_in_place(tmp_path):
    model = trained()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    other = fresh_base_like(model)
    adapterkit.inject(other, ["mha_block", "ffn_block"], NONZERO)
    param = adapterkit.adapters(other)["decoder_blocks.1.ffn_block"].down.weight
    adapterkit.load_adapters(other, path)
    assert param is adapterkit.adapters(other)["decoder_blocks.1.ffn_block"].down.weight
    assert torch.equal(param, adapterkit.adapters(model)["decoder_blocks.1.ffn_block"].down.weight)


def test_an_interrupted_save_leaves_the_earlier_save_intact(tmp_path, monkeypatch):
    model = trained()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    for adapter in adapterkit.adapters(model).values():
        torch.nn.init.zeros_(adapter.up.weight)

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("adapterkit.io.adapterfile.save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        adapterkit.save_adapters(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary left behind


def test_save_replaces_an_earlier_save_but_never_foreign_files(tmp_path):
    model = trained()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    adapterkit.save_adapters(model, path)  # overwriting our own save is fine
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds other files \(notes.txt\)"):
        adapterkit.save_adapters(model, path)
    assert (path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"save_adapters: no adapter set named 'zzz'"):
        adapterkit.save_adapters(model, tmp_path / "b", name="zzz")


# -- refusals: each says what is wrong, and the model is left exactly as it was ---------------


def _edit_config(path, change):
    file = path / "adapter_config.json"
    meta = json.loads(file.read_text())
    change(meta)
    file.write_text(json.dumps(meta))


def _rewrite_tensors(path, change):
    from safetensors.torch import load_file
    tensors = load_file(str(path / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


REFUSALS = [
    ("missing key", lambda p: _rewrite_tensors(
        p, lambda t: t.pop("adapters.decoder_blocks.0.mha_block.up.bias")),
     "missing keys \\['adapters.decoder_blocks.0.mha_block.up.bias'\\]"),
    ("unexpected key", lambda p: _rewrite_tensors(
        p, lambda t: t.update({"adapters.extra": torch.zeros(1)})),
     "unexpected keys \\['adapters.extra'\\]"),
    ("shape mismatch", lambda p: _rewrite_tensors(
        p, lambda t: t.update({"adapters.decoder_blocks.0.mha_block.up.bias": torch.zeros(7)})),
     "'adapters.decoder_blocks.0.mha_block.up.bias' has shape \\[7\\], the model expects \\[32\\]"),
    ("unknown config field", lambda p: _edit_config(p, lambda m: m["config"].update(rank=8)),
     "unknown AdapterConfig field\\(s\\) \\['rank'\\]"),
    ("unknown top-level field", lambda p: _edit_config(p, lambda m: m.update(extra=1)),
     "unknown field\\(s\\) \\['extra'\\]"),
    ("newer format", lambda p: _edit_config(p, lambda m: m.update(format_version=6)),
     "format_version 6; this adapterkit reads versions up to 5: upgrade adapterkit"),
    ("bad config value", lambda p: _edit_config(p, lambda m: m["config"].update(dropout=2)),
     "AdapterConfig.dropout must be in"),
    ("damaged json", lambda p: (p / "adapter_config.json").write_text('{"format": "adapt'),
     "is damaged: not valid JSON"),
    ("damaged weights", lambda p: (p / "adapter_model.safetensors").write_bytes(
        (p / "adapter_model.safetensors").read_bytes()[:-40]),
     "is not a valid safetensors file"),
    ("missing weights", lambda p: (p / "adapter_model.safetensors").unlink(),
     "adapter_model.safetensors not found"),
    ("other base class", lambda p: _edit_config(p, lambda m: m["base"].update({"class": "BERT"})),
     "was saved from a BERT, but this model is a GPT"),
    ("other base shapes", lambda p: _edit_config(
        p, lambda m: m["base"]["modules"]["decoder_blocks.0.mha_block"].update(
            {"q_proj.weight": [64, 64]})),
     "module 'decoder_blocks.0.mha_block' parameter 'q_proj.weight' had shape \\[64, 64\\], "
     "this model's has \\[32, 32\\]"),
    ("target the model lacks", lambda p: _edit_config(
        p, lambda m: (m.update(targets=m["targets"] + ["decoder_blocks.7.mha_block"]),
                      m["layouts"].update({"decoder_blocks.7.mha_block": {
                          "d_model": 32, "feature_dim": -1}}))),
     "adapts module 'decoder_blocks.7.mha_block', which this model does not have"),
    ("a target without a layout", lambda p: _edit_config(
        p, lambda m: m["layouts"].pop("decoder_blocks.0.mha_block")),
     "'layouts' must map every target to"),
    ("a layout of the wrong type", lambda p: _edit_config(
        p, lambda m: m["layouts"]["decoder_blocks.0.mha_block"].update(feature_dim="last")),
     "'layouts' must map every target to"),
]


@pytest.mark.parametrize(("case", "damage", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_leave_the_model_unchanged(tmp_path, case, damage, message):
    model = trained()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    damage(path)
    target = fresh_base_like(model)
    snap = snapshot(target)
    with pytest.raises((AdapterFileError, FileNotFoundError), match=message):
        adapterkit.load_adapters(target, path)
    assert_same(target, snap)


def test_a_model_of_another_size_is_refused(tmp_path):
    model = trained()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    other = make_gpt(d=16, heads=2)
    snap = snapshot(other)
    with pytest.raises(AdapterFileError, match="different base"):
        adapterkit.load_adapters(other, path)
    assert_same(other, snap)


def test_loading_into_another_architecture_is_refused(tmp_path):
    model = trained()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    with pytest.raises(AdapterFileError, match="saved from a GPT, but this model is a MLP"):
        adapterkit.load_adapters(MLP(), path)


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_pickle_disguised_as_safetensors_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = trained()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    (path / "adapter_model.safetensors").write_bytes(pickle.dumps(Payload()))
    target = fresh_base_like(model)
    snap = snapshot(target)
    with pytest.raises(AdapterFileError, match="not a valid safetensors file"):
        adapterkit.load_adapters(target, path)
    assert not (tmp_path / "PWNED").exists()
    assert_same(target, snap)
    # and a torch.save zip archive is refused the same way
    torch.save({"adapters.x": Payload()}, path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="not a valid safetensors file"):
        adapterkit.load_adapters(target, path)
    assert not (tmp_path / "PWNED").exists()
