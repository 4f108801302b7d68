"""What ``adapterkit finetune`` reports from its runs: the numbers of ``results.json``, the
accuracy table with its times, and the plot of the validation accuracy and training loss."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..report import format_table, percent
from .classify import Run


def summarise(runs: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Per regime: mean accuracy over seeds, each seed's, parameter counts, times, curves."""
    out = {}
    for regime, rs in runs.items():
        accs = [r.accuracy for r in rs]
        out[regime] = {
            "accuracy": statistics.fmean(accs), "accuracies": accs,
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "trainable": rs[0].trainable, "total": rs[0].total,
            "trainable_share": rs[0].trainable / rs[0].total,
            "seconds": sum(r.seconds for r in rs), "seconds_per_seed": [r.seconds for r in rs],
            "steps": rs[0].steps,
            # what a user can check: the runs' wall time over their steps (evaluations in)
            "seconds_per_step": sum(r.seconds for r in rs) / sum(r.steps for r in rs),
            "step_seconds": statistics.median(r.step_seconds for r in rs),
            "curves": [[list(point) for point in r.curve] for r in rs],
            "loss_curves": [[list(point) for point in r.loss_curve] for r in rs],
        }
    return out


TIME_NOTE = ("time: wall time of the regime's runs, all seeds (linear probe, training steps, "
             "evaluations); time/step: that time over their steps")


def results_table(summary: dict[str, dict[str, Any]]) -> str:
    """The accuracy table, and a line that says what its times are."""
    rows = []
    for regime, s in summary.items():
        spread = f" ± {100 * s['std']:.1f}" if len(s["accuracies"]) > 1 else ""
        rows.append((regime, f"{100 * s['accuracy']:.1f}{spread}",
                     " ".join(f"{100 * a:.1f}" for a in s["accuracies"]),
                     f"{s['trainable']:,}", f"{s['total']:,}",
                     percent(s["trainable"], s["total"]), f"{s['seconds']:.0f}s",
                     f"{1000 * s['seconds_per_step']:.0f}ms"))
    table = format_table(["regime", "accuracy %", "per seed", "trainable", "total",
                          "trainable %", "time", "time/step"], rows)
    return f"{table}\n{TIME_NOTE}"


def plot_curves(summary: dict[str, dict[str, Any]], path: Path, title: str,
                probe: bool = True) -> bool:
    """``curves_figure`` as a PNG at ``path``; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = curves_figure(summary, title, probe)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def curves_figure(summary: dict[str, dict[str, Any]], title: str, probe: bool = True) -> Any:
    """Validation accuracy (left) and training loss (right) against steps, a line per seed.

    Step 0 of ``adapters`` and ``full`` is the head fitted on the frozen encoder (the linear
    probe, when ``probe``), which the plot says. ``head`` starts from its untrained head, near
    chance: its legend gives that start, and the accuracy axis spans the other points, so
    that it does not flatten the curves that matter.
    """
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (regime, s) in enumerate(summary.items()):
        for j, (curve, losses) in enumerate(zip(s["curves"], s["loss_curves"], strict=True)):
            style = {"marker": ".", "color": f"C{i}", "alpha": 1.0 if j == 0 else 0.5}
            start = (f"; step 0: untrained head, {100 * curve[0][1]:.1f}%"
                     if regime == "head" and curve and curve[0][0] == 0 else "")
            label = f"{regime} ({100 * s['accuracy']:.1f}%{start})" if j == 0 else None
            acc.plot([p[0] for p in curve], [100 * p[1] for p in curve], label=label, **style)
            loss.plot([p[0] for p in losses], [p[1] for p in losses], label=label, **style)
    shown = [100 * p[1] for r, s in summary.items() for c in s["curves"] for p in c
             if not (r == "head" and p[0] == 0)]
    if shown:
        acc.set_ylim(min(shown) - 1, max(shown) + 1)
    probed = [s["curves"][0][0] for r, s in summary.items()
              if probe and r != "head" and s["curves"][0] and s["curves"][0][0][0] == 0]
    if probed:
        step, value = probed[0]
        acc.annotate(f"step 0: the linear probe\n(head fitted on the frozen encoder)\n"
                     f"{100 * value:.1f}%", xy=(step, 100 * value), xytext=(0.5, 0.06),
                     textcoords="axes fraction", fontsize=8,
                     arrowprops={"arrowstyle": "->", "color": "0.4"})
    acc.set_ylabel("validation accuracy (%)")
    acc.set_title("validation accuracy", fontsize=10)
    loss.set_ylabel("training loss (cross-entropy)")
    loss.set_title("training loss, mean over the steps since the previous point", fontsize=10)
    for ax in (acc, loss):
        ax.set_xlim(left=0)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    loss.legend(fontsize=8, loc="upper right",  # where the falling losses leave room
                title="regime (final validation accuracy)", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
