"""reset_adapters, and models built on the meta device: never an uninitialised adapter, silently."""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit import AdapterConfig, UninitialisedAdapterError
from tests.conftest import assert_same, make_gpt, snapshot

TARGETS = ["mha_block", "ffn_block"]
ZERO = AdapterConfig(bottleneck=8, dropout=0.0)


def out(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def test_reset_after_training_is_the_base_again_and_keeps_the_optimizer_valid(tokens):
    model = make_gpt().eval()
    base = out(model, tokens)
    adapterkit.inject(model, TARGETS, ZERO)
    adapterkit.freeze(model, train=["adapters"])
    params = adapterkit.trainable_parameters(model)
    optim = torch.optim.Adam(params, lr=1e-2)
    for _ in range(2):
        optim.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        optim.step()
    assert not torch.equal(out(model, tokens), base)
    assert adapterkit.reset_adapters(model) is model
    assert torch.equal(out(model, tokens), base)
    assert adapterkit.trainable_parameters(model) == params  # the same objects
    optim.zero_grad()
    model(tokens).logsumexp(-1).mean().backward()
    optim.step()  # the optimizer still updates the model's adapters
    assert not torch.equal(out(model, tokens), base)


def test_reset_one_set_leaves_the_others(tokens):
    model = make_gpt().eval()
    adapterkit.inject(model, TARGETS, AdapterConfig(init="normal", init_std=0.1), name="a")
    adapterkit.inject(model, ["ffn_block"], AdapterConfig(init="normal", init_std=0.1), name="b")
    b_before = {k: v.clone() for k, v in model.state_dict().items() if ".adapterkit.b." in k}
    adapterkit.reset_adapters(model, "a")
    for adapter in adapterkit.adapters(model, "a").values():
        assert adapter.up.weight.abs().sum() > 0  # init="normal": drawn again, not zero
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in b_before.items())


def test_reset_follows_the_seed():
    model = adapterkit.inject(make_gpt(), TARGETS, AdapterConfig(init="normal"))
    torch.manual_seed(3)
    adapterkit.reset_adapters(model)
    first = {k: v.clone() for k, v in model.state_dict().items() if ".adapterkit." in k}
    torch.manual_seed(3)
    adapterkit.reset_adapters(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in first.items())


def test_reset_of_an_unknown_set_is_refused_and_changes_nothing():
    model = adapterkit.inject(make_gpt(), TARGETS, AdapterConfig(init="normal"))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"no adapter set named 'zzz'; injected sets: \[.default"):
        adapterkit.reset_adapters(model, "zzz")
    assert_same(model, snap)


def meta_gpt():
    with torch.device("meta"):
        return make_gpt()


def test_meta_to_empty_load_base_raises_until_reset_then_is_the_base(tokens):
    base = make_gpt().eval()
    model = adapterkit.inject(meta_gpt(), TARGETS, ZERO).to_empty(device="cpu").eval()
    report = model.load_state_dict(base.state_dict(), strict=False)
    assert all(".adapterkit." in k for k in report.missing_keys) and report.missing_keys
    with pytest.raises(UninitialisedAdapterError, match="hold uninitialised memory"):
        out(model, tokens)
    adapterkit.reset_adapters(model)
    assert torch.equal(out(model, tokens), out(base, tokens))


def test_meta_assign_load_leaves_adapters_on_meta_and_reset_gives_them_memory(tokens):
    base = make_gpt().eval()
    model = adapterkit.inject(meta_gpt(), TARGETS, ZERO).eval()
    model.load_state_dict(base.state_dict(), strict=False, assign=True)
    with pytest.raises(UninitialisedAdapterError, match="still on the meta device"):
        out(model, tokens)
    adapterkit.reset_adapters(model)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(out(model, tokens), out(base, tokens))


def test_a_model_all_on_meta_is_refused_by_reset_and_runs_shape_only(tokens):
    model = adapterkit.inject(meta_gpt(), TARGETS, ZERO)
    snap_devices = [p.device.type for p in model.parameters()]
    with pytest.raises(ValueError, match=r"call model.to_empty\(device=...\)"):
        adapterkit.reset_adapters(model)
    assert [p.device.type for p in model.parameters()] == snap_devices
    assert model(tokens.to("meta")).shape == (3, 10, 61)  # a shape-only pass is fine


def test_a_full_state_dict_initialises_meta_adapters(tokens):
    trained = adapterkit.inject(make_gpt(), TARGETS, AdapterConfig(init="normal", init_std=0.1))
    model = adapterkit.inject(meta_gpt(), TARGETS, AdapterConfig(init="normal", init_std=0.1))
    model.to_empty(device="cpu").load_state_dict(trained.state_dict())
    assert torch.equal(out(model.eval(), tokens), out(trained.eval(), tokens))


def test_load_adapters_initialises_meta_adapters(tokens, tmp_path):
    trained = adapterkit.inject(make_gpt(), TARGETS, AdapterConfig(init="normal", init_std=0.1))
    adapterkit.save_adapters(trained, tmp_path / "a")
    model = adapterkit.inject(meta_gpt(), TARGETS, AdapterConfig(init="normal", init_std=0.1))
    model.load_state_dict(make_gpt().state_dict(), strict=False, assign=True)
    adapterkit.load_adapters(model, tmp_path / "a")  # into adapters still on meta
    assert torch.equal(out(model.eval(), tokens), out(trained.eval(), tokens))
