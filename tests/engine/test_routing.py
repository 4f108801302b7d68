"""routed(): every example of one forward runs its own sets, as if it ran alone with them.

Exactness is checked against per-example forwards to 1e-6 (on the machine these tests were
written on the match is bit for bit; other CPUs may round a batched matmul differently).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import assert_same, make_gpt, snapshot

SEQ = AdapterConfig(bottleneck=8, init="normal", init_std=0.2, dropout=0.0)
PAR = AdapterConfig(bottleneck=4, init="normal", init_std=0.2, dropout=0.0, placement="parallel")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@functools.cache
def routed_gpt() -> nn.Module:
    """Sets a and c (sequential, both sub-layers), b (parallel, FFN only): at each module a
    different subset of the sets is present; f fuses a and c (a fusion's sets must wrap the
    same modules: c was attention only, which fuse now refuses)."""
    model = make_gpt()
    adapterkit.inject(model, ["mha_block", "ffn_block"], SEQ, name="a")
    adapterkit.inject(model, ["ffn_block"], PAR, name="b")
    adapterkit.inject(model, ["mha_block", "ffn_block"], SEQ, name="c")
    adapterkit.fuse(model, ["a", "c"], name="f")
    for fusion in adapterkit.adapters(model, "f").values():  # as if trained: not the mean
        nn.init.normal_(fusion.query.weight, std=0.3, generator=torch.Generator().manual_seed(2))
    return model


def alone(model: nn.Module, entry: object, x: torch.Tensor) -> torch.Tensor:
    """What one example computes run alone with only ``entry`` active."""
    adapterkit.set_active(model, [] if entry is None else entry)
    return model(x)


ENTRIES = [None, "a", "b", "c", ["a", "b"], ["b", "a"], ["c", "b", "a"],
           adapterkit.average({"a": 0.25, "b": 0.75}), "f", ["f", "b"]]


@settings(max_examples=25, deadline=None)
@given(picks=st.lists(st.integers(0, len(ENTRIES) - 1), min_size=1, max_size=6),
       train=st.booleans(), seed=st.integers(0, 2**16))
def test_any_assignment_equals_per_example_runs(picks: list[int], train: bool, seed: int) -> None:
    model = routed_gpt().train(train)
    names = [ENTRIES[i] for i in picks]
    x = torch.randint(0, 61, (len(names), 7), generator=torch.Generator().manual_seed(seed))
    adapterkit.set_active(model, ["a"])
    with torch.no_grad(), adapterkit.routed(model, names):
        y = model(x)
        assert adapterkit.active(model) == ["a"]  # ignored inside, not changed
    with torch.no_grad():
        for i, entry in enumerate(names):
            close(y[i:i + 1], alone(model, entry, x[i:i + 1]))


def test_the_sets_differ_so_the_routing_test_can_fail(tokens: torch.Tensor) -> None:
    model = routed_gpt().eval()
    with torch.no_grad():
        outs = [alone(model, entry, tokens) for entry in ENTRIES]
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j], atol=1e-4), (ENTRIES[i], ENTRIES[j])


def test_gradients_reach_each_set_from_its_own_examples_only() -> None:
    model = routed_gpt().train()
    adapterkit.freeze(model, train=["adapters"])
    names = ["a", "b", None, "a", ["a", "b"]]
    x = torch.randint(0, 61, (5, 6), generator=torch.Generator().manual_seed(3))
    w = torch.randn(5, 6, 61, generator=torch.Generator().manual_seed(4))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    with adapterkit.routed(model, names):
        (model(x) * w).sum().backward()
    routed_grads = {n: p.grad for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    expected: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(names):  # the same loss, one example at a time
        if entry is None:
            continue  # the base alone: nothing trainable runs
        adapterkit.set_active(model, entry)
        (model(x[i:i + 1]) * w[i:i + 1]).sum().backward()
        for n, p in params.items():
            if p.grad is not None:
                expected[n] = expected[n] + p.grad if n in expected else p.grad
        model.zero_grad(set_to_none=True)
    unused = [n for n in params if ".adapterkit.c." in n or ".adapterkit.f." in n]
    assert unused and set(expected) == set(params) - set(unused)
    for n in params:
        if n in unused:  # sets c and f: no example runs them
            assert routed_grads[n] is None, n
        else:
            close(routed_grads[n], expected[n])


def test_one_set_for_every_row_runs_the_unrouted_path(tokens: torch.Tensor) -> None:
    model = routed_gpt().eval()
    with torch.no_grad():
        expected = alone(model, ["a", "b"], tokens)
        with adapterkit.routed(model, [["a", "b"]] * len(tokens)):
            assert torch.equal(model(tokens), expected)


# -- modules whose batch axis is not the first --------------------------------------------------


S = N = 4  # sequence length equal to the batch: the shape cannot tell the axes apart
E = 16


def _check_layout(model: nn.Module, targets: object, call) -> None:
    torch.manual_seed(0)
    for name in ["a", "b"]:
        adapterkit.inject(model, targets, AdapterConfig(bottleneck=4, init="normal",
                                                        init_std=0.3, dropout=0.0), name=name)
    model.eval()
    x = torch.randn(S, N, E, generator=torch.Generator().manual_seed(5))
    names = ["a", None, "b", ["a", "b"]]
    with torch.no_grad(), adapterkit.routed(model, names):
        y = call(model, x)  # (S, N, E)
    with torch.no_grad():
        for i, entry in enumerate(names):
            adapterkit.set_active(model, [] if entry is None else entry)
            close(y[:, i:i + 1], call(model, x[:, i:i + 1]))
        assert not torch.allclose(y[:, 0], y[:, 2], atol=1e-4)


def test_multihead_attention_without_batch_first() -> None:
    _check_layout(nn.MultiheadAttention(E, 2), nn.MultiheadAttention,
                  lambda m, x: m(x, x, x)[0])


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_transformer_encoder_without_batch_first() -> None:
    layer = nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0)
    _check_layout(nn.TransformerEncoder(layer, 2), "auto", lambda m, x: m(x))


def test_lstm_without_batch_first() -> None:
    _check_layout(nn.Sequential(nn.LSTM(E, E)), ["0"], lambda m, x: m(x)[0])


def test_lstm_final_states_are_routed_with_the_sequence() -> None:
    model = nn.LSTM(E, E, num_layers=2)
    torch.manual_seed(0)
    for name in ["a", "b"]:
        adapterkit.inject(model, nn.LSTM, AdapterConfig(bottleneck=4, init="normal",
                                                        init_std=0.3, dropout=0.0), name=name)
    x = torch.randn(S, N, E, generator=torch.Generator().manual_seed(5))
    names = ["a", None, "b", ["a", "b"]]
    with torch.no_grad(), adapterkit.routed(model, names):
        seq, (h_n, c_n) = model(x)
    with torch.no_grad():
        for i, entry in enumerate(names):
            adapterkit.set_active(model, [] if entry is None else entry)
            one_seq, (one_h, one_c) = model(x[:, i:i + 1])
            close(seq[:, i:i + 1], one_seq)
            close(h_n[:, i:i + 1], one_h)
            close(c_n[:, i:i + 1], one_c)


def test_a_packed_sequence_is_refused() -> None:
    model = nn.LSTM(E, E)
    adapterkit.inject(model, nn.LSTM, AdapterConfig(bottleneck=2), name="a")
    adapterkit.inject(model, nn.LSTM, AdapterConfig(bottleneck=2), name="b")
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(S, 2, E), [S, S - 1])
    with pytest.raises(ValueError, match="returned a PackedSequence"):
        with adapterkit.routed(model, ["a", "b"]):
            model(packed)




def test_fx_mode_graph_sites() -> None:
    model = make_gpt().eval()
    cfg = AdapterConfig(bottleneck=4, init="normal", init_std=0.3, dropout=0.0, d_model=32)
    gm = adapterkit.inject(model, "residual", cfg, name="a", method="fx")
    gm = adapterkit.inject(gm, "residual", cfg, name="b", method="fx")
    x = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(8))
    names = ["a", None, "b"]
    with torch.no_grad(), adapterkit.routed(gm, names):
        y = gm(x)
    with torch.no_grad():
        for i, entry in enumerate(names):
            close(y[i:i + 1], alone(gm, entry, x[i:i + 1]))
        assert not torch.allclose(y[0], y[2], atol=1e-4)


# -- transformers' generate() ----------------------------------------------------------------


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                     n_positions=64, bos_token_id=0, eos_token_id=1,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    for name in ["a", "b"]:
        adapterkit.inject(model, "auto", AdapterConfig(dropout=0.0, init="normal",
                                                       init_std=0.5), name=name)
    return model


@pytest.mark.parametrize("options", [
    {},  # greedy
    {"num_beams": 3},
    {"num_beams": 2, "num_return_sequences": 2},
], ids=["greedy", "beam search", "beams and return sequences"])
def test_generate_with_kv_cache_and_beam_search(options: dict) -> None:
    model = _gpt2()
    prompt = torch.randint(2, 100, (3, 4), generator=torch.Generator().manual_seed(7))
    names = ["a", None, "b"]

    def generate(p: torch.Tensor) -> torch.Tensor:
        return model.generate(p, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              eos_token_id=None, use_cache=True, **options)

    with adapterkit.routed(model, names):
        out = generate(prompt)
    k = options.get("num_return_sequences", 1)
    alone_runs = []
    for i, entry in enumerate(names):
        adapterkit.set_active(model, [] if entry is None else entry)
        alone_runs.append(generate(prompt[i:i + 1]))
        assert torch.equal(out[i * k:(i + 1) * k], alone_runs[-1])
    for name in ["a", "b"]:  # the sets change what is generated: the check above can fail
        adapterkit.set_active(model, name)
        assert not torch.equal(generate(prompt[1:2]), alone_runs[1])


# -- refusals ----------------------------------------------------------------------------------


def test_a_batch_that_is_not_a_multiple_of_the_names_is_refused(tokens: torch.Tensor) -> None:
    model = routed_gpt().eval()
    with pytest.raises(ValueError, match=r"saw 3 rows on its batch axis \(0\), but routed\(\) "
                                         r"was given 2 names"):
        with adapterkit.routed(model, ["a", "b"]):
            model(tokens)
    assert adapterkit.state.route(model) is None  # cleared on error


def test_unbatched_input_to_a_batch_first_false_module_is_refused() -> None:
    mha = nn.MultiheadAttention(E, 2)
    adapterkit.inject(mha, nn.MultiheadAttention, AdapterConfig(bottleneck=2), name="a")
    x = torch.randn(S, E)  # unbatched: (seq, feature)
    with pytest.raises(ValueError, match="batch_first=False, but its output is 2-D"):
        with adapterkit.routed(mha, ["a"]):
            mha(x, x, x)


class _BothLayouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq_first = nn.MultiheadAttention(E, 2)
        self.batch_first = nn.MultiheadAttention(E, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_module_holding_both_layouts_is_refused() -> None:
    model = nn.Sequential(_BothLayouts())
    adapterkit.inject(model, _BothLayouts, AdapterConfig(d_model=E), name="a")
    with pytest.raises(ValueError, match="batch_first=True and batch_first=False"):
        with adapterkit.routed(model, ["a"]):
            pass


@pytest.mark.parametrize(("names", "error", "match"), [
    (["a", "nope"], ValueError, r"example 1: no adapter set named \['nope'\]"),
    ([["a", "a"]], ValueError, "each set may run once per example"),
    ("a", ValueError, "one entry per example"),
    ([], ValueError, "one entry per example"),
    ([3], TypeError, r"example 0: give a set name, average\(...\) or a list"),
    ([adapterkit.average({"a": 0.5, "zz": 0.5})], ValueError, r"no adapter set named \['zz'\]"),
])
def test_bad_names_are_refused_and_change_nothing(names, error, match) -> None:
    model = routed_gpt()
    adapterkit.set_active(model, ["a"])
    before = snapshot(model)
    with pytest.raises(error, match=match):
        with adapterkit.routed(model, names):
            pass
    assert_same(model, before)
    assert adapterkit.active(model) == ["a"]


def test_nested_routing_and_a_model_without_adapters_are_refused() -> None:
    model = routed_gpt()
    with adapterkit.routed(model, ["a"]):
        with pytest.raises(ValueError, match="already inside routed"):
            with adapterkit.routed(model, ["b"]):
                pass
    with pytest.raises(ValueError, match="needs adapter sets"):
        with adapterkit.routed(make_gpt(), ["a"]):
            pass


class _Block(nn.Module):  # not a torch.nn class: torch.fx traces into it, adapters included
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_tracing_inside_routed_is_refused() -> None:
    model = nn.Sequential(_Block())
    adapterkit.inject(model, ["0"], AdapterConfig(bottleneck=2), name="a")
    with pytest.raises(TypeError, match="traced inside routed"):
        with adapterkit.routed(model, ["a"]):
            torch.fx.symbolic_trace(model)


def test_channels_first_conv_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    for name in ["a", "b"]:
        adapterkit.inject(model, ["0", "2"], AdapterConfig(bottleneck=4, init="normal",
                                                           init_std=0.3, dropout=0.0), name=name)
    x = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(9))
    names = ["b", None, ["a", "b"]]
    with torch.no_grad(), adapterkit.routed(model, names):
        y = model(x)
    with torch.no_grad():
        for i, entry in enumerate(names):
            close(y[i:i + 1], alone(model, entry, x[i:i + 1]))
