"""PEFT out: PEFT itself (``PeftModel.from_pretrained``) loads what
``save_adapters(..., format="peft")`` writes and computes adapterkit's outputs to 1e-5;
a set PEFT cannot express exactly is refused with the reason before anything is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import assert_same, snapshot
from tests.ecosystem.peft_cases import t

peft = pytest.importorskip("peft", reason="the PEFT export tests run PEFT: pip install -e "
                                          "'.[test]'")
TOLERANCE = 1e-5
BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=3)
BATCH = dict(input_ids=torch.tensor([[5, 17, 42, 8, 63, 21], [11, 70, 3, 88, 2, 2]]),
             attention_mask=torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]))


def bert(head: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = t.BertForSequenceClassification if head else t.BertModel
    return cls(t.BertConfig(**BERT)).eval()


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return t.GPT2Model(t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                    n_positions=16, bos_token_id=0, eos_token_id=0)).eval()


def trained(model: torch.nn.Module, targets: list[str], placement: str, scaling: float,
            bottleneck: int = 3, name: str = "s") -> torch.nn.Module:
    """``model`` with a linear set whose every weight and bias is random and non-zero."""
    config = AdapterConfig(bottleneck=bottleneck, activation="identity", placement=placement,
                           scaling=scaling, dropout=0.1)
    adapterkit.inject(model, targets, config, name=name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapterkit.adapters(model, name).values():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def peft_outputs(base: torch.nn.Module, path: Path) -> torch.Tensor:
    """PEFT's outputs with the folder at ``path`` loaded onto a copy of ``base``."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        out = model(**BATCH)
    return out.logits if "logits" in out else out.last_hidden_state


def ours(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(**BATCH)
    return out.logits if "logits" in out else out.last_hidden_state


CASES = {  # model, targets (Linear layers of several shapes; GPT-2's are Conv1D)
    "bert": (bert, ["query", "value", "intermediate.dense", "output.dense"]),
    "gpt2": (gpt2, ["c_attn", "c_proj", "c_fc"]),
}


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_peft_loads_what_adapterkit_writes(tmp_path: Path, arch: str, placement: str) -> None:
    make, targets = CASES[arch]
    base = make()
    model = trained(copy.deepcopy(base), targets, placement, scaling=0.7)
    want = ours(model)
    assert (want - ours(base)).abs().max() > 1e-2  # the set moves the output
    path = adapterkit.save_adapters(model, tmp_path / "lora", "s", format="peft")
    assert (peft_outputs(base, path) - want).abs().max() <= TOLERANCE
    meta = json.loads((path / "adapter_config.json").read_text())
    assert (meta["peft_type"], meta["r"], meta["lora_alpha"]) == ("LORA", 3, 0.7 * 3)
    assert meta["lora_bias"] is True and meta["lora_dropout"] == 0.1
    assert meta["fan_in_fan_out"] is (arch == "gpt2")
    assert sorted(meta["target_modules"]) == sorted(adapterkit.adapters(model, "s"))
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]


def test_modules_with_other_ranks_get_rank_and_alpha_patterns(tmp_path: Path) -> None:
    """A set whose adapters differ in width (here: loaded from PEFT with a rank_pattern,
    re-randomised) is written with rank_pattern and alpha_pattern, one scaling throughout."""
    from tests.ecosystem.peft_cases import base as fixture_base
    from tests.ecosystem.peft_cases import folder
    name = "bert_lora_rank_alpha_pattern"
    base = fixture_base(name)
    model = adapterkit.load_adapters(copy.deepcopy(base), folder(name), name="s")
    with torch.no_grad():
        for adapter in adapterkit.adapters(model, "s").values():
            adapter.down.bias.normal_(0, 0.2)  # biases too, now that it is adapterkit's
    path = adapterkit.save_adapters(model, tmp_path / "lora", "s", format="peft")
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["r"] == 4 and meta["rank_pattern"] == {
        r"^encoder\.layer\.0\.attention\.self\.query": 2,
        r"^encoder\.layer\.0\.attention\.self\.value": 6,
        r"^encoder\.layer\.1\.attention\.self\.value": 6}
    assert meta["alpha_pattern"] == {k: v * 1.0 for k, v in meta["rank_pattern"].items()}
    assert (peft_outputs(base, path) - ours(model)).abs().max() <= TOLERANCE


def test_included_modules_become_modules_to_save(tmp_path: Path) -> None:
    base = bert(head=True)
    model = trained(copy.deepcopy(base), ["query", "value"], "parallel", scaling=2.0)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)  # the head trained beside the set
    path = adapterkit.save_adapters(model, tmp_path / "lora", "s", include=["classifier"],
                                    format="peft")
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["modules_to_save"] == ["classifier"]
    assert (peft_outputs(base, path) - ours(model)).abs().max() <= TOLERANCE


def test_the_freeze_spec_guard_holds_for_peft_too(tmp_path: Path) -> None:
    model = trained(bert(head=True), ["query"], "parallel", scaling=1.0)
    adapterkit.freeze(model, train=["adapters", "classifier"])
    with pytest.raises(ValueError, match=r"the freeze spec trains \['classifier'\]"):
        adapterkit.save_adapters(model, tmp_path / "lora", "s", format="peft")
    assert not (tmp_path / "lora").exists()


def _gelu(model):
    adapterkit.inject(model, ["query"], AdapterConfig(bottleneck=2), name="s")


def _block(model):
    lin = AdapterConfig(bottleneck=2, activation="identity", init="normal")
    adapterkit.inject(model, ["attention.output"], lin, name="s")  # BertSelfOutput: a block


def _fusion(model):
    lin = AdapterConfig(bottleneck=2, activation="identity", init="normal")
    for n in ["a", "b"]:
        adapterkit.inject(model, ["query"], lin, name=n)
    adapterkit.fuse(model, ["a", "b"], name="s")


def _inside_include(model):
    lin = AdapterConfig(bottleneck=2, activation="identity", init="normal")
    adapterkit.inject(model, ["pooler.dense"], lin, name="s")


REFUSALS = [  # (what, set-up, include, the reason)
    ("gelu", _gelu, None, r"its activation is 'gelu', and LoRA's branch B A x is linear"),
    ("a block", _block, None, r"'bert.encoder.layer.0.attention.output' is a BertSelfOutput, "
                              r"not a Linear \(nor transformers' Conv1D\)"),
    ("a fusion", _fusion, None, r"it is a fusion"),
    ("inside an include", _inside_include, ["bert.pooler"],
     r"its adapters on \['bert.pooler.dense'\] sit inside included modules, which PEFT "
     r"copies whole"),
]


@pytest.mark.parametrize(("what", "setup", "include", "why"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_sets_peft_cannot_express_are_refused_before_anything_is_written(
        tmp_path: Path, what: str, setup, include, why: str) -> None:
    model = bert(head=True)
    setup(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"set 's' cannot be written as PEFT LoRA exactly: "
                                         + why):
        adapterkit.save_adapters(model, tmp_path / "lora", "s", include=include,
                                 format="peft")
    assert not (tmp_path / "lora").exists()
    assert_same(model, snap)


def test_a_channels_first_set_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    lin = AdapterConfig(bottleneck=2, activation="identity")
    adapterkit.inject(model, ["0"], lin, name="s")
    with pytest.raises(ValueError, match=r"mixes axis -3 \(a channels-first output\)"):
        adapterkit.save_adapters(model, tmp_path / "lora", "s", format="peft")
    assert not (tmp_path / "lora").exists()


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    model = trained(bert(), ["query"], "parallel", scaling=1.0)
    with pytest.raises(ValueError, match=r"format must be one of \['adapterkit', 'peft'\]"):
        adapterkit.save_adapters(model, tmp_path / "lora", "s", format="lora")
    assert not (tmp_path / "lora").exists()


def test_a_compiled_model_writes_the_folder_of_the_model_inside(tmp_path: Path) -> None:
    base = gpt2()
    model = trained(copy.deepcopy(base), ["c_attn"], "sequential", scaling=1.5)
    compiled = torch.compile(model)
    path = adapterkit.save_adapters(compiled, tmp_path / "lora", "s", format="peft")
    keys = json.loads((path / "adapter_config.json").read_text())["target_modules"]
    assert keys == ["h.0.attn.c_attn", "h.1.attn.c_attn"]  # no _orig_mod.
    assert (peft_outputs(base, path) - ours(model)).abs().max() <= TOLERANCE


def test_an_untrained_set_is_lora_with_a_zero_b(tmp_path: Path) -> None:
    """At injection (up = 0) every adapter adds nothing: still a LoRA module each, as PEFT's
    own fresh LoRA (B = 0), and PEFT computes the base's outputs."""
    base = gpt2()
    model = copy.deepcopy(base)
    linear = AdapterConfig(bottleneck=4, activation="identity", placement="parallel")
    adapterkit.inject(model, ["c_attn", "c_fc"], linear, name="s")
    path = adapterkit.save_adapters(model, tmp_path / "lora", "s", format="peft")
    meta = json.loads((path / "adapter_config.json").read_text())
    assert len(meta["target_modules"]) == 4 and meta["lora_bias"] is False
    assert torch.equal(peft_outputs(base, path), ours(base))
