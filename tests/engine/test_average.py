"""average() (outputs, a composition in the active list) and average_sets() (parameters)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import assert_same, make_gpt, snapshot


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def cfg(**kw: object) -> AdapterConfig:
    return AdapterConfig(**{"bottleneck": 4, "init": "normal", "init_std": 0.3, "dropout": 0.0,
                            **kw})


# -- output averaging ----------------------------------------------------------------------------


@pytest.mark.parametrize("placements", [("sequential", "sequential"), ("sequential", "parallel")])
def test_output_average_is_the_weighted_mean_of_the_sets_alone(placements) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh()).eval()
    for name, placement in zip("ab", placements, strict=True):
        adapterkit.inject(model, ["0"], cfg(placement=placement), name=name)
    x = torch.randn(5, 8)
    # the average is taken at the wrapped module, before the Tanh
    model[1].register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    seen: list[torch.Tensor] = []
    for name in "ab":
        adapterkit.set_active(model, name)
        model(x)
    adapterkit.set_active(model, adapterkit.average({"a": 0.7, "b": 0.3}))
    model(x)
    close(seen[2], 0.7 * seen[0] + 0.3 * seen[1])
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)


def test_at_every_module_the_sets_that_wrap_it_are_averaged() -> None:
    """Set a wraps both Linears, b only the second: at the first, b counts as the identity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).eval()
    adapterkit.inject(model, ["0", "2"], cfg(), name="a")
    adapterkit.inject(model, ["2"], cfg(placement="parallel"), name="b")
    a, b = adapterkit.adapters(model, "a"), adapterkit.adapters(model, "b")
    x = torch.randn(5, 8)
    adapterkit.set_active(model, adapterkit.average({"a": 0.3, "b": 0.7}))
    with adapterkit.disabled(model):
        h0 = model[0](x)
        t = torch.tanh(h0 + 0.3 * a["0"].branch(h0))
        h2 = model[2](t)
    expected = h2 + 0.3 * a["2"].branch(h2) + 0.7 * b["2"].branch(t)
    close(model(x), expected)


def test_average_of_one_set_with_weight_one_is_that_set(tokens: torch.Tensor) -> None:
    model = make_gpt().eval()
    adapterkit.inject(model, ["mha_block", "ffn_block"], cfg(), name="a")
    adapterkit.inject(model, ["ffn_block"], cfg(placement="parallel"), name="b")
    adapterkit.set_active(model, ["a", "b"])
    expected = model(tokens)
    adapterkit.set_active(model, [adapterkit.average({"a": 1.0}), adapterkit.average({"b": 1})])
    close(model(tokens), expected)
    assert [str(e) for e in adapterkit.active(model)] == ["average({'a': 1.0})",
                                                          "average({'b': 1.0})"]


@pytest.mark.parametrize(("weights", "match"), [
    ({"a": 0.7, "b": 0.7}, r"weights must sum to 1, these sum to 1.4.*e.g. \{'a': 0.5, 'b': 0.5\}"),
    ({}, "non-empty dict"),
    ({"a": float("nan"), "b": 1.0}, "the weight of 'a' must be a finite number"),
    ({"a": True}, "the weight of 'a' must be a finite number"),
])
def test_bad_weights_are_refused(weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        adapterkit.average(weights)


def test_unknown_sets_and_fusions_are_refused_by_set_active() -> None:
    model = make_gpt()
    for name in "ab":
        adapterkit.inject(model, ["ffn_block"], cfg(), name=name)
    adapterkit.fuse(model, ["a", "b"], name="f")
    adapterkit.set_active(model, ["a"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no adapter set named \['zz'\]"):
        adapterkit.set_active(model, adapterkit.average({"a": 0.5, "zz": 0.5}))
    with pytest.raises(ValueError, match="'f' is a fusion; average adapter sets only"):
        adapterkit.set_active(model, adapterkit.average({"a": 0.5, "f": 0.5}))
    assert_same(model, before)
    assert adapterkit.active(model) == ["a"]


def test_ejecting_a_set_of_the_active_average_is_refused() -> None:
    model = make_gpt()
    for name in "ab":
        adapterkit.inject(model, ["ffn_block"], cfg(), name=name)
    adapterkit.set_active(model, adapterkit.average({"a": 0.5, "b": 0.5}))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot eject set 'a': the active average\(\{'a': 0.5"):
        adapterkit.eject(model, "a")
    assert_same(model, before)


# -- parameter averaging -------------------------------------------------------------------------


def test_parameter_average_is_the_weighted_sum_of_parameters(tokens: torch.Tensor) -> None:
    model = make_gpt().eval()
    for name, std in [("a", 0.2), ("b", 0.5)]:
        adapterkit.inject(model, ["mha_block", "ffn_block"], cfg(init_std=std), name=name)
    adapterkit.set_active(model, ["a"])
    before = snapshot(model)
    adapterkit.average_sets(model, {"a": 0.25, "b": 0.75}, name="ab")
    assert adapterkit.active(model) == ["a"]  # added, not active
    sets = {n: adapterkit.adapters(model, n) for n in ["a", "b", "ab"]}
    assert list(sets["ab"]) == list(sets["a"])
    for key, ab in sets["ab"].items():
        for pname, t in ab.state_dict().items():
            a, b = sets["a"][key].state_dict()[pname], sets["b"][key].state_dict()[pname]
            close(t, 0.25 * a + 0.75 * b)
        assert ab.config == sets["a"][key].config
    outputs = []
    for name in ["a", "b", "ab"]:
        adapterkit.set_active(model, name)
        outputs.append(model(tokens))
    assert not torch.allclose(outputs[2], outputs[0], atol=1e-4)
    assert not torch.allclose(outputs[2], outputs[1], atol=1e-4)
    adapterkit.set_active(model, ["a"])
    adapterkit.eject(model, "ab")  # the inverse
    assert_same(model, before)


@pytest.mark.parametrize(("second", "weights", "match"), [
    ({"targets": ["ffn_block"]}, {"a": 0.5, "b": 0.5},
     "sets 'a' and 'b' wrap different modules"),
    ({"cfg": {"bottleneck": 2}}, {"a": 0.5, "b": 0.5}, r"differ in bottleneck \(4 vs 2\)"),
    ({"cfg": {"placement": "parallel"}}, {"a": 0.5, "b": 0.5}, "differ in placement"),
    ({}, {"a": 0.5, "zz": 0.5}, r"no adapter set named \['zz'\]"),
    ({}, {"a": 0.5, "b": float("nan")}, "the weight of 'b' must be a finite number"),
])
def test_parameter_average_refusals_change_nothing(second, weights, match) -> None:
    model = make_gpt()
    adapterkit.inject(model, ["mha_block", "ffn_block"], cfg(), name="a")
    adapterkit.inject(model, second.get("targets", ["mha_block", "ffn_block"]),
                      cfg(**second.get("cfg", {})), name="b")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        adapterkit.average_sets(model, weights, name="ab")
    assert_same(model, before)


def test_parameter_average_ignores_how_training_started_and_refuses_a_taken_name() -> None:
    model = make_gpt()
    adapterkit.inject(model, ["ffn_block"], cfg(), name="a")
    adapterkit.inject(model, ["ffn_block"], cfg(init="zeros"), name="b")
    adapterkit.average_sets(model, {"a": 0.5, "b": 0.5}, name="ab")
    with pytest.raises(ValueError, match="an adapter set named 'ab' is already injected"):
        adapterkit.average_sets(model, {"a": 0.5, "b": 0.5}, name="ab")
