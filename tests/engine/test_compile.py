"""torch.compile of adapted models: same outputs, and switching after compiling is honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import make_gpt

NONZERO = AdapterConfig(bottleneck=4, init="normal", init_std=0.5, dropout=0.0)


def adapted():
    torch._dynamo.reset()
    model = make_gpt().eval()
    adapterkit.inject(model, ["mha_block"], NONZERO, name="a")
    adapterkit.inject(model, ["ffn_block"], NONZERO, name="b")
    return model


def check_switching(model, compiled, x):
    assert torch.allclose(compiled(x), model(x), atol=1e-5)
    adapterkit.set_active(model, ["a"])
    only_a = model(x)
    assert torch.allclose(compiled(x), only_a, atol=1e-5)
    with adapterkit.disabled(model):
        base = model(x)
        assert torch.allclose(compiled(x), base, atol=1e-5)
    assert not torch.allclose(only_a, base, atol=1e-3)
    assert torch.allclose(compiled(x), only_a, atol=1e-5)  # no stale graph after the block


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def sets_and_a_fusion() -> nn.Module:
    """Sets a (sequential) and b (parallel) at both sub-layers of every block, c (sequential)
    at the attention only, and f, the fusion of a and b (a fusion sits where its sets are, so
    its sets must wrap the same modules), its query as if trained: at each module a different
    subset of the entries."""
    torch._dynamo.reset()
    model = make_gpt().eval()
    torch.manual_seed(1)
    for name, targets, placement in [("a", ["mha_block", "ffn_block"], "sequential"),
                                     ("b", ["mha_block", "ffn_block"], "parallel"),
                                     ("c", ["mha_block"], "sequential")]:
        config = AdapterConfig(bottleneck=8, init="normal", init_std=0.3, dropout=0.0,
                               placement=placement)
        for adapter in adapterkit.adapters(adapterkit.inject(model, targets, config, name=name),
                                           name).values():  # trained-looking: biases too
            nn.init.normal_(adapter.down.bias, std=0.3)
            nn.init.normal_(adapter.up.bias, std=0.3)
    adapterkit.fuse(model, ["a", "b"], name="f")
    for fusion in adapterkit.adapters(model, "f").values():  # not the mean
        nn.init.normal_(fusion.query.weight, std=0.3)
    return model


def test_one_compiled_model_follows_switching_fusion_average_and_routing(tokens):
    """One torch.compile (aot_eager) of one model, checked against eager after every change
    of what runs: compiling is paid once, each change only recompiles."""
    model = sets_and_a_fusion()
    assert adapterkit.active(model) == ["a", "b", "c"]
    # every change of the active list is a recompile: past the limit torch would quietly run
    # eager code and every comparison below would hold trivially, so hitting it fails instead
    with torch._dynamo.config.patch(recompile_limit=32, fail_on_recompile_limit_hit=True):
        compiled = torch.compile(model, backend="aot_eager")
        check_switching(model, compiled, tokens)
        # a fusion, output averaging, and a list holding a fusion
        for entry in ["f", adapterkit.average({"a": 0.2, "c": 0.8}), ["a", "f"]]:
            adapterkit.set_active(model, entry)
            close(compiled(tokens), model(tokens))
        # routing: each row its own entries, and no routing left in the graph after the block
        for names in [["a", None, "b"], [["b", "a"], "f", None]]:
            with torch.no_grad(), adapterkit.routed(model, names):
                close(compiled(tokens), model(tokens))
        with torch.no_grad():
            adapterkit.set_active(model, ["c"])
            close(compiled(tokens), model(tokens))


def test_compiled_training_step_gives_eager_gradients():
    model = adapted().train()
    adapterkit.freeze(model, train=["adapters"])
    x = torch.randint(0, 61, (2, 9))
    model(x).square().mean().backward()
    eager = [p.grad.clone() for p in adapterkit.trainable_parameters(model)]
    model.zero_grad()
    torch.compile(model, backend="aot_eager")(x).square().mean().backward()
    for g, p in zip(eager, adapterkit.trainable_parameters(model), strict=True):
        assert torch.allclose(p.grad, g, atol=1e-5)


@pytest.mark.slow
def test_compile_inductor_matches_eager_and_follows_switches():
    model = adapted()
    x = torch.randint(0, 61, (2, 9))
    check_switching(model, torch.compile(model), x)


def test_symbolic_trace_keeps_the_adapters(tokens):
    model = make_gpt().eval()
    adapterkit.inject(model, ["mha_block", "fc1", "cls"], NONZERO)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :3] = True
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(tokens, mask), model(tokens, mask), atol=1e-6)
    with adapterkit.disabled(model):
        base = model(tokens, mask)
    assert not torch.allclose(traced(tokens, mask), base, atol=1e-3)


class WithTorchLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.att = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(self.att(x, x, x)[0])


def test_torch_layers_stay_fx_leaves_and_run_their_adapters():
    model = WithTorchLayers().eval()
    x = torch.randn(2, 5, 16)
    adapterkit.inject(model, ["att", "lin"], NONZERO)
    traced = torch.fx.symbolic_trace(model)  # tracing into nn.MultiheadAttention would fail
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["att", "lin"]
    assert torch.allclose(traced(x), model(x), atol=1e-6)
    with adapterkit.disabled(model):  # the leaf calls the live module: switching is honoured
        assert torch.allclose(traced(x), model(x), atol=1e-6)
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.allclose(compiled(x), model(x), atol=1e-5)
    with adapterkit.disabled(model):
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


@pytest.mark.parametrize("make", ["conv", "lstm"])
def test_channels_first_and_recurrent_adapters_compile_and_trace(make):
    from tests.zoo import ConvNet, Recurrent

    torch._dynamo.reset()
    torch.manual_seed(0)
    if make == "conv":
        model, x, targets = ConvNet(2).eval(), torch.randn(2, 3, 5, 8), ["conv", "norm"]
    else:
        model, x, targets = (Recurrent("LSTM", "h_n", bidirectional=True, batch_first=True),
                             torch.randn(2, 4, 5), ["rnn"])
    adapterkit.inject(model.eval(), targets, NONZERO)
    with torch.no_grad():
        eager = model(x)
        with adapterkit.disabled(model):
            base = model(x)
        assert not torch.allclose(eager, base, atol=1e-3)
        assert torch.allclose(torch.compile(model, backend="aot_eager")(x), eager, atol=1e-5)
        if make == "conv":  # torch.fx cannot unpack a leaf's tuple output, adapters or not
            assert torch.allclose(torch.fx.symbolic_trace(model)(x), eager, atol=1e-6)
