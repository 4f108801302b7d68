"""What per-example routing costs: one batch over 4 sets, against one set and 4 forwards.

BERT-base and GPT-2 small from transformers' default configs (random weights: timing only),
four sets on targets="auto" (bottleneck 64, GELU, sequential), eval mode, inference_mode.
Per model, interleaved in every round:

- base: the model with its sets disabled;
- one set: the batch of 32 with one set active (no routing);
- routed: the batch of 32, example i runs set i % 4, in one forward (routed());
- 4 forwards: each set active in turn on its 8 examples.

Target: routed / one set <= 1.15. Ratios are medians over rounds of per-round ratios, on
the wall clock and on this process's CPU time (work done rather than waiting for a core: on a
shared machine the steadier of the two).

    python benchmarks/routing.py            # full run, writes docs/benchmarks.md
    python benchmarks/routing.py --quick    # a smoke run on tiny configs, writes nothing
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import common
import torch
import transformers

import adapterkit

SETS = ["s0", "s1", "s2", "s3"]
TARGET = 1.15
READING = (
    "Reading: what routing adds to a forward with one set is, at each wrapped module, a gather "
    "(`index_select`) and a write-back (`index_copy_`) of each group's rows of the output, and "
    "the four sets' adapters running on 8 rows each instead of one adapter on 32 (the same "
    "multiply-adds); beyond that, the gap between the two columns moves from run to run with "
    "the load of the other jobs on this machine (see the load average), which is why both the "
    "wall-clock and the CPU-time ratios are given. On a CPU, four forwards of 8 examples cost "
    "about what one forward of 32 costs (the matmuls are compute-bound either way), so here "
    "routing buys one call for a mixed batch at the cost of about one forward, not a speed-up "
    "over separate forwards.\n"
)


def build(kind: str, quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128) if quick else {}
    if kind == "BERT-base":
        model = transformers.BertModel(transformers.BertConfig(**small))
    else:
        gpt_small = dict(n_embd=64, n_layer=2, n_head=4) if quick else {}
        model = transformers.GPT2Model(transformers.GPT2Config(**gpt_small))
    model.eval()
    config = adapterkit.AdapterConfig(init="normal", init_std=0.02)
    for name in SETS:
        adapterkit.inject(model, "auto", config, name=name)
    return model


def variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    names = [SETS[i % len(SETS)] for i in range(len(x))]

    def base() -> None:
        with adapterkit.disabled(model):
            model(input_ids=x)

    def one_set() -> None:
        adapterkit.set_active(model, SETS[0])
        model(input_ids=x)

    def routed() -> None:
        with adapterkit.routed(model, names):
            model(input_ids=x)

    def separate() -> None:
        for i, name in enumerate(SETS):
            adapterkit.set_active(model, name)
            model(input_ids=x[i::len(SETS)])

    return {"base": base, "one set": one_set, "routed": routed, "4 forwards": separate}


def both(wall: dict[str, list[float]], cpu: dict[str, list[float]], num: str, den: str,
         bold: bool = False) -> str:
    """``wall / CPU`` median ratios of ``num`` over ``den``."""
    a, b = common.median_ratio(wall, num, den), common.median_ratio(cpu, num, den)
    return f"**{a:.3f}** / **{b:.3f}**" if bold else f"{a:.3f} / {b:.3f}"


def check_routing(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Largest difference between the routed batch and, for each set, (1) the forward of its
    examples alone, (2) the forward of the whole batch with that set active, at its rows."""
    names = [SETS[i % len(SETS)] for i in range(len(x))]
    with adapterkit.routed(model, names):
        routed = model(input_ids=x).last_hidden_state
    alone = whole = 0.0
    for i, name in enumerate(SETS):
        adapterkit.set_active(model, name)
        rows = routed[i::len(SETS)]
        alone = max(alone, (rows - model(input_ids=x[i::len(SETS)]).last_hidden_state).abs().max()
                    .item())
        whole = max(whole, (rows - model(input_ids=x).last_hidden_state[i::len(SETS)]).abs().max()
                    .item())
    return alone, whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny configs, writes nothing")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32, help="tokens per example")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 is steadier on a shared machine")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    rows, notes = [], []
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    for kind in ["BERT-base", "GPT-2"]:
        model = build(kind, args.quick)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
        with torch.inference_mode():
            alone, whole = check_routing(model, x)
            fns = variants(model, x)
            for fn in fns.values():  # warm-up
                fn()
            times, cpu = common.interleaved_clocks(fns, rounds=rounds)
        ratio = {v: common.median_ratio(times, "routed", v) for v in ["one set", "4 forwards"]}
        rows.append([
            kind,
            *(f"{statistics.median(times[v]) * 1000:.0f}" for v in fns),
            both(times, cpu, "routed", "one set", bold=True),
            both(times, cpu, "routed", "4 forwards"),
            both(times, cpu, "one set", "base"),
        ])
        notes.append(f"{kind}: {whole:.1e} against the whole batch run with each set active, "
                     f"{alone:.1e} against each set's 8 examples run alone")
        print(kind, {v: f"{statistics.median(t) * 1000:.0f} ms" for v, t in times.items()},
              {k: f"{v:.3f}" for k, v in ratio.items()}, notes[-1], flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    header = ["model", *(f"{v} (ms)" for v in ["base", "one set", "routed", "4 forwards"]),
              "routed / one set (wall / CPU)", "routed / 4 forwards", "one set / base"]
    body = (
        f"Batch {args.batch} x {args.seq} tokens; example i runs set i % 4 of four sets on "
        "`targets=\"auto\"` (bottleneck 64, GELU, sequential); eval mode, `inference_mode`; "
        f"{torch.get_num_threads()} thread(s); {rounds} interleaved rounds, times are medians, "
        "ratios medians of per-round ratios. "
        f"Target: routed / one set <= {TARGET}. Load average (1, 5, 15 min) before: "
        f"{' '.join(load_before)}, after: {' '.join(load_after)} (a 2-core machine shared with "
        "other jobs).\n\n"
        + common.table(header, rows) + "\n\n"
        + "Largest difference of the routed outputs (last hidden state) from unrouted forwards: "
        + "; ".join(notes) + ". The second is the base model's own rounding: its matmuls round a "
        "row differently in a batch of 8 than in a batch of 32.\n\n"
        + READING
    )
    print(body)
    if not args.quick:
        common.write_section("Per-example routing (benchmarks/routing.py)", body)


if __name__ == "__main__":
    main()
