"""Round trips: a PEFT folder read by adapterkit and written again with ``format="peft"`` gives
PEFT's outputs in PEFT; a set loaded from PEFT is a set like any other (disabled, set_active,
routed beside adapterkit's sets, fuse, merge, adapterkit's own format, exact eject)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import assert_same, snapshot
from tests.ecosystem.peft_cases import base, exact_cases, folder, inputs, max_diff, outputs

peft = pytest.importorskip("peft", reason="the round trips run PEFT: pip install -e '.[test]'")
TOLERANCE = 1e-5


@pytest.mark.parametrize("name", exact_cases())
def test_peft_to_adapterkit_to_peft_gives_peft_s_outputs(tmp_path: Path, name: str) -> None:
    model = adapterkit.load_adapters(base(name), folder(name))
    path = adapterkit.save_adapters(model, tmp_path / "again", "adapter", format="peft")
    in_peft = peft.PeftModel.from_pretrained(base(name), str(path)).eval()
    assert max_diff(in_peft, name) <= TOLERANCE
    back = adapterkit.load_adapters(base(name), path)  # and adapterkit reads it again
    assert max_diff(back, name) <= TOLERANCE


GPT2 = "gpt2_lora_fan_in_fan_out"  # Conv1D layers 32 -> 96, 32 -> 128, 128 -> 32, 32 -> 32


def _hidden(model: torch.nn.Module, rows: slice | list[int] = slice(None)) -> torch.Tensor:
    batch = {k: v[rows] for k, v in inputs(GPT2).items()}
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _loaded() -> torch.nn.Module:
    return adapterkit.load_adapters(base(GPT2), folder(GPT2), name="lora")


def test_a_loaded_set_switches_and_disables_like_any_set() -> None:
    model = base(GPT2)
    plain = _hidden(model)
    adapterkit.load_adapters(model, folder(GPT2), name="lora")
    adapted = _hidden(model)
    with adapterkit.disabled(model):
        assert torch.equal(_hidden(model), plain)
    adapterkit.set_active(model, [])
    assert torch.equal(_hidden(model), plain)
    adapterkit.set_active(model, "lora")
    assert torch.equal(_hidden(model), adapted)


def test_routed_beside_an_adapterkit_set() -> None:
    model = _loaded()
    own = AdapterConfig(bottleneck=4, init="normal", init_std=0.2, dropout=0.0)
    adapterkit.inject(model, ["mlp"], own, name="mine")  # a GELU set on other modules
    names = ["lora", "mine"]
    with adapterkit.routed(model, names):
        routed = _hidden(model)
    for row, name in enumerate(names):
        adapterkit.set_active(model, name)
        assert torch.allclose(routed[row:row + 1], _hidden(model, [row]), atol=1e-6)


def test_fused_with_an_adapterkit_set_on_the_same_modules() -> None:
    model = _loaded()
    lin = AdapterConfig(bottleneck=2, activation="identity", placement="parallel",
                        init="normal", init_std=0.2, dropout=0.0)
    adapterkit.inject(model, ["c_attn", "c_proj", "c_fc"], lin, name="mine")
    adapterkit.fuse(model, ["lora", "mine"], name="f")
    adapterkit.set_active(model, "f")
    fused = _hidden(model)  # a new fusion: the mean of the two sets' outputs
    adapterkit.set_active(model, adapterkit.average({"lora": 0.5, "mine": 0.5}))
    assert torch.allclose(fused, _hidden(model), atol=1e-6)


def test_merged_and_unmerged() -> None:
    model = _loaded()
    adapted = _hidden(model)
    merged = adapterkit.merge(model, "lora")
    assert adapterkit.adapters(model) == {}
    assert (_hidden(model) - adapted).abs().max() <= TOLERANCE
    adapterkit.unmerge(model, merged)
    assert torch.equal(_hidden(model), adapted)


@pytest.mark.parametrize("name", [GPT2, "bert_lora_bias_all", "bert_lora_rank_alpha_pattern",
                                  "bert_seqcls_lora_modules_to_save"])
def test_saved_in_adapterkit_s_format_and_loaded_back(tmp_path: Path, name: str) -> None:
    model = adapterkit.load_adapters(base(name), folder(name), name="lora")
    path = adapterkit.save_adapters(model, tmp_path / "mine", "lora")
    meta = json.loads((path / "adapter_config.json").read_text())
    # per-module input widths (Conv1D 32 -> 96, rank-1 bias adapters) and ranks need version
    # 4; square query/value layers of one rank are a plain version 2 set
    assert meta["format"] == "adapterkit"
    assert meta["format_version"] == (2 if "modules_to_save" in name else 5)
    assert meta["include"] == (["classifier"] if "modules_to_save" in name else [])
    fresh = adapterkit.load_adapters(base(name), path)
    for k, v in outputs(model, name).items():
        assert torch.equal(outputs(fresh, name)[k], v)


@pytest.mark.parametrize("name", [GPT2, "bert_lora_bias_all", "t5_lora", "vit_lora"])
def test_eject_gives_back_the_base_bit_for_bit(name: str) -> None:
    model = base(name)
    snap = snapshot(model)
    adapterkit.load_adapters(model, folder(name))
    adapterkit.eject(model)
    assert_same(model, snap)
