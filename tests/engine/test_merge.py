"""merge(): a linear set folded into the weights computes the same function, with no adapter
left; unmerge() restores the model bit for bit; every refusal leaves the model unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import assert_same, make_gpt, snapshot

D = 32


def linear_cfg(placement: str = "sequential", **kw: Any) -> AdapterConfig:
    return AdapterConfig(**{"bottleneck": 4, "activation": "identity", "placement": placement,
                            "init": "normal", "init_std": 0.2, "dropout": 0.0, "scaling": 1.5,
                            **kw})


def _trained_biases(model: nn.Module, name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    for adapter in adapterkit.adapters(model, name).values():
        with torch.no_grad():
            adapter.down.bias.normal_(std=0.2, generator=gen)
            adapter.up.bias.normal_(std=0.2, generator=gen)


def _gpt2() -> nn.Module:
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return t.GPT2LMHeadModel(t.GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=100,
                                          n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))


def _bert() -> nn.Module:
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return t.BertModel(t.BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, vocab_size=100,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _tokens() -> torch.Tensor:
    return torch.randint(2, 61, (2, 7), generator=torch.Generator().manual_seed(1))


def _out(y: Any) -> torch.Tensor:
    return y if torch.is_tensor(y) else y[0]


# (model, targets, placement): Linear targets of the reference GPT and BERT, GPT-2's Conv1D
CASES: list[tuple[str, Callable[[], nn.Module], Any, str]] = [
    ("GPT sequential", make_gpt, ["out_proj", "fc2"], "sequential"),
    ("GPT parallel", make_gpt, ["q_proj", "out_proj"], "parallel"),
    ("GPT-2 sequential (Conv1D)", _gpt2, ["c_proj", "c_attn"], "sequential"),
    ("GPT-2 parallel (Conv1D)", _gpt2, ["attn.c_proj"], "parallel"),
    ("BERT sequential", _bert, "auto", "sequential"),
    ("BERT parallel", _bert, ["attention.output.dense", "attention.self.value"], "parallel"),
]


@pytest.mark.parametrize(("build", "targets", "placement"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_merge_computes_the_same_function_and_unmerge_restores_bit_for_bit(
        build, targets, placement) -> None:
    model = build().eval()
    x = _tokens()
    base = _out(model(x))
    adapterkit.inject(model, targets, linear_cfg(placement), name="lin")
    _trained_biases(model, "lin")
    adapted = _out(model(x))
    assert not torch.allclose(adapted, base, atol=1e-3)
    before = snapshot(model)
    classes = {name: type(m) for name, m in model.named_modules()}

    merged = adapterkit.merge(model, "lin")
    assert adapterkit.adapters(model) == {} and adapterkit.active(model) == []
    for qname in merged.modules:  # the wrapped modules are plain base modules again
        assert type(model.get_submodule(qname)) is classes[qname]._adapterkit_base
    torch.testing.assert_close(_out(model(x)), adapted, rtol=1e-4, atol=1e-5)
    assert "lin" in str(merged) and merged.modules[0] in str(merged)

    adapterkit.unmerge(model, merged)
    assert_same(model, before)
    assert adapterkit.active(model) == ["lin"]
    assert torch.equal(_out(model(x)), adapted)


def test_parallel_identity_on_a_linear_is_lora_with_a_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D))
    adapterkit.inject(model, ["0"], linear_cfg("parallel"), name="lora")
    _trained_biases(model, "lora")
    adapter = adapterkit.adapters(model, "lora")["0"]
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    adapterkit.merge(model, "lora")
    s, up, down = 1.5, adapter.up, adapter.down
    torch.testing.assert_close(model[0].weight, w + s * up.weight @ down.weight)  # W + B A
    torch.testing.assert_close(model[0].bias, b + s * (up.weight @ down.bias + up.bias))


def test_a_linear_without_bias_gets_one_and_unmerge_takes_it_away() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D, bias=False)).eval()
    adapterkit.inject(model, ["0"], linear_cfg(), name="lin")
    _trained_biases(model, "lin")
    x = torch.randn(3, D)
    adapted, before = model(x), snapshot(model)
    merged = adapterkit.merge(model, "lin")
    assert merged.new_bias == ("0",) and "added" in str(merged)
    assert model[0].bias is not None and "0.bias" in model.state_dict()
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)
    adapterkit.unmerge(model, merged)
    assert model[0].bias is None
    assert_same(model, before)


def test_merging_the_first_of_two_active_sets_keeps_the_second(tokens: torch.Tensor) -> None:
    model = make_gpt().eval()
    adapterkit.inject(model, ["out_proj"], linear_cfg(), name="lin")
    adapterkit.inject(model, ["out_proj", "ffn_block"], AdapterConfig(init="normal", dropout=0.0,
                                                                      init_std=0.2), name="gelu")
    expected = model(tokens)
    adapterkit.merge(model, "lin")
    assert adapterkit.active(model) == ["gelu"]
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-5)


def test_merging_an_inactive_set_makes_it_take_effect(tokens: torch.Tensor) -> None:
    model = make_gpt().eval()
    adapterkit.inject(model, ["out_proj"], linear_cfg(), name="lin")
    expected = model(tokens)
    adapterkit.set_active(model, [])
    adapterkit.merge(model, "lin")
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-5)


def _refusal_model() -> nn.Module:
    model = make_gpt()
    adapterkit.inject(model, ["out_proj"], linear_cfg(), name="lin")
    adapterkit.inject(model, ["out_proj"], linear_cfg(), name="lin2")
    adapterkit.inject(model, ["fc2"], AdapterConfig(bottleneck=2), name="gelu")
    adapterkit.inject(model, ["ffn_block"], linear_cfg(), name="block")
    adapterkit.inject(model, ["fc2"], linear_cfg(dropout=0.1), name="drop")
    return model.eval()


@pytest.mark.parametrize(("setup", "name", "match"), [
    (None, "gelu", "its activation is 'gelu', so its branch is not linear"),
    (None, "block", "module 'decoder_blocks.0.ffn_block' is a FeedForward, not a Linear"),
    (lambda m: m.train(), "drop", r"in train mode: its dropout \(0.1\).*model.eval\(\) first"),
    (lambda m: adapterkit.set_active(m, ["lin", "lin2"]), "lin2",
     "at 'decoder_blocks.0.mha_block.out_proj' it runs after lin"),
    (lambda m: adapterkit.fuse(m, ["lin", "lin2"], name="f"), "lin",
     "cannot merge set 'lin': fusion 'f' fuses it"),
    (lambda m: adapterkit.fuse(m, ["lin", "lin2"], name="f"), "f", "it is a fusion"),
    (lambda m: adapterkit.set_active(m, adapterkit.average({"lin": 0.5, "lin2": 0.5})), "lin",
     r"the active average\(\{'lin': 0.5, 'lin2': 0.5\}\) uses it"),
    (None, "zz", "no adapter set named 'zz'"),
])
def test_refusals_leave_the_model_unchanged(setup, name, match) -> None:
    model = _refusal_model()
    if setup is not None:
        setup(model)
    before, active = snapshot(model), adapterkit.active(model)
    with pytest.raises(ValueError, match=match):
        adapterkit.merge(model, name)
    assert_same(model, before)
    assert adapterkit.active(model) == active


def test_tied_weights_are_refused() -> None:
    model = _gpt2()  # lm_head.weight is the token embedding's
    adapterkit.inject(model, ["lm_head"], linear_cfg(d_model=100), name="lin")
    before = snapshot(model)
    with pytest.raises(ValueError, match="its weight is shared with transformer.wte.weight"):
        adapterkit.merge(model, "lin")
    assert_same(model, before)


def test_fx_models_are_refused() -> None:
    model = nn.Sequential(nn.Linear(D, D))
    gm = adapterkit.inject(model, ["0"], linear_cfg(), name="lin", method="fx")
    with pytest.raises(ValueError, match="injected with method='fx'"):
        adapterkit.merge(gm, "lin")


def test_unmerge_refuses_changed_weights_a_second_undo_and_a_new_set_of_the_name() -> None:
    model = nn.Sequential(nn.Linear(D, D)).eval()
    adapterkit.inject(model, ["0"], linear_cfg(), name="lin")
    merged = adapterkit.merge(model, "lin")
    adapterkit.inject(model, ["0"], linear_cfg(), name="lin")
    with pytest.raises(ValueError, match="holds a set of that name again"):
        adapterkit.unmerge(model, merged)
    adapterkit.eject(model, "lin")
    with torch.no_grad():
        model[0].weight.add_(1.0)  # e.g. a training step on the merged model
    before = snapshot(model)
    with pytest.raises(ValueError, match="the weights of '0' changed after the merge"):
        adapterkit.unmerge(model, merged)
    assert_same(model, before)

    model = nn.Sequential(nn.Linear(D, D)).eval()
    adapterkit.inject(model, ["0"], linear_cfg(), name="lin")
    merged = adapterkit.merge(model, "lin")
    adapterkit.unmerge(model, merged)
    with pytest.raises(ValueError, match="already unmerged"):
        adapterkit.unmerge(model, merged)
