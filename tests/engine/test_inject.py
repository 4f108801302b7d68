"""inject(): the contract's properties over random models, structured outputs, and every error."""

from __future__ import annotations

import collections
import dataclasses
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import MLP, assert_same, make_gpt, snapshot

SITES = ["mha_block", "ffn_block", "layernorm1", "q_proj", "fc1", "out_proj", "fc2", "cls"]


@st.composite
def gpt_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    d = heads * draw(st.sampled_from([4, 8, 12]))
    layers = draw(st.integers(1, 3))
    max_length = draw(st.integers(4, 12))
    T = draw(st.integers(1, max_length))
    B = draw(st.integers(1, 3))
    model = make_gpt(draw(st.integers(0, 99)), vocab=draw(st.integers(5, 40)), d=d,
                     heads=heads, dff=draw(st.sampled_from([8, 24])), layers=layers,
                     max_length=max_length, dropout=draw(st.sampled_from([0.0, 0.2])))
    placement = draw(st.sampled_from(["sequential", "parallel"]))
    # a parallel branch maps the input to the output: only where the two widths agree
    sites = SITES if placement == "sequential" else SITES[:3] + ["q_proj", "out_proj"]
    targets = draw(st.lists(st.sampled_from(sites), min_size=1, max_size=3, unique=True))
    # sites may nest (mha_block contains q_proj): keep the outer ones only
    outer = {"q_proj": "mha_block", "out_proj": "mha_block", "fc1": "ffn_block", "fc2": "ffn_block"}
    targets = [t for t in targets if outer.get(t) not in targets]
    config = AdapterConfig(
        bottleneck=draw(st.sampled_from([1, 3, 16])),
        activation=draw(st.sampled_from(["gelu", "relu", "silu", "tanh", "identity"])),
        placement=placement,
        scaling=draw(st.sampled_from([1.0, 0.5, 4.0])),
        dropout=draw(st.sampled_from([0.0, 0.3])),
    )
    x = torch.randint(0, model.emb_layer.num_embeddings, (B, T),
                      generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    left = draw(st.booleans())
    pad = torch.ones(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if left:
            pad[i, T - n:] = False
        else:
            pad[i, :n] = False
    return model, targets, config, x, pad


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gpt_cases())
def test_identity_keys_and_gradients(case):
    model, targets, config, x, pad = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        y_eval = model(x, pad)
    base_dropout = any(m.p > 0 for m in model.modules() if isinstance(m, nn.Dropout))

    adapterkit.inject(model, targets, config)
    # identity at init, eval mode
    with torch.no_grad():
        y = model(x, pad)
    assert torch.isfinite(y).all()
    assert (y - y_eval).abs().max() <= 1e-6
    # identity in train mode when nothing drops out
    if not base_dropout and config.dropout == 0.0:
        model.train()
        assert (model(x, pad) - y_eval).abs().max() <= 1e-6
    # base keys and tensors unchanged
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(".adapterkit." in k for k in set(after) - set(before))
    # gradients reach exactly the trainable parameters
    adapterkit.freeze(model, train=["adapters"])
    model.train()
    model(x, pad).square().mean().backward()
    adapter_ids = {id(p) for a in adapterkit.adapters(model).values() for p in a.parameters()}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_returns_the_same_model_and_wraps_in_place(gpt):
    block = gpt.decoder_blocks[0]
    attn = block.mha_block
    assert adapterkit.inject(gpt, ["mha_block"]) is gpt
    assert gpt.decoder_blocks[0].mha_block is attn
    assert isinstance(attn, type(attn).__mro__[2])  # still an instance of its own class
    assert type(attn).__name__ == "MultiheadAttention"


def test_adapters_follow_train_and_eval(gpt):
    gpt.eval()
    adapterkit.inject(gpt, ["ffn_block"])
    assert not any(a.training for a in adapterkit.adapters(gpt).values())
    gpt.train()
    assert all(a.training for a in adapterkit.adapters(gpt).values())


def test_new_set_is_active_at_once_after_the_others(gpt):
    adapterkit.inject(gpt, ["mha_block"], name="a")
    adapterkit.inject(gpt, ["ffn_block"], name="b")
    assert adapterkit.active(gpt) == ["a", "b"]
    assert sorted(adapterkit.adapters(gpt)) == sorted(
        [f"decoder_blocks.{i}.mha_block[a]" for i in range(2)]
        + [f"decoder_blocks.{i}.ffn_block[b]" for i in range(2)]
    )
    assert list(adapterkit.adapters(gpt, "b")) == [
        "decoder_blocks.0.ffn_block", "decoder_blocks.1.ffn_block"]


def test_reduction_factor_and_inferred_d_model(gpt):
    adapterkit.inject(gpt, ["mha_block", "fc1"], AdapterConfig(reduction_factor=8))
    found = adapterkit.adapters(gpt)
    assert found["decoder_blocks.0.mha_block"].down.weight.shape == (4, 32)  # d_model attribute
    assert found["decoder_blocks.0.ffn_block.fc1"].down.weight.shape == (6, 48)  # out_features


def test_d_model_from_last_linear_inside():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 10)
            self.b = nn.Linear(10, 6)

        def forward(self, x):
            return self.b(self.a(x))

    model = nn.Sequential(Block())
    adapterkit.inject(model, ["0"], AdapterConfig(bottleneck=2))
    assert adapterkit.adapters(model)["0"].d_model == 6
    assert model(torch.randn(3, 4)).shape == (3, 6)


class GatedExperts(nn.Module):
    """A mixture-of-experts block that ends with a one-output gate, as Qwen2-MoE's does."""

    def __init__(self, d: int = 8, fused: bool = False):
        super().__init__()
        if fused:  # experts as plain tensors, no Linear inside (Mixtral in transformers 5)
            self.experts = nn.Parameter(torch.randn(2, d, d) / d)
        else:
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 16), nn.Linear(16, d))
                                         for _ in range(2))
            self.gate = nn.Linear(d, 1)

    def forward(self, x):
        if isinstance(self.experts, nn.Parameter):
            return x @ self.experts.sum(0)
        return sum(e(x) for e in self.experts) * torch.sigmoid(self.gate(x))


def test_d_model_of_a_residual_block_passes_over_a_one_output_gate():
    model = nn.Sequential(GatedExperts())
    adapterkit.inject(model, [GatedExperts], AdapterConfig(bottleneck=2))
    # the last Linear is the gate (width 1); the width the block takes in is 8
    assert adapterkit.adapters(model)["0"].d_model == 8
    assert model(torch.randn(3, 8)).shape == (3, 8)


def test_d_model_from_the_models_config_when_the_block_has_no_linear():
    class WithConfig(nn.Sequential):
        config = types.SimpleNamespace(hidden_size=8)

    model = WithConfig(GatedExperts(fused=True))
    adapterkit.inject(model, [GatedExperts], AdapterConfig(bottleneck=2))
    assert adapterkit.adapters(model)["0"].d_model == 8
    assert model(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(ValueError, match=r"cannot infer d_model for module '0'.*config"):
        adapterkit.inject(nn.Sequential(GatedExperts(fused=True)), [GatedExperts])


def test_sequential_target_keeps_running_its_own_layers():
    model = MLP().eval()
    x = torch.randn(5, 8)
    y0 = model(x)
    adapterkit.inject(model, ["body"], AdapterConfig(bottleneck=4, init="normal", init_std=0.5))
    assert len(model.body) == 3 and isinstance(model.body[2], nn.Linear)
    assert [type(m) for m in model.body] == [nn.Linear, nn.ReLU, nn.Linear]
    assert isinstance(model.body[:2], nn.Sequential) and len(model.body[:2]) == 2
    adapter = adapterkit.adapters(model)["body"]
    h = torch.relu(model.inp(x))
    body = model.body[2](model.body[1](model.body[0](h)))
    expected = model.head(h + adapter(body))
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert not torch.allclose(model(x), y0, atol=1e-4)


def test_parallel_placement_adds_a_branch_of_the_input():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin)
    cfg = AdapterConfig(bottleneck=3, placement="parallel", scaling=2.0, init="normal",
                        init_std=0.3, dropout=0.0)
    adapterkit.inject(model, ["0"], cfg)
    adapter = adapterkit.adapters(model)["0"]
    x = torch.randn(4, 8)
    expected = lin.weight @ x.T
    expected = expected.T + lin.bias + 2.0 * adapter.up(adapter.act(adapter.down(x)))
    assert torch.allclose(model(x), expected, atol=1e-6)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return (torch.zeros(2), self.lin(x), "meta")


Point = collections.namedtuple("Point", "hidden extra")


@dataclasses.dataclass
class DataOut:
    note: str
    hidden: torch.Tensor
    aux: torch.Tensor


class Structured(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return {
            "tuple": lambda: (h, h.sum()),
            "list": lambda: [h, 3],
            "namedtuple": lambda: Point(h, 1),
            "dict": lambda: {"mask": None, "hidden": h},
            "dataclass": lambda: DataOut("n", h, h.sum()),
            "none": lambda: None,
        }[self.kind]()


@pytest.mark.parametrize(
    ("kind", "get"),
    [
        ("tuple", lambda o: o[0]),
        ("list", lambda o: o[0]),
        ("namedtuple", lambda o: o.hidden),
        ("dict", lambda o: o["hidden"]),
        ("dataclass", lambda o: o.hidden),
    ],
)
def test_structured_outputs_adapt_the_first_tensor(kind, get):
    model = nn.ModuleDict({"m": Structured(kind)})
    x = torch.randn(3, 4)
    plain = model["m"](x)
    adapterkit.inject(model, ["m"], AdapterConfig(bottleneck=2, init="normal", init_std=1.0))
    out = model["m"](x)
    assert type(out) is type(plain)
    adapter = adapterkit.adapters(model)["m"].eval()
    model.eval()
    out = model["m"](x)
    assert torch.allclose(get(out), adapter(get(plain)), atol=1e-6)
    if kind == "namedtuple":
        assert out.extra == 1


def test_output_without_tensor_is_an_error_not_a_silent_pass_through():
    model = nn.ModuleDict({"m": Structured("none")})
    adapterkit.inject(model, ["m"], AdapterConfig(d_model=4))
    with pytest.raises(ValueError, match="module 'm' returned NoneType with no tensor in it, "
                                         "so the adapter of set 'default' would do nothing"):
        model["m"](torch.randn(2, 4))


def test_output_key_selects_another_tensor():
    model = nn.ModuleDict({"m": TupleOut()})
    adapterkit.inject(model, ["m"], AdapterConfig(bottleneck=2, output_key=1, init="normal",
                                                  init_std=1.0, dropout=0.0))
    x = torch.randn(2, 4)
    out = model["m"](x)
    assert torch.equal(out[0], torch.zeros(2)) and out[2] == "meta"
    assert not torch.allclose(out[1], model["m"].lin(x))


def test_output_key_that_names_no_tensor_is_an_error_at_the_forward():
    model = nn.ModuleDict({"m": TupleOut()})
    adapterkit.inject(model, ["m"], AdapterConfig(bottleneck=2, output_key=5))
    with pytest.raises(ValueError, match=r"returned tuple; output_key=5 does not name a "
                       r"tensor: tuple has keys \[0, 1, 2\]. Name a tensor, e.g. output_key=0"):
        model["m"](torch.randn(2, 4))


def test_module_under_two_paths_is_wrapped_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    adapterkit.inject(model, nn.Linear, AdapterConfig(bottleneck=2))
    assert list(adapterkit.adapters(model)) == ["0"]
    assert model(torch.randn(2, 4)).shape == (2, 4)


# -- errors: each leaves the model exactly as it was ----------------------------------------


@pytest.mark.parametrize(
    ("targets", "config", "error", "message"),
    [
        (["mha_blok"], None, ValueError,
         "no module matches 'mha_blok'; closest: decoder_blocks.0.mha_block"),
        (["decoder_blocks.0", "mha_block"], None, ValueError,
         "targets are nested: 'decoder_blocks.0.mha_block' is inside 'decoder_blocks.0'"),
        (["decoder_blocks"], None, ValueError, "ModuleList, which has no forward"),
        (["re:(mha"], None, ValueError, "invalid regular expression"),
        ([42], None, TypeError, "a selector is a str"),
        (42, None, TypeError, "targets must be a selector or a list"),
        ([], None, ValueError, "targets is empty"),
        (["mha_block"], {"bottleneck": 4}, TypeError, "config must be an AdapterConfig"),
        (["ffn_block.act"], None, ValueError, "cannot infer d_model for module"),
    ],
)
def test_bad_input_is_refused_and_the_model_is_unchanged(gpt, targets, config, error, message):
    snap = snapshot(gpt)
    with pytest.raises(error, match=message):
        adapterkit.inject(gpt, targets, config)
    assert_same(gpt, snap)


def test_a_set_name_already_injected_is_refused(gpt):
    adapterkit.inject(gpt, ["mha_block"], name="a")
    snap = snapshot(gpt)
    with pytest.raises(ValueError, match="adapter set named 'a' is already injected"):
        adapterkit.inject(gpt, ["ffn_block"], name="a")
    assert_same(gpt, snap)
    with pytest.raises(ValueError, match="set name must be"):
        adapterkit.inject(gpt, ["ffn_block"], name="x.y")
    assert_same(gpt, snap)


def test_width_mismatch_is_caught_at_the_first_forward(gpt, tokens):
    adapterkit.inject(gpt, ["fc1"], AdapterConfig(d_model=32))  # fc1 outputs dff=48
    with pytest.raises(ValueError, match=r"module 'decoder_blocks.0.ffn_block.fc1' outputs size 48 "
                       r"on axis -1, but the adapter of set 'default' has d_model=32"):
        gpt(tokens)


@pytest.mark.parametrize("example", [False, True])
def test_parallel_on_a_linear_of_another_width_reads_its_input(example):
    """On Linear(4, 6) a parallel adapter maps the 4 input features to the 6 output ones
    (LoRA with a bias); a sequential one on the same layer adapts the 6 outputs."""
    model = nn.Sequential(nn.Linear(4, 6)).eval()
    x = torch.randn(3, 4)
    base = model(x)
    config = AdapterConfig(placement="parallel", bottleneck=2, init="normal", init_std=0.3)
    adapterkit.inject(model, ["0"], config, example_inputs=(x,) if example else None)
    adapter = adapterkit.adapters(model)["0"]
    assert (adapter.d_in, adapter.d_model) == (4, 6)
    assert adapter.down.weight.shape == (2, 4) and adapter.up.weight.shape == (6, 2)
    assert torch.allclose(model(x), base + adapter.branch(x))
    assert not torch.allclose(model(x), base)
    with pytest.raises(ValueError, match="only as a parallel adapter"):
        adapterkit.Adapter(6, AdapterConfig(), d_in=4)


@pytest.mark.parametrize(("conv", "why"), [
    (nn.Conv2d(4, 4, 3, stride=2, padding=1), "not of its input's spatial size"),
    (nn.Conv2d(4, 4, 3), "not of its input's spatial size"),
    (nn.Conv2d(3, 4, 1), "its input has width 3 and its output 4"),
    (nn.Embedding(10, 4), "its input is token indices"),
])
def test_parallel_on_a_layer_that_changes_the_shape_is_refused_at_inject(conv, why):
    with pytest.raises(ValueError, match=why):
        adapterkit.inject(nn.Sequential(conv), ["0"], AdapterConfig(placement="parallel"))
    conv_same = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))  # a shape-keeping conv is fine
    adapterkit.inject(conv_same, ["0"], AdapterConfig(placement="parallel"))
    assert conv_same(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


class Pool(nn.Module):
    """Keeps the width, drops the sequence axis: nothing in its class says so."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).mean(1)


def test_parallel_shape_mismatch_at_the_forward_or_at_inject_with_example_inputs():
    config = AdapterConfig(placement="parallel", bottleneck=2)
    x = torch.randn(2, 5, 8)
    model = adapterkit.inject(nn.Sequential(Pool()), ["0"], config)
    with pytest.raises(ValueError, match=r"module '0' takes an input of shape \(2, 5, 8\) and "
                                         r"returns \(2, 8\)"):
        model(x)
    fresh = nn.Sequential(Pool())
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match=r"module '0' takes input of shape \(2, 5, 8\) and "
                                         r"returns shape \(2, 8\) on example_inputs"):
        adapterkit.inject(fresh, ["0"], config, example_inputs=x)
    assert_same(fresh, snap)


def test_attribute_clash_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].adapterkit = "user data"
    with pytest.raises(ValueError, match="already has an attribute named 'adapterkit'"):
        adapterkit.inject(model, ["0"])
    assert type(model[0]) is nn.Linear


def test_never_called_child_is_refused():
    model = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match="'self_attn.out_proj' is never called"):
        adapterkit.inject(model, ["self_attn.out_proj"])


def test_a_failure_midway_through_the_swap_is_rolled_back(gpt, monkeypatch):
    from adapterkit import surgery

    snap = snapshot(gpt)
    real = surgery.adapted_class
    calls = []

    def flaky(cls):
        calls.append(cls)
        if len(calls) == 3:
            raise TypeError("__class__ assignment: object layout differs")
        return real(cls)

    monkeypatch.setattr(surgery, "adapted_class", flaky)
    with pytest.raises(TypeError, match="layout differs"):
        adapterkit.inject(gpt, ["mha_block", "ffn_block"])
    assert_same(gpt, snap)
    assert adapterkit.active(gpt) == []


def test_wrapped_forward_keeps_its_signature(gpt):
    import inspect

    before = inspect.signature(gpt.decoder_blocks[0].mha_block.forward)
    adapterkit.inject(gpt, ["mha_block"])
    assert inspect.signature(gpt.decoder_blocks[0].mha_block.forward) == before
