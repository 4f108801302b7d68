"""What injection costs at training time, against the seed's hand-edited GPT.

Three questions, one run:
1. step time of the injected reference GPT / the seed's hand-edited GPT (same base modules,
   same adapters, same trainable set: adapters + head); target <= 1.02;
2. step time of adapter-only training / full fine-tuning;
3. peak memory (RSS of a fresh process per variant) of each.

    python benchmarks/overhead.py            # full run, writes docs/benchmarks.md
    python benchmarks/overhead.py --quick    # a smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import common  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)
import torch
import torch.nn.functional as F
from tests.test_seed import SeedGPT, seed_state_from

import adapterkit
from adapterkit.models.gpt import GPT

SIZE = dict(vocab_size=256, d_model=256, max_length=128, num_heads=4, dff=1024, dropout=0.1, N=4)


def build(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(**SIZE)
    if variant == "full":
        return model
    model = adapterkit.inject(model, ["mha_block", "ffn_block"])
    if variant == "hand":
        seed = SeedGPT(**SIZE)
        seed.load_state_dict(seed_state_from(model))
        for p in seed.parameters():  # the seed's freeze, verbatim
            p.requires_grad = False
        for name, p in seed.named_parameters():
            if "attn_adapter" in name or "ffn_adapter" in name or name.startswith("cls."):
                p.requires_grad = True
        return seed
    adapterkit.freeze(model, train=["adapters", "cls"] if variant == "injected" else ["adapters"])
    return model


def stepper(model: torch.nn.Module, batch: int, T: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, SIZE["vocab_size"], (batch, T + 1), generator=g)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def child(variant: str, batch: int, T: int, steps: int) -> None:
    """Run one variant in this fresh process and print its peak RSS in MiB."""
    torch.set_num_threads(2)
    before = common.reset_peak_rss()
    step = stepper(build(variant), batch, T)
    for _ in range(steps):
        step()
    print(json.dumps({"peak_mib": common.peak_rss_mib(), "import_mib": before}))


def peak_rss(variant: str, batch: int, T: int, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--batch", str(batch), "--T", str(T),
         "--steps", str(steps)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run, writes nothing")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.batch, args.T, args.steps)
    if args.quick:
        args.rounds, args.steps, args.T = 2, 1, 32
    torch.set_num_threads(2)

    variants = ["hand", "injected", "adapters_only", "full"]
    steps = {v: stepper(build(v), args.batch, args.T) for v in variants}
    for step in steps.values():  # warm-up: first calls allocate and fill caches
        step()
    times = common.interleaved(steps, rounds=args.rounds, repeat=args.steps)
    memory = {v: peak_rss(v, args.batch, args.T, 3) for v in variants}

    ratios = {
        "injected / hand-written (adapters + head)": common.median_ratio(times, "injected",
                                                                         "hand"),
        "adapters only / full fine-tuning": common.median_ratio(times, "adapters_only", "full"),
        "adapters + head / full fine-tuning": common.median_ratio(times, "injected", "full"),
    }
    rows = [(name, f"{r:.3f}") for name, r in ratios.items()]
    grew = {v: memory[v]["peak_mib"] - memory[v]["import_mib"] for v in variants}
    mem_rows = [(v, f"{memory[v]['peak_mib']:.0f}", f"{grew[v]:.0f}",
                 f"{grew[v] / grew['full']:.3f}") for v in variants]
    ms = {v: 1000 * sorted(t)[len(t) // 2] for v, t in times.items()}
    body = (
        f"Reference GPT {SIZE}, batch {args.batch} x {args.T}, Adam over the trainable "
        f"parameters; {args.rounds} interleaved rounds of {args.steps} steps. Median step "
        + ", ".join(f"{v} {ms[v]:.1f} ms" for v in variants) + ".\n\n"
        + common.table(["step-time ratio (median of per-round ratios)", "value"], rows)
        + "\n\nPeak RSS of a fresh process per variant (3 steps), and how far it grew past "
        "the RSS after imports (model, activations, gradients, optimizer state):\n\n"
        + common.table(["variant", "peak RSS (MiB)", "growth (MiB)", "growth / full's"],
                       mem_rows)
    )
    print(body)
    if not args.quick:
        common.write_section("Injection overhead (benchmarks/overhead.py)", body)


if __name__ == "__main__":
    main()
