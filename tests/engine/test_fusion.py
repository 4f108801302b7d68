"""fuse(): AdapterFusion starts as the exact mean, trains alone, and lives like any set."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig, AdapterFileError, AdapterFusion
from adapterkit.io.adapterfile import FORMAT_VERSION
from tests.conftest import assert_same, make_gpt, snapshot

SETS = ["a", "b", "c"]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def with_sets(model: nn.Module, targets: object = ("mha_block", "ffn_block")) -> nn.Module:
    torch.manual_seed(1)
    for i, name in enumerate(SETS):  # trained-looking weights, one set parallel
        cfg = AdapterConfig(bottleneck=8, init="normal", init_std=0.3, dropout=0.0,
                            placement="parallel" if i == 1 else "sequential")
        for adapter in adapterkit.adapters(adapterkit.inject(model, list(targets), cfg,
                                                             name=name), name).values():
            nn.init.normal_(adapter.down.bias, std=0.3)
            nn.init.normal_(adapter.up.bias, std=0.3)
    return model


def test_a_new_fusion_is_the_mean_of_its_sets_on_a_single_module() -> None:
    model = with_sets(nn.Sequential(nn.Linear(16, 16)).eval(), ["0"])
    x = torch.randn(5, 16)
    outputs = []
    for name in SETS:
        adapterkit.set_active(model, name)
        outputs.append(model(x))
    adapterkit.fuse(model, SETS, name="f")
    adapterkit.set_active(model, "f")
    close(model(x), sum(outputs) / 3)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # the mean is not trivial


def test_a_new_fusion_is_the_mean_at_every_module_of_the_gpt(tokens: torch.Tensor) -> None:
    """At each module: h + mean of the sets' branches, which is what output averaging with
    equal weights computes there too."""
    model = with_sets(make_gpt().eval())
    adapterkit.fuse(model, SETS, name="f")
    adapterkit.set_active(model, "f")
    fused = model(tokens)
    adapterkit.set_active(model, adapterkit.average({s: 1 / 3 for s in SETS}))
    close(fused, model(tokens))
    adapterkit.set_active(model, "a")
    assert not torch.allclose(fused, model(tokens), atol=1e-3)


def test_fusion_trains_alone_and_the_key_gets_a_gradient_after_one_step(tokens) -> None:
    model = with_sets(make_gpt().train())
    adapterkit.fuse(model, SETS, name="f")
    adapterkit.set_active(model, "f")
    adapterkit.freeze(model, train=["adapters:f"])
    fusions = adapterkit.adapters(model, "f")
    assert len(fusions) == 4 and all(isinstance(f, AdapterFusion) for f in fusions.values())
    fusion_params = {id(p) for f in fusions.values() for p in f.parameters()}
    optim = torch.optim.SGD(adapterkit.trainable_parameters(model), lr=0.1)
    assert {id(p) for p in adapterkit.trainable_parameters(model)} == fusion_params

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        model(tokens).logsumexp(-1).mean().backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in fusion_params), name

    step()
    one = next(iter(fusions.values()))
    assert one.query.weight.grad.abs().sum() > 0 and one.value.weight.grad.abs().sum() > 0
    # a zero query makes every score 0 whatever the key: the key learns from the next step on
    assert one.key.weight.grad.abs().sum() == 0
    optim.step()
    step()
    assert one.key.weight.grad.abs().sum() > 0


def test_disable_switch_and_eject_like_any_set(tokens: torch.Tensor) -> None:
    model = make_gpt().eval()
    base, before = model(tokens), snapshot(model)
    with_sets(model)
    adapterkit.fuse(model, SETS, name="f")
    adapterkit.set_active(model, ["f"])
    fused = model(tokens)
    with adapterkit.disabled(model):
        close(model(tokens), base)
    assert torch.equal(model(tokens), fused)
    adapterkit.eject(model, "f")
    assert "f" not in adapterkit.active(model)
    adapterkit.eject(model)
    assert_same(model, before)


def test_ejecting_a_fused_set_is_refused_and_changes_nothing() -> None:
    model = with_sets(make_gpt())
    adapterkit.fuse(model, SETS, name="f")
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot eject set 'b': fusion 'f' fuses it; "
                                         r"eject\(model, 'f'\) first"):
        adapterkit.eject(model, "b")
    assert_same(model, before)
    adapterkit.eject(model, "f")
    adapterkit.eject(model, "b")  # now allowed
    assert sorted(adapterkit.tree.set_names(model)) == ["a", "c"]


def test_save_and_load_onto_a_fresh_base(tmp_path, tokens: torch.Tensor) -> None:
    model = with_sets(make_gpt().eval())
    adapterkit.fuse(model, SETS, name="f")
    for fusion in adapterkit.adapters(model, "f").values():  # as if trained
        nn.init.normal_(fusion.query.weight, std=0.3)
    adapterkit.set_active(model, "f")
    expected = model(tokens)
    for name in [*SETS, "f"]:
        adapterkit.save_adapters(model, tmp_path / name, name)
    meta = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    # the version that added fusion sets (the oldest that holds one), no newer than this reader
    assert meta["format_version"] == 3 <= FORMAT_VERSION
    assert meta["config"]["fusion"]["sets"] == SETS

    fresh = make_gpt().eval()
    before = snapshot(fresh)
    with pytest.raises(AdapterFileError, match=r"holds a fusion of \['a', 'b', 'c'\].*Load or "
                                               "inject the fused sets first"):
        adapterkit.load_adapters(fresh, tmp_path / "f")
    assert_same(fresh, before)
    for name in [*SETS, "f"]:
        adapterkit.load_adapters(fresh, tmp_path / name)
    adapterkit.set_active(fresh, "f")
    assert torch.equal(fresh(tokens), expected)


@pytest.mark.parametrize(("sets", "name", "match"), [
    (["a"], "f", "at least two different sets"),
    (["a", "a"], "f", "at least two different sets"),
    (["a", "zz"], "f", r"no adapter set named \['zz'\]"),
    (["a", "b"], "c", "an adapter set named 'c' is already injected"),
    (["d", "e"], "f", r"no module is wrapped by all of \['d', 'e'\]"),
    (["a", "g"], "f2", "'g' is itself a fusion"),
    ("ab", "f", "a list of set names"),
])
def test_refusals_change_nothing(sets, name, match) -> None:
    model = with_sets(make_gpt())
    adapterkit.inject(model, ["mha_block"], AdapterConfig(bottleneck=2), name="d")
    adapterkit.inject(model, ["ffn_block"], AdapterConfig(bottleneck=2), name="e")
    adapterkit.fuse(model, ["a", "c"], name="g")
    adapterkit.set_active(model, ["a"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        adapterkit.fuse(model, sets, name=name)
    assert_same(model, before)
    assert adapterkit.active(model) == ["a"]


def test_fusion_where_only_some_modules_hold_every_set(tokens: torch.Tensor) -> None:
    """Refused now: at the attention blocks, which hold only 'a', neither set ran while the
    fusion was active (tests/engine/test_fusion_partial.py has the rule)."""
    model = with_sets(make_gpt().eval())
    adapterkit.inject(model, ["ffn_block"], AdapterConfig(bottleneck=2), name="d")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'decoder_blocks\.0\.mha_block', 'decoder_blocks\.1"
                                         r"\.mha_block' hold only \['a'\]"):
        adapterkit.fuse(model, ["a", "d"], name="f")
    assert_same(model, before)


def test_zero_key_init_is_refused() -> None:
    with pytest.raises(ValueError, match="neither would ever get a gradient"):
        adapterkit.FusionConfig(sets=("a", "b"), key_init_std=0.0)


def test_fusion_of_channels_first_adapters_attends_over_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    for name in ["a", "b"]:
        adapterkit.inject(model, ["0"], AdapterConfig(bottleneck=4, init="normal",
                                                      init_std=0.3, dropout=0.0), name=name)
    assert adapterkit.adapters(model, "a")["0"].feature_dim == -3  # (N, C, H, W): channels
    x = torch.randn(2, 3, 5, 6)
    outputs = []
    for name in ["a", "b"]:
        adapterkit.set_active(model, name)
        outputs.append(model[0](x))
    adapterkit.fuse(model, ["a", "b"], name="f")
    adapterkit.set_active(model, "f")
    fusion = adapterkit.adapters(model, "f")["0"]
    assert fusion.feature_dim == -3
    close(model[0](x), (outputs[0] + outputs[1]) / 2)
    nn.init.normal_(fusion.query.weight, std=0.3)  # trained: per-pixel weights over channels
    with adapterkit.disabled(model):
        h = model[0](x)
    deltas = torch.stack([adapterkit.adapters(model, s)["0"].branch(h).movedim(-3, -1)
                          for s in ["a", "b"]], dim=-2)  # (N, H, W, 2, C)
    expected = h + fusion(h.movedim(-3, -1), deltas).movedim(-1, -3)
    close(model[0](x), expected)



def test_a_float32_fusion_on_a_bfloat16_base_returns_the_base_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    for name in ["a", "b"]:
        adapterkit.inject(model, ["0"], AdapterConfig(bottleneck=2, init="normal", dropout=0.0),
                          name=name)
    adapterkit.fuse(model, ["a", "b"], name="f")
    model[0].to(torch.bfloat16)  # the base in bfloat16; the adapters and the fusion stay float32
    for entry in adapterkit.adapters(model).values():
        entry.float()
    adapterkit.set_active(model, "f")
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    adapterkit.set_active(model, adapterkit.average({"a": 0.5, "b": 0.5}))
    torch.testing.assert_close(y, model(x))  # a new fusion: the mean, in the base's dtype


def test_save_bundle_keeps_a_fusion_and_refuses_an_active_average(tmp_path, tokens) -> None:
    from adapterkit.io.bundle import save_bundle

    model = with_sets(make_gpt().eval())
    adapterkit.fuse(model, SETS, name="f")
    for fusion in adapterkit.adapters(model, "f").values():
        nn.init.normal_(fusion.query.weight, std=0.3)
    adapterkit.set_active(model, adapterkit.average({"a": 0.5, "b": 0.5}))
    with pytest.raises(ValueError, match=r"the active list holds average\("):
        save_bundle(model, tmp_path)
    adapterkit.set_active(model, "f")
    expected = model(tokens)
    save_bundle(model, tmp_path)
    fresh = adapterkit.load_adapters(make_gpt().eval(), tmp_path)
    assert adapterkit.active(fresh) == ["f"]
    assert torch.equal(fresh(tokens), expected)


def test_freeze_counts_the_sets_of_an_active_fusion_as_running() -> None:
    import warnings

    model = with_sets(make_gpt())
    adapterkit.fuse(model, ["a", "c"], name="f")
    adapterkit.set_active(model, ["f"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapterkit.freeze(model, train=["adapters"])
    idle = [str(w.message) for w in caught if "not active" in str(w.message)]
    assert len(idle) == 1 and "['b']" in idle[0]  # a and c run inside f; b does not run
