"""targets="auto" on models nobody on the team wrote: every property, table-driven over models.

Each case builds a tiny model (hidden 32, 2 layers, dropout 0) from a config, so nothing is
downloaded. Cases marked ``preset=False`` have no preset in adapterkit.presets: they go
through the structural rule. Hugging Face cases skip when transformers is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit.presets import preset_for
from tests.conftest import make_gpt

HF_REASON = "Hugging Face models need the 'hf' extra: pip install -e '.[hf]'"
# torch's nested-tensor path (the base nn.TransformerEncoder in eval) says it is a prototype
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
D, LAYERS, VOCAB = 32, 2, 100
NO_DROPOUT = adapterkit.AdapterConfig(dropout=0.0)


def hf() -> Any:
    return pytest.importorskip("transformers", reason=HF_REASON)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(seed: int = 1, shape: tuple[int, int] = (2, 7)) -> torch.Tensor:
    return torch.randint(2, VOCAB, shape, generator=_gen(seed))


def _text_batch() -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # one padded row, so that attention masks are exercised
    return {"input_ids": _tokens(), "attention_mask": mask}


def _padding() -> torch.Tensor:
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    return mask


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]  # the same base weights on every call
    batch: Callable[[], dict[str, Any]]
    n_auto: int  # adapters that targets="auto" places
    preset: bool = True  # False: covered by the structural rule, not by a preset
    out: Callable[[Any, dict], torch.Tensor] = lambda y, _b: y if torch.is_tensor(y) else y[0]


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make()
    return build


def _hf_case(name: str, model_cls: str, config_cls: str | None, batch: Callable[[], dict],
             n_auto: int = 2 * LAYERS, preset: bool = True, library: str = "transformers",
             **config: Any) -> Case:
    def make() -> nn.Module:
        t = hf() if library == "transformers" else pytest.importorskip(
            library, reason=f"needs {library}: pip install -e '.[{library}]'")
        if config_cls is None:
            return getattr(t, model_cls)(**config)
        cfg = getattr(t, config_cls)(**config)
        return getattr(t, model_cls)(cfg)
    return Case(name, _seeded(make), batch, n_auto, preset)


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=_gen(4))}


_DECODER = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                bos_token_id=0, eos_token_id=1, pad_token_id=0)
_ENCODER = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                intermediate_size=64, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


def _masked(y: torch.Tensor, batch: dict) -> torch.Tensor:
    # Padded positions hold garbage on the slow path and zeros on the nested-tensor path.
    mask = batch.get("src_key_padding_mask")
    return y if mask is None else y.masked_fill(mask[..., None], 0.0)


def _torch_layer(cls: type, **kw: Any) -> nn.Module:
    return cls(d_model=D, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, **kw)


CASES = [
    Case("reference GPT", _seeded(lambda: make_gpt(d=D)), lambda: {"x": _tokens(1)[:, :7] % 61},
         2 * LAYERS),
    Case("nn.TransformerEncoder",
         _seeded(lambda: nn.TransformerEncoder(_torch_layer(nn.TransformerEncoderLayer), LAYERS)),
         lambda: {"src": torch.randn(2, 7, D, generator=_gen(2)),
                  "src_key_padding_mask": _padding()},
         2 * LAYERS, out=lambda y, b: _masked(y, b)),
    Case("nn.TransformerDecoder",
         _seeded(lambda: nn.TransformerDecoder(_torch_layer(nn.TransformerDecoderLayer), LAYERS)),
         lambda: {"tgt": torch.randn(2, 5, D, generator=_gen(2)),
                  "memory": torch.randn(2, 7, D, generator=_gen(3)),
                  "tgt_mask": nn.Transformer.generate_square_subsequent_mask(5),
                  "tgt_is_causal": True},
         2 * LAYERS),
    Case("nn.Transformer",
         _seeded(lambda: nn.Transformer(d_model=D, nhead=4, num_encoder_layers=LAYERS,
                                        num_decoder_layers=LAYERS, dim_feedforward=64,
                                        dropout=0.0, batch_first=True)),
         lambda: {"src": torch.randn(2, 7, D, generator=_gen(2)),
                  "tgt": torch.randn(2, 5, D, generator=_gen(3)),
                  "src_key_padding_mask": _padding(), "memory_key_padding_mask": _padding()},
         4 * LAYERS),
    _hf_case("GPT-2", "GPT2LMHeadModel", "GPT2Config", _text_batch, n_embd=D, n_layer=LAYERS,
             n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=1,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    _hf_case("BERT", "BertModel", "BertConfig", _text_batch, **_ENCODER),
    _hf_case("RoBERTa", "RobertaModel", "RobertaConfig", _text_batch, pad_token_id=1,
             **_ENCODER),
    _hf_case("LLaMA", "LlamaForCausalLM", "LlamaConfig", _text_batch, **_DECODER),
    _hf_case("Mistral", "MistralForCausalLM", "MistralConfig", _text_batch, **_DECODER),
    _hf_case("T5", "T5ForConditionalGeneration", "T5Config",
             lambda: {**_text_batch(), "decoder_input_ids": _tokens(3, (2, 4))},
             n_auto=4 * LAYERS, d_model=D, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4,
             vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0),
    _hf_case("ViT", "ViTModel", "ViTConfig",
             lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=_gen(4))},
             hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
             intermediate_size=64, image_size=16, patch_size=4, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0),
    # CNNs and a diffusion UNet: adapters on the residual branches, on the channel axis
    # (ResNet's conv stack, UNet's conv2) or on channels-last features (ConvNeXt's pwconv2,
    # UNet attention's to_out.0).
    _hf_case("ResNet", "ResNetModel", "ResNetConfig", _pixels, n_auto=LAYERS,
             embedding_size=16, hidden_sizes=[D, D], depths=[1, 1], layer_type="bottleneck"),
    # layer scale 1, as a trained ConvNeXt has it: its init (1e-6) scales the branch, and
    # an adapter in it, down to nothing
    _hf_case("ConvNeXt", "ConvNextModel", "ConvNextConfig", _pixels, n_auto=LAYERS,
             hidden_sizes=[D, D], depths=[1, 1], num_stages=2, layer_scale_init_value=1.0),
    _hf_case("UNet2DModel", "UNet2DModel", None,
             lambda: {"sample": torch.randn(2, 3, 16, 16, generator=_gen(4)),
                      "timestep": torch.tensor([3, 500])},
             n_auto=12, library="diffusers", sample_size=16, block_out_channels=(D, D),
             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
             norm_num_groups=8, attention_head_dim=8),
    # No preset: the structural rule finds these.
    _hf_case("Qwen2", "Qwen2ForCausalLM", "Qwen2Config", _text_batch, preset=False,
             **_DECODER),
    _hf_case("GPT-NeoX", "GPTNeoXForCausalLM", "GPTNeoXConfig", _text_batch, preset=False,
             hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
             intermediate_size=64, vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0),
    _hf_case("DistilBERT", "DistilBertModel", "DistilBertConfig", _text_batch, preset=False,
             dim=D, n_layers=LAYERS, n_heads=4, hidden_dim=64, vocab_size=VOCAB, dropout=0.0,
             attention_dropout=0.0),
    _hf_case("OPT", "OPTForCausalLM", "OPTConfig", _text_batch, preset=False, hidden_size=D,
             num_hidden_layers=LAYERS, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
             word_embed_proj_dim=D, dropout=0.0, attention_dropout=0.0, bos_token_id=0,
             eos_token_id=1, pad_token_id=0),
    # Mixtures of experts: Mixtral's experts are fused tensors (no Linear inside the block, so
    # the width comes from the model's config); Qwen2-MoE's block ends with a one-output gate.
    _hf_case("Mixtral", "MixtralForCausalLM", "MixtralConfig", _text_batch, preset=False,
             num_local_experts=4, num_experts_per_tok=2, **_DECODER),
    _hf_case("Qwen2-MoE", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", _text_batch, preset=False,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=32, **_DECODER),
]
BY_NAME = {case.name: case for case in CASES}
ids = [case.name for case in CASES]


def run(case: Case, model: nn.Module, batch: dict) -> torch.Tensor:
    return case.out(model(**batch), batch)


def built(case: Case, config: adapterkit.AdapterConfig = NO_DROPOUT) -> nn.Module:
    return adapterkit.inject(case.build(), "auto", config)


def train_adapters(case: Case, model: nn.Module, steps: int = 6) -> list[float]:
    """Fit the main output to a fixed random target, adapters only; the losses, in order."""
    adapterkit.freeze(model, train=["adapters"])
    batch = case.batch()
    model.train()
    for m in model.modules():  # a frozen CNN keeps its BatchNorm statistics (docs/models.md)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    with torch.no_grad():
        target = torch.randn(run(case, model, batch).shape, generator=_gen(9))
    opt = torch.optim.Adam(adapterkit.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (run(case, model, batch) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- what "auto" selects --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_auto_places_two_adapters_per_layer_and_by_the_expected_route(case: Case) -> None:
    model = built(case)
    assert len(adapterkit.adapters(model)) == case.n_auto
    assert all(a.d_model == D for a in adapterkit.adapters(model).values())
    has_preset = any(preset_for(m) is not None for m in model.modules())
    assert has_preset == case.preset


# -- identity at initialisation -------------------------------------------------------------------

# The reference GPT's identity at init, eval and train, is tests/engine/test_inject.py's
# hypothesis test (any targets, placement and config, to 1e-6): not repeated here.
NOT_GPT = [c for c in CASES if c.name != "reference GPT"]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", NOT_GPT, ids=[c.name for c in NOT_GPT])
def test_identity_at_init(case: Case, mode: str) -> None:
    model = case.build().train(mode == "train")
    batch = case.batch()
    with torch.no_grad():
        before = run(case, model, batch)
        adapterkit.inject(model, "auto", NO_DROPOUT)
        after = run(case, model, batch)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


# -- gradients reach the adapters only ------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_freeze_then_backward_gives_gradients_on_adapters_only(case: Case) -> None:
    model = built(case).train()
    adapterkit.freeze(model, train=["adapters"])
    run(case, model, case.batch()).pow(2).mean().backward()
    adapter_params = {id(p) for a in adapterkit.adapters(model).values() for p in a.parameters()}
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    ups = [a.up.weight.grad for a in adapterkit.adapters(model).values()]
    assert all(g.abs().sum() > 0 for g in ups)  # zero-init up still learns


# -- training, then every execution path ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_training_lowers_loss_and_adapters_act_on_every_path(case: Case) -> None:
    model = built(case)
    losses = train_adapters(case, model)
    assert losses[-1] < losses[0], losses
    batch = case.batch()

    def differs(context: Callable[[], Any], train: bool) -> float:
        model.train(train)
        with context():
            adapted = run(case, model, batch)
            with adapterkit.disabled(model):
                base = run(case, model, batch)
        return (adapted - base).abs().max().item()

    paths = {"train": (nullcontext, True), "eval": (nullcontext, False),
             "no_grad": (torch.no_grad, False), "inference_mode": (torch.inference_mode, False)}
    gaps = {path: differs(ctx, train) for path, (ctx, train) in paths.items()}
    assert all(gap > 1e-4 for gap in gaps.values()), gaps


# -- save / load onto a fresh model ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_save_load_round_trip_onto_a_fresh_model(case: Case, tmp_path) -> None:
    model = built(case)
    train_adapters(case, model, steps=2)
    path = adapterkit.save_adapters(model, tmp_path / "adapters")
    fresh = adapterkit.load_adapters(case.build(), path)
    assert sorted(adapterkit.adapters(fresh)) == sorted(adapterkit.adapters(model))
    # the same freeze as the trained model: torch's layers pick kernels by requires_grad
    adapterkit.freeze(fresh, train=["adapters"])
    batch = case.batch()
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(run(case, fresh, batch), run(case, model, batch))
        with adapterkit.disabled(model):
            base = run(case, model, batch)
        assert not torch.allclose(run(case, fresh, batch), base)


# -- generation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["GPT-2", "LLaMA"])
def test_generate_with_adapters(name: str) -> None:
    case = BY_NAME[name]
    model = case.build().eval()
    prompt = _tokens(5, (2, 4))

    def generate() -> torch.Tensor:
        return model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              eos_token_id=None)

    base = generate()
    adapterkit.inject(model, "auto", NO_DROPOUT)
    assert torch.equal(generate(), base)  # zero init: same tokens
    for adapter in adapterkit.adapters(model).values():
        nn.init.normal_(adapter.up.weight, std=0.5, generator=_gen(6))
    adapted = generate()
    assert adapted.shape == base.shape == (2, 10)
    assert not torch.equal(adapted, base)
    with adapterkit.disabled(model):
        assert torch.equal(generate(), base)


# -- cross-attention (T5) -------------------------------------------------------------------------


def test_t5_auto_leaves_cross_attention_out_and_explicit_targets_add_it() -> None:
    case = BY_NAME["T5"]
    model = built(case)
    names = list(adapterkit.adapters(model))
    assert not any("EncDecAttention" in n for n in names)
    assert sum("decoder." in n for n in names) == sum("encoder." in n for n in names) == 4
    adapterkit.eject(model)
    targets = adapterkit.auto_targets(model) + ["decoder.block.*.layer.1.EncDecAttention"]
    batch = case.batch()
    with torch.no_grad():
        before = run(case, model.eval(), batch)
        adapterkit.inject(model, targets, NO_DROPOUT)
        torch.testing.assert_close(run(case, model, batch), before, atol=1e-5, rtol=0)
    cross = [a for n, a in adapterkit.adapters(model).items() if "EncDecAttention" in n]
    assert len(cross) == LAYERS
    for adapter in cross:
        nn.init.normal_(adapter.up.weight, std=0.5, generator=_gen(7))
    with torch.no_grad():
        assert not torch.allclose(run(case, model, batch), before)


# -- torch's fast paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_transformer_encoder_nested_tensor_path_in_eval_includes_adapters(context) -> None:
    case = BY_NAME["nn.TransformerEncoder"]
    model = case.build().eval()
    assert model.use_nested_tensor  # the default: padded batches go through nested tensors
    batch = case.batch()
    with context():
        base = run(case, model, batch)
    adapterkit.inject(model, "auto", NO_DROPOUT)
    with context():
        torch.testing.assert_close(run(case, model, batch), base, atol=1e-5, rtol=0)
    for adapter in adapterkit.adapters(model).values():
        nn.init.normal_(adapter.up.weight, std=0.5, generator=_gen(8))
    with context():
        adapted = run(case, model, batch)
    keep = ~batch["src_key_padding_mask"]
    assert torch.isfinite(adapted[keep]).all()
    assert (adapted - base)[keep].abs().min() > 0  # every real position sees the adapters
    adapterkit.eject(model)
    assert model.use_nested_tensor
    assert all(layer.activation_relu_or_gelu == 1 for layer in model.layers)  # ReLU fast path
    with context():
        torch.testing.assert_close(run(case, model, batch), base, atol=0, rtol=0)
