"""adapterkit.plan: a dry run that agrees with inject and changes nothing."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from adapterkit.presets import preset_for
from tests.conftest import MLP, assert_same, make_gpt, snapshot

HF_REASON = "Hugging Face models need the 'hf' extra: pip install -e '.[hf]'"


class Untyped(nn.Module):
    """A forward with no return annotation: its output kind is unknown until it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # noqa: ANN001, ANN201 - deliberately unannotated
        return self.proj(x), x.sum()


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Untyped()
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.body(x)[0]))


def test_plan_agrees_with_what_inject_then_does() -> None:
    config = AdapterConfig(bottleneck=8)
    model = make_gpt()
    p = adapterkit.plan(model, "auto", config)
    adapterkit.inject(model, "auto", config)
    made = adapterkit.adapters(model)
    assert p.modules == list(made)
    assert [r.d_model for r in p.rows] == [a.d_model for a in made.values()]
    assert [r.params for r in p.rows] == [sum(x.numel() for x in a.parameters())
                                          for a in made.values()]
    assert p.params == adapterkit.summary(model).rows[0][2]


@settings(deadline=None, max_examples=20)
@given(d=st.sampled_from([16, 32, 48]), bottleneck=st.integers(1, 40),
       reduction=st.none() | st.sampled_from([2.0, 4.0, 16.0]))
def test_plan_counts_adapter_parameters(d: int, bottleneck: int, reduction: float | None) -> None:
    config = (AdapterConfig(reduction_factor=reduction) if reduction
              else AdapterConfig(bottleneck=bottleneck))
    b = config.bottleneck_for(d)
    p = adapterkit.plan(make_gpt(d=d), ["mha_block", "ffn_block"], config)
    assert p.params == 4 * (2 * d * b + b + d)


def test_plan_changes_nothing() -> None:
    model = make_gpt().train()
    snap = snapshot(model)
    p = adapterkit.plan(model, "auto", example_inputs=torch.randint(0, 61, (2, 6)))
    assert len(p) == 4
    assert_same(model, snap)
    assert all(m.training for m in model.modules())
    assert adapterkit.adapters(model) == {}


def test_plan_with_example_restores_modes_buffers_and_random_state() -> None:
    model = WithBatchNorm().train()
    snap = snapshot(model)
    example = torch.randn(4, 8)
    rng = torch.get_rng_state()
    p = adapterkit.plan(model, ["body"], AdapterConfig(bottleneck=2), example_inputs=example)
    assert (p.rows[0].output, p.rows[0].adapts, p.rows[0].found_by) == ("tuple", "[0]", "run")
    assert_same(model, snap)  # running_mean / running_var / num_batches_tracked too
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(("target", "module_class", "output", "adapts", "found_by"), [
    ("proj", "Linear", "tensor", "whole output", "annotation"),
    ("mha", "MultiheadAttention", "tuple", "first tensor", "annotation"),
    ("body", "Untyped", "unknown", "first tensor", "-"),
    ("seq", "Sequential", "tensor", "whole output", "annotation"),  # its last layer's kind
])
def test_output_kind_without_running(target, module_class, output, adapts, found_by) -> None:
    model = nn.Module()
    model.proj = nn.Linear(8, 8)
    model.mha = nn.MultiheadAttention(8, 2)
    model.body = Untyped()
    model.seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    row = adapterkit.plan(model, [target], AdapterConfig(bottleneck=2)).rows[0]
    assert (row.module_class, row.output, row.adapts, row.found_by) == (
        module_class, output, adapts, found_by)


def test_output_key_is_what_it_adapts() -> None:
    model = nn.Module()
    model.mha = nn.MultiheadAttention(8, 2)
    row = adapterkit.plan(model, ["mha"], AdapterConfig(bottleneck=2, output_key=0)).rows[0]
    assert row.adapts == "[0]"


def test_str_is_a_table_with_a_total() -> None:
    text = str(adapterkit.plan(make_gpt(), "auto", AdapterConfig(bottleneck=8)))
    lines = text.splitlines()
    assert lines[0].split() == ["module", "class", "d_model", "axis", "output", "adapts", "params",
                                "kind", "from"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:3] == ["decoder_blocks.0.mha_block", "MultiheadAttention", "32"]
    assert lines[-1] == "4 adapters, 2,208 parameters"
    assert len(lines) == 2 + 4 + 1


@pytest.mark.parametrize(("targets", "message"), [
    (["mha_blok"], r"no module matches 'mha_blok'; closest: decoder_blocks.0.mha_block"),
    (["decoder_blocks.0", "mha_block"], r"targets are nested"),
    (["decoder_blocks"], r"ModuleList, which has no forward"),
])
def test_plan_raises_what_inject_raises_and_changes_nothing(targets, message) -> None:
    model = make_gpt()
    snap = snapshot(model)
    for call in (adapterkit.plan, adapterkit.inject):
        with pytest.raises(ValueError, match=message):
            call(model, targets)
        assert_same(model, snap)


def test_plan_refuses_a_never_called_child() -> None:
    model = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match=r"'self_attn.out_proj' is never called"):
        adapterkit.plan(model, ["self_attn.out_proj"])


def test_plan_refuses_a_module_without_a_width() -> None:
    with pytest.raises(ValueError, match=r"cannot infer d_model for module 'body.1'"):
        adapterkit.plan(MLP(), ["body.1"])


def test_plan_on_hugging_face_models_learns_kinds_by_running() -> None:
    t = pytest.importorskip("transformers", reason=HF_REASON)
    torch.manual_seed(0)
    model = t.T5ForConditionalGeneration(t.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100,
        decoder_start_token_id=0))
    snap = snapshot(model)
    static = adapterkit.plan(model, "auto")
    assert {r.output for r in static.rows} == {"unknown"}  # T5 does not annotate its forwards
    ids = torch.randint(0, 100, (2, 5))
    ran = adapterkit.plan(model, "auto",
                          example_inputs={"input_ids": ids, "decoder_input_ids": ids})
    kinds = {r.module.rsplit(".", 1)[1]: (r.output, r.adapts) for r in ran.rows}
    assert kinds == {"SelfAttention": ("tuple", "[0]"), "DenseReluDense": ("tensor",
                                                                           "whole output")}
    assert ran.params == static.params == 8 * (2 * 32 * 64 + 64 + 32)
    assert_same(model, snap)


# -- docs/models.md's support table is computed, not typed ----------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _reference_models() -> dict[str, Callable[[], nn.Module]]:
    from adapterkit.models.gpt import GPT

    def hf(model: str, config: str) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            t = pytest.importorskip("transformers", reason=HF_REASON)
            return getattr(t, model)(getattr(t, config)())
        return make

    def torch_layers(cls: type, stack: type) -> Callable[[], nn.Module]:
        return lambda: stack(cls(512, 8, batch_first=True), 6)

    return {
        "adapterkit reference GPT": lambda: GPT(10000, 512, 256, 8, 2048, 0.1, 6),
        "`nn.TransformerEncoder`": torch_layers(nn.TransformerEncoderLayer,
                                                nn.TransformerEncoder),
        "`nn.TransformerDecoder`": torch_layers(nn.TransformerDecoderLayer,
                                                nn.TransformerDecoder),
        "`nn.Transformer`": lambda: nn.Transformer(batch_first=True),
        "GPT-2": hf("GPT2LMHeadModel", "GPT2Config"),
        "BERT": hf("BertModel", "BertConfig"),
        "RoBERTa": hf("RobertaModel", "RobertaConfig"),
        "LLaMA": hf("LlamaForCausalLM", "LlamaConfig"),
        "Mistral": hf("MistralForCausalLM", "MistralConfig"),
        "T5": hf("T5ForConditionalGeneration", "T5Config"),
        "ViT": hf("ViTModel", "ViTConfig"),
        "ResNet": hf("ResNetModel", "ResNetConfig"),
        "ConvNeXt": hf("ConvNextModel", "ConvNextConfig"),
        "diffusers `UNet2DModel`": lambda: pytest.importorskip(
            "diffusers", reason="needs the 'diffusers' extra").UNet2DModel(),
        "Qwen2": hf("Qwen2ForCausalLM", "Qwen2Config"),
        "GPT-NeoX": hf("GPTNeoXForCausalLM", "GPTNeoXConfig"),
        "DistilBERT": hf("DistilBertModel", "DistilBertConfig"),
        "OPT": hf("OPTForCausalLM", "OPTConfig"),
        "Mixtral": hf("MixtralForCausalLM", "MixtralConfig"),
        "Qwen2-MoE": hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig"),
        "ELECTRA": hf("ElectraModel", "ElectraConfig"),
        "Falcon": hf("FalconForCausalLM", "FalconConfig"),
        "BART": hf("BartModel", "BartConfig"),
    }


def _support_table() -> dict[str, list[str]]:
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| architecture |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


SUPPORT = _support_table()


def test_support_table_lists_every_reference_model() -> None:
    assert list(SUPPORT) == list(_reference_models())


@pytest.mark.parametrize("architecture", list(SUPPORT))
def test_support_table_row_is_what_plan_computes(architecture: str) -> None:
    _, found_by, selects, _, n, params, ffn_params, _ = SUPPORT[architecture]
    with torch.device("meta"):
        model = _reference_models()[architecture]()
    p = adapterkit.plan(model, "auto")
    assert (len(p), f"{p.params:,}") == (int(n), params)
    assert f"{adapterkit.plan(model, 'auto:ffn').params:,}" == ffn_params
    assert all(r.d_model > 0 for r in p.rows)
    has_preset = any(preset_for(m) is not None for m in model.modules())
    assert found_by == ("preset" if has_preset else "structural rule")
    places = re.findall(r"`([^`]+)`", selects)  # where transformers versions differ, both
    used = {next((pl for pl in places if r.module.endswith("." + pl)), r.module)
            for r in p.rows}
    roles = 1 if ffn_params == params else 2  # CNNs: the residual branch plays the FFN's part
    assert used <= set(places) and len(used) == roles, (used, places)
