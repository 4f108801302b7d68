"""routed(): the batch axis is read off the model or given (batch_dim=), never guessed.

The model's input must hold one row per name on its batch axis (k per name only inside
transformers' generate()), and every wrapped module must see exactly that many rows; anything
else is refused, and a refusal leaves the model as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import assert_same, make_gpt, snapshot

CFG = AdapterConfig(bottleneck=4, init="normal", init_std=0.3, dropout=0.0)
D = 16


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def with_sets(model: nn.Module, targets: object, names: str = "abc") -> nn.Module:
    torch.manual_seed(0)
    for name in names:
        adapterkit.inject(model, targets, CFG, name=name)
    return model.eval()


def alone(model: nn.Module, entry: object, x: torch.Tensor) -> torch.Tensor:
    """What one example computes run alone with only ``entry`` active."""
    adapterkit.set_active(model, [] if entry is None else entry)
    return model(x)


def unchanged_by(model: nn.Module, x: torch.Tensor, call) -> None:
    """``call`` is refused and leaves the model's tree, weights, active sets, hooks and
    outputs as they were."""
    adapterkit.set_active(model, ["a"])
    before, out = snapshot(model), leaves(model(x))
    call()
    assert_same(model, before)
    assert adapterkit.active(model) == ["a"]
    assert adapterkit.state.route(model) is None
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(map(torch.equal, leaves(model(x)), out))


def leaves(output: object) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in leaves(item)]  # an RNN's (seq, (h_n, c_n))


# -- a sequence-first model of one's own: (T, B, D), nothing declares batch_first ----------------


class SeqFirst(nn.Module):
    """A running mean over time mixes the steps: routing steps instead of examples is wrong."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mix, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, D)
        h = torch.tanh(self.inp(x))
        steps = torch.arange(1, x.shape[0] + 1).view(-1, 1, 1)
        return self.out(h + self.mix(h.cumsum(0) / steps))


T, B = 6, 3  # 6 steps = 2 x 3 examples: read as 2 rows per name, this was silently wrong
NAMES = ["a", None, ["b", "c"]]


def test_a_sequence_first_model_is_refused_without_batch_dim() -> None:
    model = with_sets(SeqFirst(), ["inp", "mix"])
    x = torch.randn(T, B, D, generator=torch.Generator().manual_seed(1))

    def call() -> None:
        with pytest.raises(ValueError, match=(
                r"model SeqFirst saw 6 rows on its batch axis \(0\), but routed\(\) was given 3 "
                r"names \(its input, the forward's first tensor, has shape \(6, 3, 16\)\): if "
                r"axis 1 is the batch \(a sequence-first input\), pass routed\(model, names, "
                r"batch_dim=1\)")):
            with adapterkit.routed(model, NAMES):
                model(x)

    unchanged_by(model, x, call)


def test_a_sequence_first_model_routes_its_examples_with_batch_dim_1() -> None:
    model = with_sets(SeqFirst(), ["inp", "mix"])
    x = torch.randn(T, B, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), adapterkit.routed(model, NAMES, batch_dim=1):
        y = model(x)
    with torch.no_grad():
        outs = [alone(model, entry, x[:, i:i + 1]) for i, entry in enumerate(NAMES)]
    for i, out in enumerate(outs):
        close(y[:, i:i + 1], out)
    assert not torch.allclose(outs[0], alone(model, None, x[:, :1]), atol=1e-3)  # sets matter


def test_batch_dim_1_under_training_gives_each_set_its_own_examples_gradient() -> None:
    model = with_sets(SeqFirst(), ["inp", "mix"]).train()
    adapterkit.freeze(model, train=["adapters"])
    x = torch.randn(T, B, D, generator=torch.Generator().manual_seed(1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with adapterkit.routed(model, ["a", "b", "a"], batch_dim=1):
        model(x).square().sum().backward()
    routed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for i, entry in enumerate(["a", "b", "a"]):
        adapterkit.set_active(model, entry)
        model(x[:, i:i + 1]).square().sum().backward()
    expected = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert set(routed) == set(expected) and any(".adapterkit.b." in n for n in routed)
    for n in expected:
        close(routed[n], expected[n])


# -- k rows per name: only generate()'s expansion ---------------------------------------------


def gpt() -> nn.Module:
    return with_sets(make_gpt(), ["mha_block", "ffn_block"])


def test_six_rows_for_three_names_are_refused_before_anything_runs() -> None:
    model = gpt()
    x = torch.randint(0, 61, (6, 7), generator=torch.Generator().manual_seed(2))
    calls = []
    model.emb_layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def call() -> None:
        with pytest.raises(ValueError, match=(
                r"model GPT saw 6 rows on its batch axis \(0\), but routed\(\) was given 3 names "
                r"\(its input, the forward's first tensor, has shape \(6, 7\)\): 2 rows per name "
                r"are read as one example's rows only inside transformers' generate\(\) \(beam "
                r"search, num_return_sequences\); elsewhere pass one name per row, or "
                r"batch_dim= the axis that holds the examples")):
            with adapterkit.routed(model, ["a", "b", "c"]):
                model(x)

    unchanged_by(model, x, call)
    calls.clear()
    with pytest.raises(ValueError, match="saw 6 rows"), adapterkit.routed(model, ["a", "b", "c"]):
        model(x)
    assert calls == []  # refused at the model's forward, before its first layer


def test_a_function_of_ones_own_named_generate_does_not_unlock_the_expansion() -> None:
    model = gpt()
    x = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(2))

    def generate(prompts: torch.Tensor) -> torch.Tensor:  # beams, by hand
        return model(prompts.repeat_interleave(2, dim=0))

    with pytest.raises(ValueError, match="only inside transformers' generate"):
        with adapterkit.routed(model, ["a", "b"]):
            generate(x)


def test_encoder_decoder_generate_with_beams() -> None:
    """T5's generate() runs the encoder on its own (not through the model's forward) on one
    row per prompt, then the decoder on num_beams rows per prompt."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1, dropout_rate=0.0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    for name in ["a", "b"]:
        adapterkit.inject(model, "auto", AdapterConfig(dropout=0.0, init="normal",
                                                       init_std=0.5), name=name)
    prompt = torch.randint(2, 100, (3, 5), generator=torch.Generator().manual_seed(7))
    names = ["a", None, "b"]

    def generate(p: torch.Tensor) -> torch.Tensor:
        return model.generate(p, max_new_tokens=5, do_sample=False, eos_token_id=None,
                              num_beams=2, num_return_sequences=2)

    with adapterkit.routed(model, names):
        out = generate(prompt)
    runs = []
    for i, entry in enumerate(names):
        adapterkit.set_active(model, [] if entry is None else entry)
        runs.append(generate(prompt[i:i + 1]))
        assert torch.equal(out[2 * i:2 * i + 2], runs[-1])
    assert not torch.equal(runs[0], runs[1]) and not torch.equal(runs[2], runs[1])


# -- a mixture of experts: the experts see the rows their gate picks ---------------------------


class MoE(nn.Module):
    """Top-1 mixture of two experts over the tokens of a (B, T, D) batch."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, 2)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (B * T, D)
        weight, pick = torch.softmax(self.gate(tokens), -1).max(-1)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            rows = (pick == i).nonzero().squeeze(-1)
            if len(rows):
                out[rows] = expert(tokens[rows]) * weight[rows, None]
        return x + out.view_as(x)


class MoEModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.moe, self.head = nn.Embedding(50, D), MoE(), nn.Linear(D, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.moe(self.emb(ids)))


@pytest.mark.parametrize("seed", [1, 11, 3])
def test_targets_inside_the_experts_are_refused(seed: int) -> None:
    """3 examples of 4 tokens: the experts share 12 tokens, so one of them sees a count other
    than 3 whatever the gate picks. With seeds 1 and 11 the gate gives them 6 and 6, and 3 and
    9: multiples of 3, which were read as k rows per name without a word."""
    model = with_sets(MoEModel(), ["experts.0", "experts.1"])
    x = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(seed))

    def call() -> None:
        with pytest.raises(ValueError, match=(
                r"module 'moe\.experts\.\d' saw \d+ rows on its batch axis \(0\), but routed\(\) "
                r"was given 3 names: its rows cannot be matched to examples\. A module that sees "
                r"a \(batch \* seq\) flattening, or a data-dependent subset of the rows \(an "
                r"expert of a mixture of experts, fed the tokens its gate picks\), cannot be "
                r"routed: target a module that sees whole examples \(the mixture-of-experts "
                r"block, not its experts\); or, if its batch is on another axis, pass "
                r"routed\(\.\.\., batch_dim=that axis\)")):
            with adapterkit.routed(model, ["a", None, "b"]):
                model(x)

    unchanged_by(model, x, call)


@pytest.mark.parametrize("seed", range(6))
def test_the_whole_mixture_of_experts_block_is_routed_exactly(seed: int) -> None:
    model = with_sets(MoEModel(), ["moe"])
    x = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(seed))
    names = ["a", None, ["b", "c"], "b"]
    with torch.no_grad(), adapterkit.routed(model, names):
        y = model(x)
    with torch.no_grad():
        for i, entry in enumerate(names):
            close(y[i:i + 1], alone(model, entry, x[i:i + 1]))
        assert not torch.allclose(y[0], alone(model, None, x[:1])[0], atol=1e-3)


def test_a_flattened_batch_is_refused_at_the_module_that_sees_it() -> None:
    """(batch * seq) rows were read as seq consecutive rows per name; they are refused now."""
    model = with_sets(nn.Sequential(nn.Flatten(0, 1), nn.Linear(D, D)), ["1"])
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"module '1' saw 12 rows on its batch axis \(0\), but "
                                         r"routed\(\) was given 3 names: its rows cannot be "
                                         "matched to examples"):
        with adapterkit.routed(model, ["a", None, "b"]):
            model(x)


# -- batch_dim itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "batch_dim", "match"), [
    (lambda: SeqFirst(), -1, r"batch_dim must be an axis, an int >= 0, got -1"),
    (lambda: SeqFirst(), True, r"batch_dim must be an axis, an int >= 0, got True"),
    (lambda: SeqFirst(), "1", r"batch_dim must be an axis, an int >= 0, got '1'"),
    (lambda: nn.LSTM(D, D), 0, r"LSTM is batch_first=False, so its batch is axis 1, not "
                               r"batch_dim=0; batch_dim is for modules that declare no "
                               r"batch_first: leave it out"),
])
def test_bad_batch_dims_are_refused(model, batch_dim, match) -> None:
    model = model()
    model = with_sets(model, nn.LSTM if isinstance(model, nn.LSTM) else ["inp"])

    def call() -> None:
        with pytest.raises(ValueError, match=match):
            with adapterkit.routed(model, NAMES, batch_dim):
                pass

    unchanged_by(model, torch.randn(T, B, D), call)


def test_a_model_that_declares_batch_first_false_reads_its_batch_on_axis_1() -> None:
    """nn.LSTM is sequence-first by its own declaration: no batch_dim needed, 6 steps for 3
    examples are the steps of 3 examples."""
    model = with_sets(nn.LSTM(D, D), nn.LSTM)
    x = torch.randn(T, B, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), adapterkit.routed(model, NAMES):
        y = model(x)[0]
    with torch.no_grad():
        for i, entry in enumerate(NAMES):
            close(y[:, i:i + 1], alone(model, entry, x[:, i:i + 1])[0])
