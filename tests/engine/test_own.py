"""Set-owned modules: a set's own copy (or replacement) of a module runs while the set is active."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import assert_same, make_gpt, snapshot

CONFIG = AdapterConfig(bottleneck=8, init="normal", init_std=0.1, dropout=0.0)
TOKENS = torch.randint(0, 61, (4, 8), generator=torch.Generator().manual_seed(5))


def two_tasks(labels: tuple[int, int] = (61, 61)) -> nn.Module:
    """Sets a and b, each with adapters and its own head and LayerNorms (trained-looking)."""
    model = make_gpt().eval()
    torch.manual_seed(1)
    for name, n in zip("ab", labels, strict=True):
        adapterkit.inject(model, ["mha_block", "ffn_block"], CONFIG, name=name)
        adapterkit.set_active(model, [])
        head = nn.Linear(32, n)
        adapterkit.own(model, {"cls": head}, name=name)
        adapterkit.own(model, "re:.*layernorm1", name=name)
        adapterkit.set_active(model, [])
    for _, module in model.named_modules():
        if isinstance(module, adapterkit.slot.Owned):
            for p in module.parameters():
                nn.init.normal_(p, std=0.3)
    return model


def test_a_copy_starts_as_the_module_and_runs_only_while_its_set_is_active() -> None:
    model = make_gpt().eval()
    base = model(TOKENS)
    adapterkit.own(model, ["cls", "re:.*layernorm2"], name="t")
    assert adapterkit.active(model) == ["t"]
    assert torch.equal(model(TOKENS), base)  # a copy computes what the module did
    for module in adapterkit.adapters(model, "t").values():
        for p in module.parameters():
            assert p.requires_grad
            nn.init.normal_(p, std=0.3)
    assert not torch.allclose(model(TOKENS), base, atol=1e-3)
    with adapterkit.disabled(model):
        assert torch.equal(model(TOKENS), base)
    adapterkit.set_active(model, [])
    assert torch.equal(model(TOKENS), base)


def test_a_replacement_head_changes_the_output_shape_and_eject_is_exact() -> None:
    model = make_gpt().eval()
    before, base = snapshot(model), model(TOKENS)
    adapterkit.own(model, {"cls": nn.Linear(32, 3)}, name="three")
    assert model(TOKENS).shape == (4, 8, 3)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(TOKENS), model(TOKENS))
    assert torch.equal(copy.deepcopy(model)(TOKENS), model(TOKENS))
    adapterkit.eject(model)
    assert_same(model, before)
    assert torch.equal(model(TOKENS), base)


def test_freeze_trains_a_sets_own_modules_with_its_adapters() -> None:
    model = two_tasks()
    adapterkit.set_active(model, "a")
    adapterkit.freeze(model, train=["adapters:a"])
    model(TOKENS).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    owned_a = [n for n in grads if ".adapterkit.a.module." in n]
    assert owned_a and all(grads[n] is not None for n in owned_a)
    assert grads["cls.weight"] is None and all(
        grads[n] is None for n in grads if ".adapterkit.b." in n)
    summary = adapterkit.summary(model)
    assert sum(t for g, _, t in summary.rows if not g.startswith("adapters[")) + sum(
        t for g, _, t in summary.rows if g.startswith("adapters[")) == summary.total


def alone(model: nn.Module, entry, x: torch.Tensor) -> torch.Tensor:
    adapterkit.set_active(model, [] if entry is None else entry)
    return model(x)


def test_routed_runs_each_example_through_its_own_sets_modules() -> None:
    model = two_tasks()
    names = ["a", "b", None, "b"]
    with torch.no_grad(), adapterkit.routed(model, names):
        y = model(TOKENS)
    with torch.no_grad():
        for i, entry in enumerate(names):
            torch.testing.assert_close(y[i:i + 1], alone(model, entry, TOKENS[i:i + 1]),
                                       rtol=1e-5, atol=1e-6)


def test_routed_training_gives_each_set_gradients_from_its_own_examples_only() -> None:
    model = two_tasks()
    with pytest.warns(UserWarning, match="not active"):  # they train through routed() here
        adapterkit.freeze(model, train=["adapters"])
    with adapterkit.routed(model, ["a", "a", None, None]):
        model(TOKENS).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if ".adapterkit.a." in n)
    assert all(g is None for n, g in grads.items() if ".adapterkit.b." in n)


def test_routed_sets_whose_heads_differ_in_shape_are_refused_and_nothing_changes() -> None:
    model = two_tasks(labels=(3, 5))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'cls' is owned by the routed sets, and their "
                                         r"modules give outputs of different shapes"):
        with adapterkit.routed(model, ["a", "b", "a", "b"]):
            model(TOKENS)
    assert_same(model, before)
    assert adapterkit.active(model) == []


def test_two_active_sets_that_own_one_module_are_refused() -> None:
    model = two_tasks()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"sets \['a', 'b'\] both own module '"):
        adapterkit.set_active(model, ["a", "b"])
    with pytest.raises(ValueError, match=r"example 0: sets \['a', 'b'\] both own module"):
        with adapterkit.routed(model, [["a", "b"], "a", "a", "a"]):
            pass
    with pytest.raises(ValueError, match="an average or fusion mixes the sets' adapters only"):
        adapterkit.set_active(model, adapterkit.average({"a": 0.5, "b": 0.5}))
    assert_same(model, before)


@pytest.mark.parametrize(("build", "modules", "match"), [
    (lambda m: adapterkit.inject(m, ["ffn_block"], CONFIG, name="t"), "decoder_blocks.0",
     "holds modules wrapped with adapters"),
    (lambda m: adapterkit.inject(m, ["cls"], CONFIG, name="t"), "cls",
     "set 't' has an adapter there"),
    (lambda m: None, {"nope": nn.Linear(2, 2)}, "the model has no module named 'nope'"),
    (lambda m: None, "decoder_blocks", "which has no forward to run instead"),
    (lambda m: adapterkit.own(m, "decoder_blocks.0", name="t"), "decoder_blocks.0.ffn_block",
     "is inside 'decoder_blocks.0', which a set owns too"),
])
def test_own_refusals_leave_the_model_as_it_was(build, modules, match) -> None:
    model = make_gpt().eval()
    build(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        adapterkit.own(model, modules, name="t")
    assert_same(model, before)


def test_fx_models_refuse_own() -> None:
    gm = adapterkit.inject(make_gpt().eval(), ["ffn_block"], CONFIG, method="fx")
    with pytest.raises(ValueError, match="own\\(\\) needs modules to wrap"):
        adapterkit.own(gm, "cls", name="default")


def test_save_carries_owned_modules_and_loads_into_a_plain_base(tmp_path) -> None:
    model = two_tasks(labels=(3, 61))
    adapterkit.set_active(model, "a")
    expected = model(TOKENS)
    where = adapterkit.save_adapters(model, tmp_path / "a", "a", include=[])
    meta = (where / "adapter_config.json").read_text()
    assert '"format_version": 4' in meta and '"owned"' in meta
    fresh = adapterkit.load_adapters(make_gpt().eval(), where)  # the head is rebuilt: 3 labels
    assert torch.equal(fresh(TOKENS), expected)
    # into a model whose set already owns the modules: loaded into its copies
    again = adapterkit.load_adapters(two_tasks(labels=(3, 61)), where)
    adapterkit.set_active(again, "a")
    assert torch.equal(again(TOKENS), expected)


def test_compiled_model_follows_owned_switching() -> None:
    torch._dynamo.reset()
    model = two_tasks()
    compiled = torch.compile(model, backend="aot_eager")
    for entry in ["a", "b", []]:
        adapterkit.set_active(model, entry)
        torch.testing.assert_close(compiled(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-6)
