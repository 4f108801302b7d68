"""How many parameters adapters train, on real model sizes built on the ``meta`` device.

Houlsby adapters (``targets="auto"``: attention and feed-forward outputs) and Pfeiffer adapters
(``"auto:ffn"``: feed-forward outputs only) at bottleneck 8, 16, 64, 256 and at reduction
factor 16, on the reference GPT, GPT-2 small to XL, BERT-base/-large, T5-base, ViT-B/16 and
LLaMA-7B/-13B. The configs are written out from the published hyperparameters: nothing is
downloaded, and on ``meta`` a 13B model takes no memory. Every count is checked against the
closed form: an adapter on a width-``d`` output with bottleneck ``b`` has ``2*d*b + b + d``
parameters (down and up weights, their biases).

    python benchmarks/param_counts.py           # full table, writes docs/benchmarks.md
    python benchmarks/param_counts.py --quick   # reference GPT and GPT-2 small; writes nothing
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import common
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from adapterkit.models.gpt import GPT

DATA = common.ROOT / "benchmarks" / "results" / "param_counts.json"
STYLES = {"Houlsby": "auto", "Pfeiffer": "auto:ffn"}
BOTTLENECKS = (8, 16, 64, 256)
REDUCTION = 16
HOULSBY_PAPER = 0.036  # Houlsby et al. 2019, Table 1: BERT-large, GLUE, trained params per task


class CountMismatch(AssertionError):
    """A count that disagrees with the closed form: a bug in adapterkit or in a preset."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    build: Callable[[], nn.Module]  # called under torch.device("meta")
    d: int  # hidden width: every adapter's d_model
    layers: int
    attention_outputs: int  # sub-layers that "auto" adapts for attention (self-attention only)
    ffn_outputs: int
    published: str  # the size the model is known by

    def adapters(self, style: str) -> int:
        return self.ffn_outputs + (self.attention_outputs if style == "Houlsby" else 0)


def _gpt(d: int, layers: int, heads: int, vocab: int, context: int) -> Callable[[], nn.Module]:
    return lambda: GPT(vocab_size=vocab, d_model=d, max_length=context, num_heads=heads,
                       dff=4 * d, dropout=0.0, N=layers)


def _hf(model_class: str, config_class: str, **config: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers  # only the Hugging Face rows need it

        cfg = getattr(transformers, config_class)(**config)
        return getattr(transformers, model_class)(cfg)

    return build


def _gpt2(d: int, layers: int, heads: int) -> Callable[[], nn.Module]:
    return _hf("GPT2LMHeadModel", "GPT2Config", n_embd=d, n_layer=layers, n_head=heads)


def _bert(d: int, layers: int, heads: int) -> Callable[[], nn.Module]:
    return _hf("BertModel", "BertConfig", hidden_size=d, num_hidden_layers=layers,
               num_attention_heads=heads, intermediate_size=4 * d)


def _llama(d: int, ffn: int, layers: int, heads: int) -> Callable[[], nn.Module]:
    return _hf("LlamaForCausalLM", "LlamaConfig", hidden_size=d, intermediate_size=ffn,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
               vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
               tie_word_embeddings=False)


def _spec(name: str, family: str, build: Callable[[], nn.Module], d: int, layers: int,
          published: str, stacks: int = 1) -> ModelSpec:
    # stacks=2: an encoder and a decoder, each of `layers` blocks (T5)
    return ModelSpec(name, family, build, d, layers, stacks * layers, stacks * layers, published)


MODELS: tuple[ModelSpec, ...] = (
    _spec("ref GPT d128 L4 (CLI default)", "reference GPT", _gpt(128, 4, 4, 256, 64), 128, 4,
          "-"),
    _spec("ref GPT d256 L4 (overhead.py)", "reference GPT", _gpt(256, 4, 4, 256, 128), 256, 4,
          "-"),
    _spec("ref GPT d768 L12 (GPT-2 shape)", "reference GPT", _gpt(768, 12, 12, 50257, 1024),
          768, 12, "-"),
    _spec("GPT-2 small", "GPT-2", _gpt2(768, 12, 12), 768, 12, "124M"),
    _spec("GPT-2 medium", "GPT-2", _gpt2(1024, 24, 16), 1024, 24, "355M"),
    _spec("GPT-2 large", "GPT-2", _gpt2(1280, 36, 20), 1280, 36, "774M"),
    _spec("GPT-2 XL", "GPT-2", _gpt2(1600, 48, 25), 1600, 48, "1.5B"),
    _spec("BERT-base", "BERT", _bert(768, 12, 12), 768, 12, "110M"),
    _spec("BERT-large", "BERT", _bert(1024, 24, 16), 1024, 24, "340M"),
    _spec("T5-base", "T5", _hf("T5ForConditionalGeneration", "T5Config", d_model=768, d_ff=3072,
                               d_kv=64, num_heads=12, num_layers=12, vocab_size=32128),
          768, 12, "220M", stacks=2),
    _spec("ViT-B/16", "ViT", _hf("ViTModel", "ViTConfig", hidden_size=768, num_hidden_layers=12,
                                 num_attention_heads=12, intermediate_size=3072, image_size=224,
                                 patch_size=16), 768, 12, "86M"),
    _spec("LLaMA-7B", "LLaMA", _llama(4096, 11008, 32, 32), 4096, 32, "6.7B"),
    _spec("LLaMA-13B", "LLaMA", _llama(5120, 13824, 40, 40), 5120, 40, "13.0B"),
)
QUICK = ("ref GPT d128 L4 (CLI default)", "GPT-2 small")


def configs(d: int) -> dict[str, tuple[AdapterConfig, int]]:
    """Each column's config and the bottleneck it must give at width ``d``."""
    if d % REDUCTION:
        raise ValueError(f"width {d} is not a multiple of the reduction factor {REDUCTION}")
    columns = {f"b={b}": (AdapterConfig(bottleneck=b), b) for b in BOTTLENECKS}
    columns[f"r={REDUCTION}"] = (AdapterConfig(reduction_factor=REDUCTION), d // REDUCTION)
    return columns


def closed_form(d: int, b: int) -> int:
    """Parameters of one adapter: down (d*b + b) and up (b*d + d)."""
    return 2 * d * b + b + d


@dataclass(frozen=True)
class Count:
    adapters: int
    trainable: int
    total: int  # base + adapters, as adapterkit.summary counts it (tied weights once)
    base: int


def measure(model: nn.Module, targets: str, config: AdapterConfig, *, d: int, b: int,
            adapters: int) -> Count:
    """Inject, count with ``adapterkit.summary`` / ``adapters()``, eject; check the closed form.

    Raises ``CountMismatch`` when the number of adapters, their widths, or the trainable or
    total count differ from ``adapters`` adapters of ``closed_form(d, b)`` each.
    """
    base = sum(p.numel() for p in model.parameters())
    adapterkit.inject(model, targets, config)
    try:
        adapterkit.freeze(model, train=["adapters"])
        summary = adapterkit.summary(model)
        found = adapterkit.adapters(model)
        shapes = {(a.d_model, a.down.out_features) for a in found.values()}
    finally:
        adapterkit.eject(model)
    want = adapters * closed_form(d, b)
    problems = []
    if len(found) != adapters:
        problems.append(f"{len(found)} adapters, expected {adapters}")
    if shapes != {(d, b)}:
        problems.append(f"(d_model, bottleneck) {sorted(shapes)}, expected {(d, b)}")
    if summary.trainable != want:
        problems.append(f"trainable {summary.trainable:,}, expected {adapters} x "
                        f"(2*{d}*{b} + {b} + {d}) = {want:,}")
    if summary.total != base + want:
        problems.append(f"total {summary.total:,}, expected base {base:,} + {want:,}")
    if problems:
        raise CountMismatch(f"{targets!r} with {config}: " + "; ".join(problems))
    return Count(len(found), summary.trainable, summary.total, base)


def build_on_meta(spec: ModelSpec) -> nn.Module:
    with torch.device("meta"):
        return spec.build()


def run(specs: list[ModelSpec]) -> list[dict]:
    rows = []
    for spec in specs:
        start = time.perf_counter()
        model = build_on_meta(spec)
        for style, targets in STYLES.items():
            for column, (config, b) in configs(spec.d).items():
                count = measure(model, targets, config, d=spec.d, b=b,
                                adapters=spec.adapters(style))
                rows.append({"model": spec.name, "family": spec.family, "d": spec.d,
                             "layers": spec.layers, "published": spec.published,
                             "style": style, "column": column, "bottleneck": b, **asdict(count)})
        print(f"  {spec.name}: built and counted in {time.perf_counter() - start:.1f} s",
              flush=True)
    return rows


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _cell(row: dict) -> str:
    return f"{_millions(row['trainable'])} ({100 * row['trainable'] / row['total']:.2f}%)"


def houlsby_note(rows: list[dict]) -> tuple[str, str]:
    """The cell beside BERT-large's Houlsby row, and the paragraph that explains it."""
    bert = {r["bottleneck"]: r for r in rows
            if r["model"] == "BERT-large" and r["style"] == "Houlsby"}
    if not bert:
        return "", ""
    spec = next(s for s in MODELS if s.name == "BERT-large")
    # The paper's percentages are of the transformer layers (no embeddings, no pooler): its
    # 2.1% at size 64 comes out exactly on that base, and not on the whole model.
    layers = sum(p.numel() for p in build_on_meta(spec).encoder.parameters())
    d, n = spec.d, spec.adapters("Houlsby")
    # the single bottleneck at which n adapters are 3.6% of that base: n (2db + b + d) = 0.036 L
    b_match = (HOULSBY_PAPER * layers / n - d) / (2 * d + 1)
    of_layers = {b: 100 * r["trainable"] / layers for b, r in bert.items()}
    of_model = {b: 100 * r["trainable"] / r["base"] for b, r in bert.items()}
    cell = (f"b=64: paper 2.1%, here {of_layers[64]:.2f}% of the layers; paper's 3.6% "
            f"(sizes 8-256) is b~{b_match:.0f}")
    text = (
        f"**Houlsby et al. 2019**, Table 1 (BERT-large on GLUE): adapters train 3.6% parameters "
        f"per task when their size is chosen per task from {{8, 64, 256}}, and 2.1% at size 64 "
        f"for every task. Their percentages are of BERT-large's {spec.layers} transformer layers "
        f"({_millions(layers)} parameters, without the embeddings and the pooler): of those, "
        f"the b=64 row's {n} Houlsby adapters are {of_layers[64]:.2f}%, the paper's 2.1%; of "
        f"the whole {_millions(bert[64]['base'])} model they are {of_model[64]:.2f}%. "
        "The 3.6% matches no single row because it is an average over tasks of three sizes: "
        f"b=8 gives {of_layers[8]:.2f}% and b=256 {of_layers[256]:.2f}% of the layers, and one "
        f"bottleneck of about {b_match:.0f} for every task would give 3.6%. The paper also "
        "trains the layer norms (0.1M parameters, 0.03 points) and each task's head; "
        "adapterkit's count is the adapters alone. The table's percentages are trainable / "
        "total with the adapters included, as `adapterkit.summary` prints them."
    )
    return cell, text


def render(rows: list[dict]) -> str:
    columns = [f"b={b}" for b in BOTTLENECKS] + [f"r={REDUCTION}"]
    note_cell, note = houlsby_note(rows)
    by_key = {(r["model"], r["style"], r["column"]): r for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for style in STYLES:
            first = by_key[(model, style, columns[0])]
            r16 = by_key[(model, style, columns[-1])]
            out.append((
                model, style, first["d"], first["adapters"],
                f"{_millions(first['base'])} ({first['published']})",
                *(_cell(by_key[(model, style, c)]) for c in columns[:-1]),
                f"b={r16['bottleneck']}: {_cell(r16)}",
                note_cell if (model, style) == ("BERT-large", "Houlsby") else "",
            ))
    header = ["model", "style", "d", "#", "base params (published)",
              *(f"trainable at {c}" for c in columns), "Houlsby et al. 2019"]
    checked = len(rows)
    return (
        "Trainable parameters (adapters only; % of the total with adapters) for Houlsby "
        "(`targets=\"auto\"`: attention and feed-forward outputs) and Pfeiffer "
        "(`\"auto:ffn\"`: feed-forward outputs) adapters. Models built on the `meta` device "
        "from their published hyperparameters (GPT-2 with its tied LM head, BERT and ViT with "
        "their pooler, T5 encoder-decoder with its tied head, LLaMA with its untied head); "
        "T5's cross-attention gets no adapter. `#` is the number of adapters.\n\n"
        + common.table(header, out)
        + f"\n\nAll {checked} counts equal the closed form `n * (2*d*b + b + d)` (checked by the "
        "script, which stops at the first mismatch; `tests/docs/test_param_counts.py` checks the "
        "same on the reference GPT and BERT).\n\n" + note
        + "\n\n![Trainable share against bottleneck, per model](param_counts.png)\n\n"
        "`python benchmarks/plots.py` redraws the plot from benchmarks/results/."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two small models, writes nothing")
    args = ap.parse_args()
    specs = [s for s in MODELS if not args.quick or s.name in QUICK]
    rows = run(specs)
    body = render(rows)
    print(body)
    if not args.quick:
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps(rows, indent=1) + "\n")
        common.write_section("Parameter counts (benchmarks/param_counts.py)", body)


if __name__ == "__main__":
    main()
