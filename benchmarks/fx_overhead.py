"""What FX mode costs at training time, against name mode, on the reference GPT.

One training step (forward, cross-entropy, backward, Adam over adapters + head) of the same
GPT with the same adapters, placed three ways: name mode on ``["mha_block", "ffn_block"]``, FX
mode with ``"residual"`` (the same two places per block, found from the graph), and FX mode on
the same two modules. The variants run interleaved in one process; each ratio is the median of
per-round ratios, which a burst of load from elsewhere shifts far less than a mean. Each step
is timed twice: wall clock, and this process's CPU time, which counts the work done rather
than the wait for a core that other processes hold. Target: FX / name <= 1.02.

    python benchmarks/fx_overhead.py             # full run: prints the table
    python benchmarks/fx_overhead.py --write     # ... and writes it into docs/benchmarks.md
    python benchmarks/fx_overhead.py --quick     # a smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads must not spin

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import adapterkit  # noqa: E402
from adapterkit.models.gpt import GPT  # noqa: E402

SIZE = dict(vocab_size=256, d_model=256, max_length=128, num_heads=4, dff=1024, dropout=0.1, N=4)
VARIANTS = {
    "name": (["mha_block", "ffn_block"], "modules"),
    "fx residual": ("residual", "fx"),
    "fx modules": (["mha_block", "ffn_block"], "fx"),
}


def build(variant: str, x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(**SIZE).train()
    targets, method = VARIANTS[variant]
    torch.manual_seed(1)  # the same adapter weights in every variant
    config = adapterkit.AdapterConfig(init="normal")
    if method == "fx":
        with warnings.catch_warnings():
            # GPT's attention reads self.training: the graph is fixed to train mode, as wanted
            warnings.filterwarnings("ignore", message=".*differs between train and eval")
            model = adapterkit.inject(model, targets, config, method="fx", example_inputs=(x,))
    else:
        model = adapterkit.inject(model, targets, config)
    adapterkit.freeze(model, train=["adapters", "cls"])
    return model


def stepper(model: torch.nn.Module, tokens: torch.Tensor):
    opt = torch.optim.Adam(adapterkit.trainable_parameters(model), lr=1e-4)

    def step() -> None:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def interleaved(steps: dict[str, Callable[[], None]], rounds: int,
                repeat: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per step, wall and CPU, of each variant per round; the order alternates."""
    times = {clock: {v: [] for v in steps} for clock in ("wall", "cpu")}
    names = list(steps)
    for r in range(rounds):
        for v in names if r % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeat):
                steps[v]()
            times["wall"][v].append((time.perf_counter() - wall) / repeat)
            times["cpu"][v].append((time.process_time() - cpu) / repeat)
    return times


def ratio_cells(times: dict[str, list[float]], v: str) -> list[str]:
    """Median step (ms), median of per-round ratios to name mode, and their quartiles."""
    per_round = [a / b for a, b in zip(times[v], times["name"], strict=True)]
    q1, _, q3 = statistics.quantiles(per_round, n=4, method="inclusive")
    return [f"{1000 * statistics.median(times[v]):.1f}", f"{statistics.median(per_round):.3f}",
            f"{q1:.3f} - {q3:.3f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run")
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.T = 3, 1, 32
    torch.set_num_threads(2)

    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, SIZE["vocab_size"], (args.batch, args.T + 1), generator=g)
    models = {v: build(v, tokens[:, :-1]) for v in VARIANTS}
    counts = {len(adapterkit.adapters(m)) for m in models.values()}
    assert counts == {2 * SIZE["N"]}, counts  # the same places in every variant
    steps = {v: stepper(m, tokens) for v, m in models.items()}
    for step in steps.values():  # warm-up: first calls allocate and fill caches
        step()
    times = interleaved(steps, rounds=args.rounds, repeat=args.steps)

    rows = [(v, *ratio_cells(times["cpu"], v), *ratio_cells(times["wall"], v)) for v in VARIANTS]
    header = ["variant", "CPU ms / step", "CPU time / name mode", "quartiles",
              "wall ms / step", "wall time / name mode", "quartiles"]
    body = (
        f"Reference GPT {SIZE}, train mode, batch {args.batch} x {args.T}, Adam over adapters + "
        f"head, {torch.get_num_threads()} threads; {args.rounds} interleaved rounds of "
        f"{args.steps} steps.\n\n"
        + common.table(header, rows)
        + "\n\nRatios are medians of per-round ratios; the quartiles of those ratios show the "
        "noise. Other processes share the cores: CPU time is the fairer clock then, wall time "
        "the one a user waits for."
    )
    print(f"Command: {common.command_line()}\nMachine: {common.machine()}\n\n{body}")
    if args.write and not args.quick:
        common.write_section("FX mode overhead (benchmarks/fx_overhead.py)", body)


if __name__ == "__main__":
    main()
