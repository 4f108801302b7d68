"""What the checkpoint-replay check costs a training step, and what routing and checkpointing cost.

Every wrapped module's slot now asks, at each training forward, whether it runs inside a
``torch.utils.checkpoint`` call (two C calls outside one: the saved-tensor hooks and the
backward's task id), so that a recompute can replay the sets the forward ran. This measures a
training step (forward, loss, backward) of BERT-base (transformers' default config, random
weights: timing only) with adapters on ``targets="auto"``, interleaved in every round:

- before: the slot without that check (patched out: the code as it was);
- now: the slot as it is, no routing, no checkpointing;
- routed: a batch whose examples alternate between two sets, in ``routed()``;
- checkpointing: ``gradient_checkpointing_enable(use_reentrant=False)``.

Ratios are medians over rounds of per-round ratios, on the wall clock and on this process's CPU
time.

    python benchmarks/training_step.py            # full run, writes docs/benchmarks.md
    python benchmarks/training_step.py --quick    # tiny config, writes nothing
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import common
import torch
import transformers

import adapterkit
from adapterkit import slot as slot_module

REPLAYED = slot_module._replayed


def build(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128) if quick else {}
    config = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     **small)
    model = transformers.BertModel(config)
    for name in ["a", "b"]:
        adapterkit.inject(model, "auto", adapterkit.AdapterConfig(dropout=0.0), name=name)
    adapterkit.set_active(model, "a")
    with warnings.catch_warnings():  # set b is inactive: it trains only in the routed variant
        warnings.simplefilter("ignore", UserWarning)
        adapterkit.freeze(model, train=["adapters"])
    return model.train()


def variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    names = ["a", "b"] * (len(x) // 2)

    def step() -> None:
        model(input_ids=x).last_hidden_state.square().mean().backward()
        model.zero_grad(set_to_none=True)

    def before() -> None:
        slot_module._replayed = lambda slot, plan: plan
        try:
            step()
        finally:
            slot_module._replayed = REPLAYED

    def routed() -> None:
        with adapterkit.routed(model, names):
            out = model(input_ids=x).last_hidden_state
        out.square().mean().backward()
        model.zero_grad(set_to_none=True)

    def checkpointing() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the transformers 5 alias
            model.gradient_checkpointing_enable({"use_reentrant": False})
            try:
                step()
            finally:
                model.gradient_checkpointing_disable()

    return {"before": before, "now": step, "routed": routed, "checkpointing": checkpointing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, writes nothing")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    model = build(args.quick)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                      generator=torch.Generator().manual_seed(1))
    fns = variants(model, x)
    for fn in fns.values():  # warm-up
        fn()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    wall, cpu = common.interleaved_clocks(fns, rounds)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    def ratio(num: str, den: str) -> str:
        return (f"{common.median_ratio(wall, num, den):.3f} / "
                f"{common.median_ratio(cpu, num, den):.3f}")

    rows = [[name, f"{statistics.median(wall[name]) * 1000:.0f}",
             f"{statistics.median(cpu[name]) * 1000:.0f}",
             "1" if name == "now" else ratio(name, "now")] for name in fns]
    body = (
        f"BERT-base (default config), batch {args.batch} x {args.seq} tokens, adapters on "
        "`targets=\"auto\"` (two sets, bottleneck 64), train mode, forward + loss + backward; "
        f"{torch.get_num_threads()} thread(s); {rounds} interleaved rounds, times are medians, "
        f"ratios medians of per-round ratios. Load average (1, 5, 15 min) before: "
        f"{' '.join(load_before)}, after: {' '.join(load_after)}.\n\n"
        + common.table(["variant", "wall (ms)", "CPU (ms)", "/ now (wall / CPU)"], rows)
        + "\n\nReading: `before / now` is what the checkpoint-replay check costs a step that "
        "neither routes nor checkpoints (1.000 is no cost; the spread of the other rows "
        "around their own medians is the noise to compare it with).\n"
    )
    print(body)
    if not args.quick:
        common.write_section("A training step: the replay check, routing, checkpointing "
                             "(benchmarks/training_step.py)", body)


if __name__ == "__main__":
    main()
