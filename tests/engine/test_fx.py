"""FX mode: graph-site selection, residual discovery, the engine's contract on a GraphModule."""

from __future__ import annotations

import json
import operator
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit
from adapterkit import AdapterConfig, AdapterFileError, UntraceableModelError, calls
from adapterkit.fx import GraphSlot
from tests.conftest import MLP, assert_same, make_gpt, snapshot

NORMAL = AdapterConfig(bottleneck=4, init="normal", init_std=0.2, dropout=0.0)


class Functional(nn.Module):
    """A transformer written with F.* and bare parameters: no attention or FFN module to wrap."""

    def __init__(self, depth: int = 2, d: int = 16, heads: int = 2, *, pre_ln: bool = False,
                 pos: bool = False, tanh_gelu: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.depth, self.d, self.heads = depth, d, heads
        self.pre_ln, self.tanh_gelu = pre_ln, tanh_gelu
        shapes = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d), "w1": (2 * d, d),
                  "b1": (2 * d,), "w2": (d, 2 * d), "b2": (d,)}
        for i in range(depth):
            for name, shape in shapes.items():
                setattr(self, f"b{i}_{name}", nn.Parameter(torch.randn(shape) / d**0.5))
            for ln in ("ln1", "ln2"):
                setattr(self, f"b{i}_{ln}_w", nn.Parameter(1 + 0.1 * torch.randn(d)))
                setattr(self, f"b{i}_{ln}_b", nn.Parameter(0.1 * torch.randn(d)))
        self.pos = nn.Parameter(0.1 * torch.randn(16, d)) if pos else None

    def _p(self, i: int, name: str) -> torch.Tensor:
        return getattr(self, f"b{i}_{name}")

    def _ln(self, x: torch.Tensor, i: int, which: str) -> torch.Tensor:
        return F.layer_norm(x, (self.d,), self._p(i, f"{which}_w"), self._p(i, f"{which}_b"))

    def _act(self, u: torch.Tensor) -> torch.Tensor:
        if self.tanh_gelu:  # written out: its "u + c * u**3" is an add that is no residual
            return 0.5 * u * (1.0 + torch.tanh(0.7978845608 * (u + 0.044715 * u**3)))
        return F.gelu(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        B, T, H = x.size(0), x.size(1), self.heads
        if self.pos is not None:
            x = x + self.pos[:T]  # an add of two unrelated values: no residual
        for i in range(self.depth):
            h = self._ln(x, i, "ln1") if self.pre_ln else x
            q, k, v = (F.linear(h, self._p(i, w)).view(B, T, H, self.d // H).transpose(1, 2)
                       for w in ("wq", "wk", "wv"))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d/H)
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, self.d), self._p(i, "wo"))
            x = x if self.pre_ln else self._ln(x, i, "ln1")
            h = self._ln(x, i, "ln2") if self.pre_ln else x
            u = F.linear(h, self._p(i, "w1"), self._p(i, "b1"))
            x = x + F.linear(self._act(u), self._p(i, "w2"), self._p(i, "b2"))
            x = x if self.pre_ln else self._ln(x, i, "ln2")
        return x


def _copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Copy adapter weights in model order (the FX keys differ from the module names)."""
    pairs = zip(adapterkit.adapters(src).values(), adapterkit.adapters(dst).values(), strict=True)
    for a, b in pairs:
        b.load_state_dict(a.state_dict())


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(1))


# -- point 6: random functional transformers ---------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(depth=st.integers(1, 3), d=st.sampled_from([8, 16, 24]), heads=st.sampled_from([1, 2, 4]),
       pre_ln=st.booleans(), pos=st.booleans(), tanh_gelu=st.booleans(),
       batch=st.integers(1, 3), length=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_residual_on_random_functional_transformers(depth, d, heads, pre_ln, pos, tanh_gelu,
                                                     batch, length, seed):
    model = Functional(depth, d, heads, pre_ln=pre_ln, pos=pos, tanh_gelu=tanh_gelu,
                       seed=seed).eval()
    x = torch.randn(batch, length, d, generator=torch.Generator().manual_seed(seed))
    before = model(x)
    gm = adapterkit.inject(model, "residual", AdapterConfig(bottleneck=4), method="fx",
                           example_inputs=(x,))
    found = adapterkit.adapters(gm)
    assert list(found) == ["residual"] + [f"residual_{i}" for i in range(1, 2 * depth)]
    assert all(a.d_model == d for a in found.values())
    assert torch.equal(gm(x), before)  # identity at init

    adapterkit.freeze(gm, train=["adapters"])
    gm(x).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for adapter in found.values():
        assert all(p.grad is not None for p in adapter.parameters())
        assert adapter.up.weight.grad.abs().sum() > 0

    assert adapterkit.eject(gm) is model
    assert not any(isinstance(m, GraphSlot) for m in gm.modules())
    assert torch.equal(model(x), before)


def test_residual_site_is_on_the_branch_before_the_add():
    model = Functional(depth=1, d=8, heads=2, pre_ln=True).eval()
    x = torch.randn(2, 3, 8)
    gm = adapterkit.inject(model, "residual", NORMAL, method="fx", example_inputs=(x,))
    attn, ffn = adapterkit.adapters(gm).values()
    # the same block by hand, an adapter on each branch
    p = lambda n: getattr(model, f"b0_{n}")  # noqa: E731
    h = F.layer_norm(x, (8,), p("ln1_w"), p("ln1_b"))
    q, k, v = (F.linear(h, p(w)).view(2, 3, 2, 4).transpose(1, 2) for w in ("wq", "wk", "wv"))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = x + attn(F.linear(a.transpose(1, 2).reshape(2, 3, 8), p("wo")))
    u = F.linear(F.layer_norm(y, (8,), p("ln2_w"), p("ln2_b")), p("w1"), p("b1"))
    y = y + ffn(F.linear(F.gelu(u), p("w2"), p("b2")))
    assert torch.allclose(gm(x), y, atol=1e-6)


# -- point 4: equivalence with name mode on the reference GPT ---------------------------------


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_residual_equals_name_mode_on_gpt(x, placement):
    config = AdapterConfig(bottleneck=8, init="normal", init_std=0.1, dropout=0.0,
                           placement=placement)
    named = adapterkit.inject(make_gpt(layers=3).eval(), ["mha_block", "ffn_block"], config)
    gm = adapterkit.inject(make_gpt(layers=3).eval(), "residual", config, method="fx",
                           example_inputs=(x,))
    assert list(adapterkit.adapters(gm)) == [
        f"decoder_blocks.{i}.residual{s}" for i in range(3) for s in ("", "_1")]
    _copy_adapters(named, gm)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :4] = True  # left padding
    assert torch.allclose(gm(x), named(x), atol=1e-6, rtol=0)
    assert torch.allclose(gm(x, mask), named(x, mask), atol=1e-6, rtol=0)
    assert not torch.allclose(gm(x), make_gpt(layers=3).eval()(x), atol=1e-3)


def test_module_sites_equal_name_mode(x):
    named = adapterkit.inject(make_gpt().eval(), ["mha_block", "ffn_block"], NORMAL)
    gm = adapterkit.inject(make_gpt().eval(), ["mha_block", "ffn_block"], NORMAL, method="fx")
    assert list(adapterkit.adapters(gm)) == list(adapterkit.adapters(named))
    _copy_adapters(named, gm)
    assert torch.allclose(gm(x), named(x), atol=1e-6, rtol=0)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.lin(x)))


class Pair(nn.Module):
    """Returns a tuple that its parent unpacks while traced."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        h = self.lin(x)
        return h, None, h.sum(-1)


class UsesPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pair = Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, nothing, s = self.pair(x)
        return h * 2 + s[..., None] if nothing is None else h


@pytest.mark.parametrize("make, target", [(Twice, "lin"), (UsesPair, "pair")])
def test_module_called_twice_or_returning_a_tuple_matches_name_mode(make, target):
    x = torch.randn(4, 6)
    named = adapterkit.inject(make(), [target], NORMAL)
    gm = adapterkit.inject(make(), [target], NORMAL, method="fx")
    assert list(adapterkit.adapters(gm)) == [target]  # one slot, at every call
    _copy_adapters(named, gm)
    assert torch.allclose(gm(x), named(x), atol=1e-6)
    assert not torch.allclose(gm(x), make()(x), atol=1e-3)


# -- function and method call sites -------------------------------------------------------------


class MatMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w).transpose(0, 1)


def test_calls_linear_puts_the_adapter_after_each_call():
    model = Functional(depth=1, d=8, heads=2).eval()
    x = torch.randn(2, 3, 8)
    gm = adapterkit.inject(model, calls(F.linear), NORMAL, method="fx", example_inputs=(x,))
    widths = {k: a.d_model for k, a in adapterkit.adapters(gm).items()}
    assert widths == {"linear": 8, "linear_1": 8, "linear_2": 8, "linear_3": 8,
                      "linear_4": 16, "linear_5": 8}


def test_calls_matmul_by_hand():
    model, x = MatMul(), torch.randn(4, 6)
    gm = adapterkit.inject(model, [calls(operator.matmul)], NORMAL, method="fx",
                           example_inputs=x)
    (key, adapter), = adapterkit.adapters(gm).items()
    assert key == "matmul" and adapter.d_model == 5
    assert torch.allclose(gm(x), torch.relu(adapter(x @ model.w)).transpose(0, 1), atol=1e-6)


def test_calls_sdpa_and_methods_on_gpt(x):
    model = make_gpt().eval()
    gm = adapterkit.inject(model, calls(F.scaled_dot_product_attention), method="fx",
                           example_inputs=(x,))
    assert {k: a.d_model for k, a in adapterkit.adapters(gm).items()} == {
        f"decoder_blocks.{i}.mha_block.scaled_dot_product_attention": 8 for i in range(2)}
    assert torch.equal(gm(x), model(x))
    gm = adapterkit.inject(model, calls(torch.Tensor.transpose), AdapterConfig(d_model=8),
                           method="fx")
    assert sorted(adapterkit.adapters(gm)) == [
        f"decoder_blocks.{i}.mha_block.transpose{s}" for i in range(2)
        for s in ("", "_1", "_2", "_3")]
    assert torch.equal(gm(x), model(x))
    assert calls(torch.Tensor.transpose) == calls("transpose")


def test_site_keys_are_stable_across_traces(x):
    targets = ["residual", calls(F.scaled_dot_product_attention), "ffn_block"]
    keys = [list(adapterkit.adapters(adapterkit.inject(
        make_gpt(seed), targets, method="fx", example_inputs=(x,)))) for seed in (0, 1)]
    assert keys[0] == keys[1] and len(keys[0]) == 8


# -- point 3: the engine's contract -----------------------------------------------------------


def test_shares_parameters_and_leaves_the_model_as_it_was(x):
    model = make_gpt().eval()
    snap = snapshot(model)
    gm = adapterkit.inject(model, "residual", method="fx", example_inputs=(x,))
    assert_same(model, snap)
    base_state = model.state_dict(keep_vars=True)
    gm_state = gm.state_dict(keep_vars=True)
    assert all(gm_state[k] is t for k, t in base_state.items())  # every key, the same tensor
    assert set(gm_state) - set(base_state) == {
        k for k in gm_state if k.startswith("adapterkit_fx.") and ".default." in k}
    result = gm.load_state_dict(make_gpt(seed=3).state_dict(), strict=False)  # base checkpoint
    assert not result.unexpected_keys and all("adapterkit_fx." in k for k in result.missing_keys)
    assert torch.equal(model.cls.weight, make_gpt(seed=3).cls.weight)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = torch.tensor(0.5)  # a plain attribute: torch.fx makes it a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x) * self.scale


def test_tensor_constants_stay_off_the_model():
    model, x = Scaled(), torch.randn(3, 4)
    attrs = set(vars(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = adapterkit.inject(model, "residual", NORMAL, name="a", method="fx",
                               example_inputs=(x,))
    assert not [w for w in caught if "differs between" in str(w.message)]
    gm = adapterkit.inject(gm, ["lin"], NORMAL, name="b", method="fx")
    assert set(vars(model)) == attrs  # no _tensor_constant0 left behind
    assert set(gm.state_dict()) - set(model.state_dict()) == {
        k for k in gm.state_dict() if k.startswith("adapterkit_fx.")}
    a, b = adapterkit.adapters(gm, "a")["residual"], adapterkit.adapters(gm, "b")["lin"]
    assert torch.allclose(gm(x), x + a(b(model.lin(x)) * 0.5), atol=1e-6)


def test_freeze_summary_and_switching(x):
    model = make_gpt().eval()
    gm = adapterkit.inject(model, "residual", NORMAL, name="a", method="fx",
                           example_inputs=(x,))
    gm = adapterkit.inject(gm, ["mha_block"], NORMAL, name="b", method="fx")
    assert adapterkit.active(gm) == ["a", "b"]
    report = adapterkit.freeze(gm, train=["adapters:a", "cls"])
    per = 2 * 32 * 4 + 4 + 32
    assert report.trainable == 4 * per + sum(p.numel() for p in model.cls.parameters())
    rows = {r[0]: r[1:] for r in adapterkit.summary(gm).rows}
    assert rows["adapters[a]"] == (4 * per, 4 * per) and rows["adapters[b]"] == (0, 2 * per)

    base = model(x)
    both = gm(x)
    adapterkit.set_active(gm, ["a"])
    only_a = gm(x)
    adapterkit.set_active(gm, [])
    assert torch.equal(gm(x), base)
    adapterkit.set_active(gm, ["a", "b"])
    with adapterkit.disabled(gm):
        assert torch.equal(gm(x), base)
    assert torch.equal(gm(x), both) and not torch.allclose(only_a, both)
    assert adapterkit.active(gm) == ["a", "b"]


def test_save_and_load_onto_a_freshly_traced_base(tmp_path, x):
    gm = adapterkit.inject(make_gpt().eval(), "residual", NORMAL, method="fx",
                           example_inputs=(x,))
    out = adapterkit.save_adapters(gm, tmp_path / "a", include=["cls"])
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["base"]["graph"] is True and meta["targets"][0] == "decoder_blocks.0.residual"

    base = make_gpt().eval()
    torch.manual_seed(5)  # other adapter weights than the saved ones
    fresh = adapterkit.inject(base, "residual", NORMAL, method="fx", example_inputs=(x,))
    assert not torch.allclose(fresh(x), gm(x))
    assert adapterkit.load_adapters(fresh, out) is fresh
    assert torch.equal(fresh(x), gm(x))

    plain = make_gpt().eval()
    snap = snapshot(plain)
    with pytest.raises(AdapterFileError, match=r"method='fx'.*inject the set first"):
        adapterkit.load_adapters(plain, out)
    assert_same(plain, snap)
    wider = adapterkit.inject(make_gpt(d=48, heads=4).eval(), "residual", NORMAL, method="fx",
                              example_inputs=(x,))
    with pytest.raises(AdapterFileError, match=r"does not fit this model"):
        adapterkit.load_adapters(wider, out)


def test_eject_returns_the_base_and_leaves_no_adapter(x):
    model = make_gpt().eval()
    snap = snapshot(model)
    gm = adapterkit.inject(model, "residual", NORMAL, name="a", method="fx",
                           example_inputs=(x,))
    gm = adapterkit.inject(gm, ["mha_block"], NORMAL, name="b", method="fx")
    with pytest.raises(ValueError, match=r"no adapter set named 'c'; injected sets"):
        adapterkit.eject(gm, "c")
    assert adapterkit.eject(gm, "a") is gm
    assert list(adapterkit.adapters(gm)) == ["decoder_blocks.0.mha_block",
                                             "decoder_blocks.1.mha_block"]
    assert "residual" not in gm.code and adapterkit.active(gm) == ["b"]
    gm.train()
    assert adapterkit.eject(gm) is model
    assert model.training and model.decoder_blocks[0].training  # the mode it was used in
    model.eval()
    assert_same(model, snap)
    assert not any(isinstance(m, (GraphSlot, adapterkit.Adapter)) for m in gm.modules())
    assert "adapterkit_fx" not in gm.code and torch.equal(gm(x), model(x))


def test_deepcopy_keeps_adapters_and_eject(x):
    import copy

    gm = adapterkit.inject(make_gpt().eval(), "residual", NORMAL, method="fx",
                           example_inputs=(x,))
    twin = copy.deepcopy(gm)
    assert torch.equal(twin(x), gm(x))
    base = adapterkit.eject(twin)
    assert type(base).__name__ == "GPT" and torch.equal(base(x), make_gpt().eval()(x))
    assert base.cls.weight is not gm.get_parameter("cls.weight")


def test_runs_under_torch_compile(x):
    gm = adapterkit.inject(make_gpt().eval(), "residual", NORMAL, method="fx",
                           example_inputs=(x,))
    compiled = torch.compile(gm, backend="eager")
    assert torch.allclose(compiled(x), gm(x), atol=1e-6)


# -- point 5 and bad input: errors that leave the model as it was ------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        h = self.lin(x)
        if flip:
            h = -h
        return x + h


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x  # data-dependent: untraceable


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.gate = nn.Linear(4, 4), Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate(self.lin(x))


def test_untraceable_model_is_an_error_quoting_the_tracer():
    model = Gated()
    snap = snapshot(model)
    with pytest.raises(UntraceableModelError) as err:
        adapterkit.inject(model, "residual", method="fx")
    msg = str(err.value)
    assert "cannot be used as inputs to control flow" in msg and "x.sum() > 0" in msg
    assert "name mode" in msg and "concrete_args" in msg and "leaf_modules" in msg
    assert_same(model, snap)
    gm = adapterkit.inject(model, "residual", AdapterConfig(d_model=4), method="fx",
                           leaf_modules=[Gate])
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x)) and list(adapterkit.adapters(gm)) == ["residual"]


def test_a_transformers_model_that_does_not_trace_gets_the_same_error():
    transformers = pytest.importorskip("transformers")  # the [hf] extra
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    model = transformers.BertModel(config).eval()
    snap = snapshot(model)
    with pytest.raises(UntraceableModelError, match=r"cannot trace BertModel: .*name mode"):
        adapterkit.inject(model, "residual", method="fx")
    assert_same(model, snap)


def test_concrete_args_fix_a_python_branch():
    model, x = Branchy(), torch.randn(2, 4)
    with pytest.raises(UntraceableModelError, match="control flow"):
        adapterkit.inject(model, "residual", method="fx")
    gm = adapterkit.inject(model, "residual", NORMAL, method="fx",
                           concrete_args={"flip": True}, example_inputs=(x, True))
    (adapter,) = adapterkit.adapters(gm).values()
    # torch.fx asserts that a call passes the value it was traced with
    assert torch.allclose(gm(x, True), x + adapter(-model.lin(x)), atol=1e-6)


@pytest.mark.parametrize("targets, options, error, pattern", [
    (["mha_blok"], {}, ValueError, r"no module matches 'mha_blok'; closest: .*mha_block"),
    ([calls(F.conv2d)], {}, ValueError,
     r"calls\(conv2d\) selects nothing.*calls present: .*scaled_dot_product_attention"),
    ([calls(F.linear)], {}, ValueError, r"no such call; calls present: .*\.transpose"),
    ([calls("transpose")], {}, ValueError, r"cannot infer d_model .*example_inputs=\(\.\.\.\)"),
    (["residual"], {"example_inputs": "tokens"}, ValueError,
     r"example_inputs do not run through the traced GPT \(TypeError: embedding"),
    (["residual"], {"example_inputs": (torch.randn(2, 3),)}, ValueError,
     r"example_inputs do not run through the traced GPT"),
    (["residual"], {"tracer": "x"}, TypeError, r"unknown FX option\(s\) \['tracer'\]"),
    (["residual"], {"concrete_args": [1]}, TypeError, r"concrete_args must be a dict"),
    ([nn.MultiheadAttention], {}, ValueError, r"no module matches MultiheadAttention"),
    ([], {}, ValueError, r"targets is empty"),
])
def test_bad_input_is_refused_and_the_model_unchanged(targets, options, error, pattern):
    model = make_gpt().eval()
    snap = snapshot(model)
    with pytest.raises(error, match=pattern):
        adapterkit.inject(model, targets, method="fx", **options)
    assert_same(model, snap)


class HasOwnMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("make, targets, pattern", [
    (HasOwnMHA, ["out_proj"], r"\['attn.out_proj'\] are selected but never called"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "residual",
     r"'residual' selects nothing: the traced Sequential has no add"),
])
def test_sites_that_do_not_exist_in_the_graph(make, targets, pattern):
    with pytest.raises(ValueError, match=pattern):
        adapterkit.inject(make(), targets, method="fx")


def test_misused_selectors_and_sets(x):
    with pytest.raises(TypeError, match=r"calls\(\) takes a function or a non-empty method"):
        calls(3)
    with pytest.raises(TypeError, match=r"Linear is a module class.*targets=\[Linear\]"):
        calls(nn.Linear)
    model = make_gpt()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"exist only in a traced graph; pass method='fx'"):
        adapterkit.inject(model, [calls(F.linear)])
    assert_same(model, snap)
    gm = adapterkit.inject(model, "residual", method="fx", example_inputs=(x,))
    with pytest.raises(ValueError, match=r"already injected"):
        adapterkit.inject(gm, ["mha_block"], method="fx")
    with pytest.raises(TypeError, match=r"tracer options .* were fixed"):
        adapterkit.inject(gm, ["mha_block"], name="b", method="fx", leaf_modules=["cls"])
    named = adapterkit.inject(make_gpt(), ["mha_block"])
    with pytest.raises(ValueError, match=r"holds name-mode adapter sets \['default'\]"):
        adapterkit.inject(named, "residual", method="fx")
    taken = MLP()
    taken.adapterkit_fx = nn.Identity()
    with pytest.raises(ValueError, match=r"already has an attribute 'adapterkit_fx'"):
        adapterkit.inject(taken, ["body"], method="fx")


def test_a_graph_that_depends_on_the_mode_warns(x):
    with pytest.warns(UserWarning, match=r"differs between train and eval mode"):
        adapterkit.inject(make_gpt(dropout=0.1).train(), "residual", method="fx",
                          example_inputs=(x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapterkit.inject(make_gpt(dropout=0.0).train(), "residual", method="fx",
                          example_inputs=(x,))
    assert not [w for w in caught if "differs between" in str(w.message)]


def test_docs_example_runs():
    """docs/fx.md's worked example, run as written."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "fx.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    assert "inject(" in code
    exec(compile(code, "docs/fx.md", "exec"), {"__name__": "docs_fx"})  # noqa: S102


def test_eject_restores_modules_that_a_name_mode_set_wrapped_in_the_graph():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    gm = adapterkit.inject(model, ["0"], name="fx", method="fx")
    gm = adapterkit.inject(gm, ["2"], name="named")  # name mode on the GraphModule
    wrapped = gm.get_submodule("2")
    assert type(wrapped) is not torch.nn.Linear
    adapterkit.eject(gm, "named")
    assert type(wrapped) is torch.nn.Linear and "adapterkit" not in wrapped._modules
    assert adapterkit.active(gm) == ["fx"]
