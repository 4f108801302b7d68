"""AdapterConfig(dtype=...): adapters in their own precision on a low-precision base."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import make_gpt

TARGETS = ["mha_block", "ffn_block"]
F32 = AdapterConfig(bottleneck=8, dropout=0.0, dtype="float32")


def low_precision_gpt(dtype: torch.dtype = torch.bfloat16):
    return make_gpt().to(dtype).eval()


def adapter_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for a in adapterkit.adapters(model).values() for p in a.parameters()}


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_float32_adapters_on_a_low_precision_base_are_the_identity_at_init(base_dtype, tokens):
    model = low_precision_gpt(base_dtype)
    with torch.no_grad():
        before = model(tokens)
    adapterkit.inject(model, TARGETS, F32)
    assert adapter_dtypes(model) == {torch.float32}
    with torch.no_grad():
        after = model(tokens)
    assert after.dtype == base_dtype  # handed back in the base's dtype
    assert torch.equal(after, before)


def test_dtype_accepts_a_torch_dtype_and_stores_its_name():
    assert AdapterConfig(dtype=torch.float32) == AdapterConfig(dtype="float32")
    assert AdapterConfig(dtype=torch.half).to_dict()["dtype"] == "float16"
    assert AdapterConfig(dtype="float").dtype == "float32"  # torch.float's canonical name
    assert AdapterConfig().dtype is None
    with pytest.raises(ValueError, match="AdapterConfig.dtype must be a floating torch.dtype"):
        AdapterConfig(dtype=torch.int8)


def test_none_keeps_the_wrapped_modules_dtype(tokens):
    model = adapterkit.inject(low_precision_gpt(), TARGETS, AdapterConfig(bottleneck=8))
    assert adapter_dtypes(model) == {torch.bfloat16}


def _one_step_unchanged_fraction(config: AdapterConfig, tokens: torch.Tensor) -> float:
    """One AdamW step at lr 1e-4: the fraction of down.weight entries left exactly as they were."""
    model = adapterkit.inject(low_precision_gpt(), TARGETS, config).train()
    adapterkit.freeze(model, train=["adapters"])
    downs = [a.down.weight for a in adapterkit.adapters(model).values()]
    before = [w.detach().clone() for w in downs]
    optim = torch.optim.AdamW(adapterkit.trainable_parameters(model), lr=1e-4)
    model(tokens).float().logsumexp(-1).mean().backward()
    optim.step()
    same = sum(int((w == b).sum()) for w, b in zip(downs, before, strict=True))
    return same / sum(w.numel() for w in downs)


def test_small_updates_survive_in_float32_where_bfloat16_weights_lose_them(tokens):
    # a non-zero up, so that down gets a gradient in the first step
    config = AdapterConfig(bottleneck=8, dropout=0.0, init="normal", init_std=0.01)
    with pytest.warns(UserWarning, match="trainable in bfloat16"):
        lost = _one_step_unchanged_fraction(config, tokens)
    kept = _one_step_unchanged_fraction(dataclasses.replace(config, dtype="float32"), tokens)
    # Measured: bfloat16 adapters leave about 83% of the entries unchanged (a 1e-4 step is
    # below half an ulp of most of them); float32 adapters change all of them.
    assert lost > 0.5, lost
    assert kept < 0.01, kept


def test_freeze_warns_about_low_precision_adapters_unless_the_dtype_was_chosen():
    model = adapterkit.inject(low_precision_gpt(), TARGETS, AdapterConfig(bottleneck=8))
    with pytest.warns(UserWarning, match=r"set\(s\) \['default'\] trainable in bfloat16.*"
                      r"AdapterConfig\(dtype='float32'\)"):
        adapterkit.freeze(model, train=["adapters"])
    for dtype in ("float32", "bfloat16"):
        chosen = adapterkit.inject(low_precision_gpt(), TARGETS,
                                   AdapterConfig(bottleneck=8, dtype=dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            adapterkit.freeze(chosen, train=["adapters"])


def test_model_to_low_precision_keeps_the_adapters_dtype(tokens):
    model = adapterkit.inject(make_gpt().eval(), TARGETS, F32)
    model.to(torch.bfloat16)
    assert adapter_dtypes(model) == {torch.float32}
    assert model.cls.weight.dtype == torch.bfloat16
    model.half()
    assert adapter_dtypes(model) == {torch.float32}
    assert model(tokens).dtype == torch.float16
    # without a dtype in the config, adapters follow the model as any module does
    plain = adapterkit.inject(make_gpt(), TARGETS, AdapterConfig(bottleneck=8))
    assert adapter_dtypes(plain.to(torch.bfloat16)) == {torch.bfloat16}


def test_adapters_cast_by_hand_run_on_a_low_precision_base(tokens):
    model = adapterkit.inject(low_precision_gpt(), TARGETS, AdapterConfig(bottleneck=8))
    for adapter in adapterkit.adapters(model).values():
        adapter.float()
    assert model(tokens).dtype == torch.bfloat16  # no dtype mismatch error


def test_autocast_identity_at_init_and_float32_gradients(tokens):
    model = make_gpt().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(tokens)
    adapterkit.inject(model, TARGETS, F32)
    adapterkit.freeze(model, train=["adapters"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(tokens)
        assert torch.equal(after, before)
        after.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in adapterkit.trainable_parameters(model)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(a.up.weight.grad.abs().sum() > 0 for a in adapterkit.adapters(model).values())


def test_save_and_load_keep_the_dtype(tokens):
    model = adapterkit.inject(low_precision_gpt(), TARGETS,
                              AdapterConfig(bottleneck=8, dropout=0.0, init="normal",
                                            dtype=torch.float32))
    where = Path(tempfile.mkdtemp()) / "a"
    adapterkit.save_adapters(model, where)
    assert json.loads((where / "adapter_config.json").read_text())["config"]["dtype"] == "float32"
    fresh = adapterkit.load_adapters(low_precision_gpt(), where)
    assert adapter_dtypes(fresh) == {torch.float32}
    for name, adapter in adapterkit.adapters(model).items():
        for k, v in adapter.state_dict().items():
            assert torch.equal(adapterkit.adapters(fresh)[name].state_dict()[k], v)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))
