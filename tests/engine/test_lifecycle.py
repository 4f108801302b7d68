"""Several named sets: switching, disabling, exact removal, copies, dtypes and devices."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import MLP, assert_same, make_gpt, snapshot

NONZERO = AdapterConfig(bottleneck=4, init="normal", init_std=0.5, dropout=0.0)


def models():
    """The reference GPT and a small MLP, with targets and an input each."""
    return [
        ("gpt", lambda: make_gpt().eval(), ["mha_block", "ffn_block"],
         torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))),
        ("mlp", lambda: MLP().eval(), ["inp", "body"], torch.randn(4, 8)),
    ]


MODELS = {name: rest for name, *rest in models()}
ids = list(MODELS)


@pytest.mark.parametrize("kind", ids)
def test_switching_and_stacking_order(kind):
    make, targets, x = MODELS[kind]
    model = make()
    base = model(x)
    adapterkit.inject(model, targets[:1], NONZERO, name="a")
    adapterkit.inject(model, targets[:1], NONZERO, name="b")
    both = model(x)
    adapterkit.set_active(model, ["a"])
    only_a = model(x)
    adapterkit.set_active(model, ["b", "a"])
    assert adapterkit.active(model) == ["b", "a"]
    reversed_order = model(x)
    adapterkit.set_active(model, [])
    assert torch.equal(model(x), base)
    adapterkit.set_active(model, ["a", "b"])
    assert torch.equal(model(x), both)
    assert not torch.allclose(only_a, both) and not torch.allclose(only_a, base)
    # stacked sequential adapters do not commute: the order is the application order
    assert not torch.allclose(reversed_order, both)


def test_order_on_one_module_is_the_list_order():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    adapterkit.inject(model, ["0"], NONZERO, name="a")
    adapterkit.inject(model, ["0"], NONZERO, name="b")
    a, b = adapterkit.adapters(model, "a")["0"], adapterkit.adapters(model, "b")["0"]
    x = torch.randn(3, 4)
    h = model[0].weight @ x.T
    h = h.T + model[0].bias
    adapterkit.set_active(model, ["a", "b"])
    assert torch.allclose(model(x), b(a(h)), atol=1e-6)
    adapterkit.set_active(model, ["b", "a"])
    assert torch.allclose(model(x), a(b(h)), atol=1e-6)


def test_set_active_rejects_unknown_and_duplicate_names(gpt):
    adapterkit.inject(gpt, ["mha_block"], name="a")
    with pytest.raises(ValueError, match=r"no adapter set named \['c'\]; injected sets: \['a'\]"):
        adapterkit.set_active(gpt, ["a", "c"])
    with pytest.raises(ValueError, match="active once"):
        adapterkit.set_active(gpt, ["a", "a"])
    assert adapterkit.active(gpt) == ["a"]


def test_disabled_runs_the_base_and_restores_even_after_an_error(gpt, tokens):
    base = gpt(tokens)
    adapterkit.inject(gpt, ["mha_block"], NONZERO, name="a")
    adapterkit.inject(gpt, ["ffn_block"], NONZERO, name="b")
    adapterkit.set_active(gpt, ["b", "a"])
    adapted = gpt(tokens)
    with adapterkit.disabled(gpt):
        assert adapterkit.active(gpt) == []
        assert torch.equal(gpt(tokens), base)
    assert adapterkit.active(gpt) == ["b", "a"]
    with pytest.raises(RuntimeError, match="boom"), adapterkit.disabled(gpt):
        raise RuntimeError("boom")
    assert adapterkit.active(gpt) == ["b", "a"]
    assert torch.equal(gpt(tokens), adapted)


@pytest.mark.parametrize("kind", ids)
def test_eject_one_set_then_all_restores_everything(kind):
    make, targets, x = MODELS[kind]
    model = make()
    snap = snapshot(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    originals = {n: m for n, m in model.named_modules()}
    adapterkit.inject(model, targets, NONZERO, name="a")
    adapterkit.inject(model, targets[:1], NONZERO, name="b")
    adapterkit.eject(model, "a")
    assert adapterkit.active(model) == ["b"]
    assert all(k.endswith(targets[0]) for k in adapterkit.adapters(model))
    adapterkit.eject(model)
    assert_same(model, snap)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert all(type(m).__module__ != "adapterkit.surgery" for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    model(x).sum().backward()  # the optimizer built before injection still steps the model
    opt.step()


def test_eject_unknown_set_is_an_error(gpt):
    adapterkit.inject(gpt, ["mha_block"], name="a")
    with pytest.raises(ValueError, match=r"no adapter set named 'b'; injected sets: \['a'\]"):
        adapterkit.eject(gpt, "b")


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.sampled_from(["mha_block", "ffn_block", "cls", "q_proj", "layernorm2"]),
             min_size=1, max_size=4),
    st.integers(0, 50),
)
def test_eject_round_trip_property(sets, seed):
    model = make_gpt(seed)
    snap = snapshot(model)
    for i, target in enumerate(sets):
        adapterkit.inject(model, [target], NONZERO, name=f"s{i}")
    adapterkit.freeze(model, train=["adapters", "cls"])
    for p in model.parameters():
        p.requires_grad_(True)  # freeze changes flags; the tree and tensors must come back
    adapterkit.eject(model)
    assert_same(model, snap)


@pytest.mark.parametrize(
    "clone",
    [
        copy.deepcopy,
        lambda m: pickle.loads(pickle.dumps(m)),
        lambda m: torch.load(_saved(m), weights_only=False),
    ],
    ids=["deepcopy", "pickle", "torch.save"],
)
def test_copies_of_an_adapted_model_compute_the_same(gpt, tokens, clone):
    adapterkit.inject(gpt, ["mha_block"], NONZERO, name="a")
    adapterkit.inject(gpt, ["ffn_block"], NONZERO, name="b")
    adapterkit.set_active(gpt, ["b", "a"])
    other = clone(gpt)
    assert torch.equal(other(tokens), gpt(tokens))
    assert adapterkit.active(other) == ["b", "a"]
    adapterkit.eject(other)  # the copy is a full adapted model: it can be undone too
    assert type(other.decoder_blocks[0].mha_block).__module__ == "adapterkit.models.gpt"


def _saved(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


def test_whole_state_dict_round_trips(gpt, tokens):
    adapterkit.inject(gpt, ["mha_block", "ffn_block"], NONZERO)
    other = adapterkit.inject(make_gpt(5).eval(), ["mha_block", "ffn_block"], NONZERO)
    other.load_state_dict(gpt.state_dict())
    assert torch.equal(other(tokens), gpt(tokens))


def test_meta_device_injection_allocates_nothing():
    with torch.device("meta"):
        model = make_gpt()
    adapterkit.inject(model, ["mha_block", "ffn_block"])
    assert all(p.is_meta for p in model.parameters())
    assert len(adapterkit.adapters(model)) == 4


def test_adapters_take_the_base_dtype_and_follow_to(tokens):
    model = make_gpt().to(torch.bfloat16).eval()
    adapterkit.inject(model, ["mha_block", "ffn_block"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = make_gpt().eval()
    with torch.no_grad():
        base = model.to(torch.bfloat16)(tokens)
    adapterkit.inject(model.float(), ["mha_block", "ffn_block"])
    model.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model(tokens), base)  # identity at init holds in bfloat16
