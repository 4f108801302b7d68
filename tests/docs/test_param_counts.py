"""Parameter counts: each adapter has ``2*d*b + b + d`` parameters, as summary and adapters() say.

The closed form is what benchmarks/param_counts.py checks on models up to LLaMA-13B; here it is
checked on the reference GPT (drawn shapes, on CPU and on ``meta``) and on a BERT built from a
small config, and the benchmark's own check is shown to reject a wrong count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterkit
from adapterkit import AdapterConfig
from adapterkit.models.gpt import GPT
from tests.conftest import make_gpt

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import param_counts  # noqa: E402

HF_REASON = "Hugging Face models need the 'hf' extra: pip install -e '.[hf]'"


def closed_form(d: int, b: int) -> int:
    return 2 * d * b + b + d


def counts(model: torch.nn.Module, targets: object, config: AdapterConfig) -> tuple:
    base = sum(p.numel() for p in model.parameters())
    adapterkit.inject(model, targets, config)
    adapterkit.freeze(model, train=["adapters"])
    s = adapterkit.summary(model)
    found = adapterkit.adapters(model)
    per_adapter = {sum(p.numel() for p in a.parameters()) for a in found.values()}
    return base, s, found, per_adapter


@pytest.mark.parametrize(
    ("targets", "n_per_layer"),
    [("auto", 2), ("auto:ffn", 1), (["mha_block", "ffn_block"], 2),
     ("decoder_blocks.0.*_block", 2)],
)
@pytest.mark.parametrize(
    ("config", "b"),
    [(AdapterConfig(bottleneck=8), 8), (AdapterConfig(bottleneck=1), 1),
     (AdapterConfig(reduction_factor=4), 8), (AdapterConfig(), 64)],
)
def test_reference_gpt_matches_closed_form(targets, n_per_layer, config, b):
    d, layers = 32, 3
    model = make_gpt(d=d, layers=layers)
    n = n_per_layer * (1 if targets == "decoder_blocks.0.*_block" else layers)
    base, s, found, per_adapter = counts(model, targets, config)
    assert len(found) == n
    assert per_adapter == {closed_form(d, b)}
    assert s.trainable == n * closed_form(d, b)
    assert s.total == base + n * closed_form(d, b)
    assert s.rows[0] == ("adapters[default]", s.trainable, s.trainable)


@settings(max_examples=15, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 24), layers=st.integers(1, 5),
       b=st.integers(1, 300), ffn_only=st.booleans())
def test_closed_form_on_meta_for_drawn_shapes(heads, head_dim, layers, b, ffn_only):
    d = heads * head_dim
    with torch.device("meta"):
        model = GPT(vocab_size=50, d_model=d, max_length=8, num_heads=heads, dff=3 * d,
                    dropout=0.0, N=layers)
    base, s, found, _ = counts(model, "auto:ffn" if ffn_only else "auto",
                               AdapterConfig(bottleneck=b))
    n = layers * (1 if ffn_only else 2)
    assert all(p.is_meta for a in found.values() for p in a.parameters())
    assert (len(found), s.trainable, s.total) == (n, n * closed_form(d, b),
                                                  base + n * closed_form(d, b))


def _bert(hidden: int = 64, layers: int = 2):
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=2 * hidden,
                                     vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config)


@pytest.mark.parametrize(("targets", "n_per_layer"), [("auto", 2), ("auto:ffn", 1)])
@pytest.mark.parametrize(("config", "b"), [(AdapterConfig(bottleneck=16), 16),
                                           (AdapterConfig(reduction_factor=16), 4)])
def test_bert_matches_closed_form(targets, n_per_layer, config, b):
    d, layers = 64, 2
    base, s, found, per_adapter = counts(_bert(d, layers), targets, config)
    n = n_per_layer * layers
    assert len(found) == n
    assert all(name.endswith("dense") for name in found)  # before BERT's residual add
    assert per_adapter == {closed_form(d, b)}
    assert (s.trainable, s.total) == (n * closed_form(d, b), base + n * closed_form(d, b))


def test_benchmark_check_accepts_the_right_count_and_rejects_a_wrong_one():
    model = make_gpt(d=32, layers=2)
    keys = list(model.state_dict())
    count = param_counts.measure(model, "auto", AdapterConfig(bottleneck=8), d=32, b=8,
                                 adapters=4)
    assert (count.adapters, count.trainable) == (4, 4 * closed_form(32, 8))
    assert list(model.state_dict()) == keys  # measured, then ejected
    with pytest.raises(param_counts.CountMismatch, match=r"4 adapters, expected 5"):
        param_counts.measure(model, "auto", AdapterConfig(bottleneck=8), d=32, b=8, adapters=5)
    with pytest.raises(param_counts.CountMismatch, match=r"\(d_model, bottleneck\)"):
        param_counts.measure(model, "auto", AdapterConfig(bottleneck=8), d=32, b=9, adapters=4)
    assert list(model.state_dict()) == keys


def test_benchmark_models_use_published_widths():
    # The benchmark's closed-form check is only as good as the widths it is given.
    spec = next(s for s in param_counts.MODELS if s.name == "ref GPT d256 L4 (overhead.py)")
    model = param_counts.build_on_meta(spec)
    assert model.d_model == spec.d and len(model.decoder_blocks) == spec.layers
    assert param_counts.configs(768)["r=16"][1] == 48
