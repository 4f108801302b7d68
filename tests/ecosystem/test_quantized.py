"""Quantized bases (torchao int8 weight-only, on the CPU): quantize, inject, train, save, load.

Inject-then-quantize would quantize the adapters too (torchao's default filter takes every
nn.Linear): adapterkit refuses to train such adapters, and ``base_linears`` keeps them out.
"""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit import AdapterConfig, NoGradientError
from tests.conftest import make_gpt

pytest.importorskip("torchao", reason="needs the 'quant' extra: pip install -e '.[quant]'")
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402

from adapterkit.integrations.torchao import base_linears  # noqa: E402

TARGETS = ["mha_block", "ffn_block"]
CONFIG = AdapterConfig(bottleneck=8, dropout=0.0, init="normal", init_std=0.05)


def quantized_gpt():
    model = make_gpt()
    quantize_(model, Int8WeightOnlyConfig())
    return model


def bert_cls():
    t = pytest.importorskip("transformers", reason="needs the 'hf' extra")
    torch.manual_seed(0)
    config = t.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, num_labels=3)
    model = t.BertForSequenceClassification(config)
    # the classifier trains beside the adapters: it stays float, as heads usually do
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "classifier")
    return model


def gpt_case():
    tokens = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(1))
    return quantized_gpt, TARGETS, ["adapters"], lambda m: m(tokens)


def bert_case():
    ids = torch.randint(1, 60, (3, 8), generator=torch.Generator().manual_seed(2))
    return bert_cls, "auto", ["adapters", "classifier"], lambda m: m(input_ids=ids).logits


def is_int8(t: torch.Tensor) -> bool:
    return type(t).__name__ == "Int8Tensor"


@pytest.mark.parametrize("case", [gpt_case, bert_case], ids=["gpt", "bert"])
def test_quantize_inject_train_then_save_and_load_onto_a_fresh_quantized_base(case, tmp_path):
    build, targets, train, run = case()
    model = adapterkit.inject(build(), targets, CONFIG)
    int8 = {n: p for n, p in model.named_parameters() if is_int8(p)}
    assert int8 and not any(".adapterkit." in n for n in int8)  # the base is int8 ...
    adapter_params = [p for a in adapterkit.adapters(model).values() for p in a.parameters()]
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in adapter_params)
    adapterkit.freeze(model, train=train)
    before = {n: p.qdata.clone() for n, p in int8.items()}
    trained = list(adapter_params)
    start = [p.detach().clone() for p in trained]
    optim = torch.optim.AdamW(adapterkit.trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        optim.zero_grad()
        run(model).float().logsumexp(-1).mean().backward()
        assert all(p.grad is None for p in int8.values())
        optim.step()
    assert all(not torch.equal(p, s) for p, s in zip(trained, start, strict=True))  # ... learns
    assert all(torch.equal(int8[n].qdata, q) for n, q in before.items())  # ... the base does not

    adapterkit.save_adapters(model, tmp_path / "a", include=train[1:])
    fresh = adapterkit.load_adapters(build(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(run(fresh.eval()), run(model.eval()))


def test_inject_then_quantize_is_refused_by_freeze_naming_the_fix():
    model = adapterkit.inject(make_gpt(), TARGETS, CONFIG)
    quantize_(model, Int8WeightOnlyConfig())  # the default filter takes the adapters' layers
    assert any(is_int8(a.down.weight) for a in adapterkit.adapters(model).values())
    before = [(n, p.requires_grad) for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match=r"has quantized weights \(down.weight, up.weight\).*"
                       r"Quantize the base before inject.*base_linears\(model\)"):
        adapterkit.freeze(model, train=["adapters"])
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == before


def test_freeze_refuses_to_train_any_quantized_weight():
    model = adapterkit.inject(quantized_gpt(), TARGETS, CONFIG)
    with pytest.raises(ValueError, match=r"parameter 'cls.weight' is quantized .*leave it out"):
        adapterkit.freeze(model, train=["adapters", "cls"])


def test_inject_then_quantize_is_refused_at_the_first_training_forward(tokens):
    model = adapterkit.inject(make_gpt(), TARGETS, CONFIG)
    quantize_(model, Int8WeightOnlyConfig())
    with pytest.raises(NoGradientError, match="yet it is being trained"):
        model.train()(tokens)  # the adapters' biases still require grad: only they would learn
    with torch.no_grad():
        model.eval()(tokens)  # inference with quantized adapters is fine


def test_base_linears_keeps_the_adapters_out_of_quantize(tokens):
    model = adapterkit.inject(make_gpt(), TARGETS, CONFIG)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=base_linears(model))
    assert is_int8(model.decoder_blocks[0].mha_block.q_proj.weight)
    assert not any(is_int8(p) for a in adapterkit.adapters(model).values()
                   for p in a.parameters())
    adapterkit.freeze(model, train=["adapters"])
    model.train()(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in adapterkit.trainable_parameters(model))
