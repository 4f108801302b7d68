"""Plots of the benchmark results, as PNGs under docs/ (needs matplotlib: the ``cli`` extra).

Reads what the benchmarks saved under benchmarks/results/, so it runs without re-measuring:

- docs/param_counts.png: trainable % against bottleneck, one line per model, coloured by
  family, Houlsby and Pfeiffer side by side (from param_counts.py);
- docs/runtime.png: step time relative to full fine-tuning, inference forward relative to the
  base, and peak RSS growth, per variant and model (from runtime.py).

    python benchmarks/plots.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
FAMILY_COLOURS = {"reference GPT": "tab:gray", "GPT-2": "tab:blue", "BERT": "tab:orange",
                  "T5": "tab:green", "ViT": "tab:purple", "LLaMA": "tab:red"}
VARIANT_COLOURS = {"full": "tab:gray", "adapterkit": "tab:blue", "adapterhub": "tab:orange",
                   "hand": "tab:green", "peft_lora": "tab:purple"}


def param_counts(rows: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, style in zip(axes, ("Houlsby", "Pfeiffer"), strict=True):
        models = dict.fromkeys(r["model"] for r in rows)
        seen: dict[str, int] = {}  # models drawn so far per family: each gets its own style
        for model in models:
            pts = sorted((r["bottleneck"], 100 * r["trainable"] / r["total"]) for r in rows
                         if r["model"] == model and r["style"] == style
                         and r["column"].startswith("b="))
            family = next(r["family"] for r in rows if r["model"] == model)
            k = seen[family] = seen.get(family, -1) + 1
            ax.plot(*zip(*pts, strict=True), marker="osD^"[k % 4], ms=4, lw=1.2,
                    ls=["-", "--", ":", "-."][k % 4], color=FAMILY_COLOURS.get(family, "black"),
                    label=model)
        ax.set(xscale="log", yscale="log", xlabel="bottleneck b", title=f"{style} adapters",
               xticks=[8, 16, 64, 256], xticklabels=["8", "16", "64", "256"])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}%"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("trainable parameters (of the total)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Adapters' share of the parameters (benchmarks/param_counts.py)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def runtime(results: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    variants = list(VARIANT_COLOURS)
    width = 0.8 / len(variants)
    panels = [
        ("step time / full fine-tuning", lambda r, v: r["step_ratio"][v], 0.60,
         "target 0.60 (BERT-base)"),
        ("inference forward / base", lambda r, v: r["infer_ratio"].get(v, 1.0), 1.03,
         "target 1.03"),
        ("peak RSS growth (MiB)",
         lambda r, v: r["memory"][v]["peak_mib"] - r["memory"][v]["import_mib"], None, ""),
    ]
    for ax, (title, value, target, label) in zip(axes, panels, strict=True):
        for i, v in enumerate(variants):
            xs = [m + (i - len(variants) / 2 + 0.5) * width for m in range(len(results))]
            ax.bar(xs, [value(r, v) for r in results], width, color=VARIANT_COLOURS[v], label=v)
        if target is not None:
            ax.axhline(target, color="black", ls="--", lw=0.8)
            ax.annotate(label, (1, target), xycoords=("axes fraction", "data"),
                        xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8)
        if title.startswith("inference"):  # ratios near 1: zoom in on where they differ
            top = max(r["infer_ratio"][v] for r in results for v in r["infer_ratio"])
            ax.set_ylim(0.95, max(top, target or 1) + 0.03)
        ax.set(title=title, xticks=range(len(results)), xticklabels=[r["model"] for r in results])
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Adapters side by side with AdapterHub and PEFT (benchmarks/runtime.py)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    made = []
    counts = RESULTS / "param_counts.json"
    if counts.exists():
        param_counts(json.loads(counts.read_text()), DOCS / "param_counts.png")
        made.append("docs/param_counts.png")
    runs = [json.loads((RESULTS / f"runtime_{m}.json").read_text()) for m in ("bert", "gpt2")
            if (RESULTS / f"runtime_{m}.json").exists()]
    if runs:
        runtime(runs, DOCS / "runtime.png")
        made.append("docs/runtime.png")
    if not made:
        raise SystemExit("no results under benchmarks/results/: run param_counts.py and "
                         "runtime.py first")
    print("wrote " + ", ".join(made))


if __name__ == "__main__":
    main()
