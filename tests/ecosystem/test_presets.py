"""targets="auto": what the presets and the structural rule select, and when they refuse."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit
from adapterkit import presets
from adapterkit.models.gpt import GPTBlock
from adapterkit.presets import auto_targets, compress, preset_for
from adapterkit.select import select_modules
from adapterkit.tree import candidates, is_adapted
from tests.conftest import MLP, assert_same, make_gpt, snapshot

HF_REASON = "Hugging Face models need the 'hf' extra: pip install -e '.[hf]'"


def resolved(model: nn.Module, spec: str = "auto") -> list[str]:
    return list(select_modules(candidates(model), auto_targets(model, spec)))


def _layer(cls: type) -> nn.Module:
    return cls(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)


def hf_model(kind: str) -> nn.Module:
    t = pytest.importorskip("transformers", reason=HF_REASON)
    torch.manual_seed(0)
    dec = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, vocab_size=100)
    enc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               vocab_size=100)
    make = {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4,
                                                       vocab_size=100, n_positions=32)),
        "gpt2-cross": lambda: t.GPT2LMHeadModel(t.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
            add_cross_attention=True)),
        "bert": lambda: t.BertModel(t.BertConfig(**enc)),
        "bert-cross": lambda: t.BertModel(t.BertConfig(**enc, is_decoder=True,
                                                       add_cross_attention=True)),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(**enc)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**dec)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**dec)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100)),
        "vit": lambda: t.ViTModel(t.ViTConfig(**enc | {"vocab_size": None}, image_size=16,
                                              patch_size=4)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**dec)),
        "gpt-neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**enc)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100)),
        "falcon": lambda: t.FalconForCausalLM(t.FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            vocab_size=100, word_embed_proj_dim=32)),
        "electra": lambda: t.ElectraModel(t.ElectraConfig(**enc, embedding_size=32)),
        "bart": lambda: t.BartModel(t.BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            vocab_size=100)),
    }
    return make[kind]()


TORCH_MODELS = {
    "gpt": lambda: make_gpt(),
    "encoder": lambda: nn.TransformerEncoder(_layer(nn.TransformerEncoderLayer), 2),
    "decoder": lambda: nn.TransformerDecoder(_layer(nn.TransformerDecoderLayer), 2),
    "transformer": lambda: nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2,
                                          num_decoder_layers=2, dim_feedforward=64,
                                          batch_first=True),
    "layer": lambda: _layer(nn.TransformerEncoderLayer),  # a bare block as the root
}


def build(kind: str) -> nn.Module:
    return TORCH_MODELS[kind]() if kind in TORCH_MODELS else hf_model(kind)


# (model, what "auto" returns). Presets: the first 12; the structural rule: the rest.
PRESET_EXPECTED = {
    "gpt": ["decoder_blocks.*.mha_block", "decoder_blocks.*.ffn_block"],
    "encoder": ["layers.*.self_attn", "layers.*.linear2"],
    "decoder": ["layers.*.self_attn", "layers.*.linear2"],
    "transformer": ["encoder.layers.*.self_attn", "encoder.layers.*.linear2",
                    "decoder.layers.*.self_attn", "decoder.layers.*.linear2"],
    "layer": ["self_attn", "linear2"],
    "gpt2": ["transformer.h.*.attn", "transformer.h.*.mlp"],
    "bert": ["encoder.layer.*.attention.output.dense", "encoder.layer.*.output.dense"],
    "roberta": ["encoder.layer.*.attention.output.dense", "encoder.layer.*.output.dense"],
    "llama": ["model.layers.*.self_attn", "model.layers.*.mlp"],
    "mistral": ["model.layers.*.self_attn", "model.layers.*.mlp"],
    "t5": ["encoder.block.*.layer.*.SelfAttention", "encoder.block.*.layer.*.DenseReluDense",
           "decoder.block.*.layer.*.SelfAttention", "decoder.block.*.layer.*.DenseReluDense"],
    "vit": ["layers.*.attention", "layers.*.mlp"],
}
STRUCTURAL_EXPECTED = {
    "qwen2": ["model.layers.*.self_attn", "model.layers.*.mlp"],
    "gpt-neox": ["gpt_neox.layers.*.attention", "gpt_neox.layers.*.mlp"],
    "distilbert": ["transformer.layer.*.attention", "transformer.layer.*.ffn"],
    "falcon": ["transformer.h.*.self_attention", "transformer.h.*.mlp"],
    "opt": ["model.decoder.layers.*.self_attn", "model.decoder.layers.*.fc2"],
    "electra": ["encoder.layer.*.attention.output.dense", "encoder.layer.*.output.dense"],
    "bart": ["encoder.layers.*.self_attn", "encoder.layers.*.fc2",
             "decoder.layers.*.self_attn", "decoder.layers.*.fc2"],
}


# transformers 4 lays ViT out as BERT does, with the residual add inside ViTOutput
VIT_4 = ["encoder.layer.*.attention", "encoder.layer.*.output.dense"]


@pytest.mark.parametrize("kind", list(PRESET_EXPECTED))
def test_presets_select_the_sublayer_outputs(kind: str) -> None:
    model = build(kind)
    if kind == "vit" and hasattr(model, "encoder"):
        assert auto_targets(model) == VIT_4
        return
    assert auto_targets(model) == PRESET_EXPECTED[kind]
    assert any(preset_for(m) is not None for m in model.modules())


@pytest.mark.parametrize("kind", list(STRUCTURAL_EXPECTED))
def test_structural_rule_covers_architectures_without_a_preset(kind: str) -> None:
    model = build(kind)
    assert all(preset_for(m) is None for m in model.modules())
    assert auto_targets(model) == STRUCTURAL_EXPECTED[kind]


# A bare block ("layer") has no stack of blocks, so only its preset finds it.
@pytest.mark.parametrize("kind", [k for k in PRESET_EXPECTED if k != "layer"])
def test_structural_rule_alone_agrees_with_every_preset(kind: str, monkeypatch) -> None:
    model = build(kind)
    with_presets = resolved(model)
    monkeypatch.setattr(presets, "PRESETS", ())
    assert resolved(model) == with_presets


@pytest.mark.parametrize("kind", list(PRESET_EXPECTED) + list(STRUCTURAL_EXPECTED))
def test_auto_ffn_is_the_feed_forward_half(kind: str) -> None:
    model = build(kind)
    ffn = resolved(model, "auto:ffn")
    both = resolved(model)
    assert set(ffn) < set(both) and len(ffn) * 2 == len(both)
    assert not any(n.endswith(("attn", "attention", "SelfAttention", "mha_block"))
                   for n in ffn)


@pytest.mark.parametrize("kind", ["gpt2-cross", "bert-cross", "decoder", "t5", "bart"])
def test_auto_leaves_cross_attention_out(kind: str) -> None:
    names = resolved(build(kind))
    cross = ("crossattention", "EncDecAttention", "multihead_attn", "encoder_attn")
    assert names and not any(c in n for n in names for c in cross)


def test_bert_houlsby_place_is_the_dense_before_the_residual_add() -> None:
    model = build("bert")
    layer = model.encoder.layer[0]
    adapterkit.inject(model, "auto")
    adapted = set(adapterkit.adapters(model))
    assert "encoder.layer.0.attention.output.dense" in adapted
    assert "encoder.layer.0.output.dense" in adapted
    # the LayerNorm(h + input) that follows stays outside the adapted module
    assert not is_adapted(layer.attention.output)
    assert not is_adapted(layer.output)


def test_auto_sees_through_an_adapted_model_and_a_subclass() -> None:
    model = make_gpt()
    first = auto_targets(model)
    adapterkit.inject(model, "auto", name="a")
    assert auto_targets(model) == first
    adapterkit.inject(model, "auto", name="b")
    assert len(adapterkit.adapters(model, "b")) == 4

    class MyBlock(GPTBlock):
        pass

    assert preset_for(MyBlock(32, 4, 64, 0.0)).architecture == "adapterkit reference GPT"


# -- refusals -------------------------------------------------------------------------------------


class TwoAttentions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.self_attention = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8)


class AttentionOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)


class Stack(nn.Module):
    def __init__(self, block: type) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block(), block()])


def test_not_sure_which_child_lists_the_candidates() -> None:
    model = Stack(TwoAttentions)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0.*candidates: attn, self_attention"):
        adapterkit.inject(model, "auto")
    assert_same(model, snap)


def test_block_without_feed_forward_is_refused_for_auto_but_not_needed_for_attention() -> None:
    model = Stack(AttentionOnly)
    with pytest.raises(ValueError, match=r"'blocks' \(2 x AttentionOnly; children of "
                                         r"'blocks.0': attn, norm\).*no ffn sub-layer"):
        auto_targets(model)


def test_no_blocks_at_all_lists_what_was_considered() -> None:
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"no preset matches this MLP.*Considered: "
                                         r"no ModuleList or Sequential of blocks"):
        adapterkit.inject(model, "auto")
    assert_same(model, snap)
    deep = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"Considered: '' \(2 x Sequential"):
        auto_targets(deep)


def test_unknown_spec_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown auto spec 'auto:lora'.*'auto'.*'auto:ffn'"):
        adapterkit.inject(make_gpt(), "auto:lora")


def test_a_preset_block_laid_out_differently_is_an_error() -> None:
    model = make_gpt()
    del model.decoder_blocks[0].ffn_block
    with pytest.raises(ValueError, match=r"'decoder_blocks.0' is a GPTBlock \(adapterkit "
                                         r"reference GPT preset\) but has none of \['ffn_block'\]"):
        auto_targets(model)


# -- selectors stay exact -------------------------------------------------------------------------


def test_compress_falls_back_to_names_where_a_glob_would_select_more() -> None:
    model = make_gpt(layers=3)
    named = candidates(model)
    assert compress(["decoder_blocks.0.mha_block", "decoder_blocks.2.mha_block"], named) == [
        "decoder_blocks.0.mha_block", "decoder_blocks.2.mha_block"]
    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    # "0" alone would also select "1.0": an anchored regex keeps it exact
    assert compress(["0"], candidates(root)) == [r"re:0"]


NAMES = [n for n, _ in candidates(make_gpt(layers=3)) if n]


@settings(deadline=None, max_examples=60)
@given(st.sets(st.sampled_from(NAMES), min_size=1))
def test_compress_selects_exactly_the_names_it_was_given(names: set[str]) -> None:
    named = candidates(make_gpt(layers=3))
    ordered = [n for n, _ in named if n in names]
    assert list(select_modules(named, compress(ordered, named))) == ordered
