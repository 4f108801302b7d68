"""Transfer quality: how close do adapters come to full fine-tuning, adapting code to prose?

The reference GPT is pretrained on corpus A (the standard library's code, docstrings and
comments removed; the pretrained base is the one `adapterkit demo` caches) and adapted to
corpus B (those docstrings and comments) under every regime of `adapterkit.apps.workflow.REGIMES`.
Reported, per regime: validation bits per character on B, its share of full fine-tuning's
gain over no adaptation (1 - (x - full) / (zero - full)), forgetting on A, trainable %, and
step time and peak memory relative to full fine-tuning; the same at equal wall-clock time;
a sweep of bottleneck x placement; a comparison of recipes from the literature, the best of
which (within 5% trainable) the other sections use; and three regimes trained longer.

    python benchmarks/transfer.py                 # everything: 20-25 min on 2 shared cores
    python benchmarks/transfer.py --quick         # a smoke run at the demo's quick size
    python benchmarks/transfer.py --write-docs    # also replace its section of docs/benchmarks.md
    python benchmarks/transfer.py --render benchmarks/results/transfer.json  # redraw only

Step times come from interleaved timing rounds (`common.interleaved`), so that load from
elsewhere hits every regime alike; peak memory is the peak RSS of a fresh process that runs a
few training steps of one regime (`common.peak_rss_mib`), or `torch.cuda.max_memory_allocated`
on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import common  # (sets OMP_WAIT_POLICY before torch is imported)
import torch

from adapterkit.apps import workflow as wf
from adapterkit.apps.data import random_windows
from adapterkit.apps.workflow import REGIMES, Recipe, Regime, Size
from adapterkit.config import AdapterConfig
from adapterkit.training import lm_loss, trainable_parameters

RESULTS_DIR = common.ROOT / "benchmarks" / "results"
SECTION = "Transfer quality (benchmarks/transfer.py)"
BY_NAME = {r.name: r for r in REGIMES}
ADAPTED = "adapters + head"
BUDGET = 5.0  # % trainable the issue allows adapters + head
SCALED_PARALLEL = Recipe(adapter=AdapterConfig(bottleneck=8, placement="parallel", scaling=4.0,
                                               dropout=0.0), targets=("ffn_block",),
                         lr_full=1e-3, lr_adapter=3e-3)
ATTN_FFN = ("mha_block", "ffn_block")

# Candidates from the literature, each trained as "adapters + head". The best one within
# BUDGET becomes the recipe of every other section.
RECIPES: dict[str, Recipe] = {
    "Houlsby (the seed's): sequential b64, attn+ffn": replace(
        SCALED_PARALLEL, adapter=AdapterConfig(bottleneck=64, dropout=0.0), targets=ATTN_FFN),
    "Houlsby b4, attn+ffn": replace(
        SCALED_PARALLEL, adapter=AdapterConfig(bottleneck=4, dropout=0.0), targets=ATTN_FFN),
    "Pfeiffer: sequential b8, ffn": replace(
        SCALED_PARALLEL, adapter=AdapterConfig(bottleneck=8, dropout=0.0)),
    "parallel b8 s=1, ffn": SCALED_PARALLEL.with_adapter(scaling=1.0),
    "scaled parallel b8 s=4, ffn (He et al. 2022)": SCALED_PARALLEL,
    "scaled parallel b8 s=4, ffn, + LayerNorms": replace(SCALED_PARALLEL, train_norms=True),
    "scaled parallel b8 s=4, ffn, lr 1e-3": replace(SCALED_PARALLEL, lr_adapter=1e-3),
}
SWEEP_BOTTLENECKS = (8, 16, 64, 256)
MAIN_ALL_SEEDS = ("full fine-tuning", "head only", "adapters only", ADAPTED)


@dataclass(frozen=True)
class Plan:
    size: Size
    size_name: str
    steps: int
    seeds: int
    cache: Path
    long_steps: int


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo's quick size, 1 seed, "
                   "short runs: a smoke test of the script")
    p.add_argument("--seeds", type=int, help="adaptation seeds of the main regimes "
                   "(default 3; quick 1)")
    p.add_argument("--steps", type=int, help="adaptation steps (default 600; quick 100)")
    p.add_argument("--long-steps", type=int, help="steps of the longer runs of full "
                   "fine-tuning, adapters + head and head only (default 2000; quick 300)")
    p.add_argument("--cache-dir", help="where the pretrained base is cached (as the CLI)")
    p.add_argument("--write-docs", action="store_true",
                   help=f"replace the section '{SECTION}' of docs/benchmarks.md")
    p.add_argument("--render", metavar="JSON", help="redo the tables, plot and docs section "
                   "from a results file of an earlier run, without running anything")
    p.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)  # internal
    return p.parse_args()


# -- step time and memory ------------------------------------------------------------------


def step_fn(model: torch.nn.Module, batch: Any) -> Any:
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)

    def step() -> None:
        loss = lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_ratios(plan: Plan, data: wf.Data, base: dict[str, torch.Tensor],
                variants: dict[str, tuple[Regime, Recipe]]) -> dict[str, float]:
    """Each variant's step time over full fine-tuning's: medians of interleaved rounds."""
    g = torch.Generator().manual_seed(0)
    batch = next(random_windows(data.train_b, plan.size.batch, plan.size.context, g))
    variants = {"full fine-tuning": (BY_NAME["full fine-tuning"], SCALED_PARALLEL), **variants}
    steps = {}
    for name, (regime, recipe) in variants.items():
        steps[name] = step_fn(wf.build(regime, recipe, plan.size, base, 0).train(), batch)
        steps[name]()  # the first step allocates the optimizer state
    times = common.interleaved(steps, rounds=5, repeat=3)
    ratios = {name: common.median_ratio(times, name, "full fine-tuning") for name in variants}
    ratios["_full_step_seconds"] = statistics.median(times["full fine-tuning"])
    return ratios


def memory_probe(name: str, recipe_json: str, size_name: str, cache: Path) -> None:
    """Run in a fresh process: peak memory (MiB) of three training steps of one regime."""
    size = wf.SIZES[size_name]
    data = wf.load_data(size, None, None, cache)
    base, _, _ = wf.pretrained_base(size, data, 0, cache)
    g = torch.Generator().manual_seed(0)
    batch = next(random_windows(data.train_b, size.batch, size.context, g))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = wf.build(BY_NAME[name], recipe_from_json(recipe_json), size, base, 0)
    model = model.to(device).train()
    batch = tuple(t.to(device) for t in batch)
    del base, data
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = common.reset_peak_rss() * 2**20
    step = step_fn(model, batch)
    for _ in range(3):
        step()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else common.peak_rss_mib() * 2**20)
    print(json.dumps({"mib": (peak - start) / 2**20}))


def recipe_to_json(recipe: Recipe) -> str:
    return json.dumps({**asdict(recipe), "adapter": recipe.adapter.to_dict()}, sort_keys=True)


def recipe_from_json(text: str) -> Recipe:
    raw = json.loads(text)
    return Recipe(**{**raw, "adapter": AdapterConfig.from_dict(raw["adapter"]),
                     "targets": tuple(raw["targets"])})


def peak_memory(plan: Plan, name: str, recipe: Recipe) -> float:
    run = subprocess.run(
        [sys.executable, __file__, "--cache-dir", str(plan.cache), "--memory-probe", name,
         recipe_to_json(recipe), plan.size_name],
        capture_output=True, text=True, check=True, timeout=600)
    return json.loads(run.stdout.strip().splitlines()[-1])["mib"]


# -- runs ------------------------------------------------------------------------------------


class Runs:
    """Every adaptation run, memoised: a longer run answers for a shorter one's steps.

    Adapter runs hold a constant learning rate after a 50-step ramp, so the state after N
    steps of a longer run is exactly that of an N-step run with the same seed.
    """

    def __init__(self, plan: Plan, data: wf.Data, base: dict[str, torch.Tensor]) -> None:
        self.plan, self.data, self.base = plan, data, base
        self.done: dict[tuple[str, str, int], wf.Outcome] = {}

    def __call__(self, regime: str, recipe: Recipe, seed: int, steps: int,
                 eval_at: tuple[int, ...] = ()) -> wf.Outcome:
        key = (regime, recipe_to_json(recipe), seed)
        have = self.done.get(key)
        wanted = {steps, *eval_at}
        if have is None or not wanted <= {c[0] for c in have.curve}:
            t0 = time.perf_counter()
            have = wf.run_regime(BY_NAME[regime], recipe, self.plan.size, self.data, self.base,
                                 seed, steps=steps, eval_at=eval_at)
            have.model = None  # keep the numbers, not the weights
            self.done[key] = have
            print(f"  {regime} seed {seed} {steps} steps: B {have.bpc_b:.3f} "
                  f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        return have

    def at(self, regime: str, recipe: Recipe, seed: int, step: int) -> tuple[float, float, float]:
        """(bpc B, bpc A, trainable %) after ``step`` steps."""
        o = self.done[(regime, recipe_to_json(recipe), seed)]
        b, a = next((c[1], c[2]) for c in o.curve if c[0] == step)
        return b, a, 100 * o.trainable / o.total


def share(bpc: float, zero: float, full: float) -> float:
    return wf.gain_share(bpc, zero, full)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def equal_steps(plan: Plan, ratio: float) -> int:
    """Steps that take as long as full fine-tuning's ``plan.steps``."""
    return max(plan.steps, round(plan.steps / ratio))


# -- the sections ----------------------------------------------------------------------------


def recipes_section(plan: Plan, runs: Runs, log: dict[str, Any]) -> Recipe:
    ratios = step_ratios(plan, runs.data, runs.base,
                         {name: (BY_NAME[ADAPTED], r) for name, r in RECIPES.items()})
    zero = runs("no adaptation", SCALED_PARALLEL, 0, 0)
    full = runs("full fine-tuning", SCALED_PARALLEL, 0, plan.steps).bpc_b
    found = {}
    for name, recipe in RECIPES.items():
        runs(ADAPTED, recipe, 0, equal_steps(plan, ratios[name]), eval_at=(plan.steps,))
        b, a, pct = runs.at(ADAPTED, recipe, 0, plan.steps)
        b_eq = runs.done[(ADAPTED, recipe_to_json(recipe), 0)].curve[-1][1]
        found[name] = {"B": b, "A": a, "pct": pct, "share": share(b, zero.bpc_b, full),
                       "step_ratio": ratios[name], "B_equal_time": b_eq,
                       "share_equal_time": share(b_eq, zero.bpc_b, full)}
    within = {n: f for n, f in found.items() if f["pct"] <= BUDGET} or found
    best = min(within, key=lambda n: within[n]["B"])
    log["recipes"] = {"results": found, "best": best, "step_ratios": ratios,
                      "zero": [zero.bpc_b, zero.bpc_a], "full": full}
    return RECIPES[best]


def main_section(plan: Plan, runs: Runs, best: Recipe, log: dict[str, Any]) -> None:
    regimes = {r.name: (r, best) for r in REGIMES if r.train != ()}
    ratios = step_ratios(plan, runs.data, runs.base, regimes)
    memory = {name: peak_memory(plan, name, best) for name in regimes}
    print(f"  step time vs full: { {k: round(v, 3) for k, v in ratios.items()} }")
    print(f"  peak memory (MiB): { {k: round(v, 1) for k, v in memory.items()} }", flush=True)
    seeds = {name: range(plan.seeds if name in MAIN_ALL_SEEDS else 1) for name in regimes}
    for seed in range(plan.seeds):
        runs("no adaptation", best, seed, 0)
        for name in regimes:
            if seed in seeds[name]:
                runs(name, best, seed, equal_steps(plan, ratios[name]), eval_at=(plan.steps,))
    out = {}
    zero = [runs.at("no adaptation", best, s, 0) for s in range(plan.seeds)]
    full = [runs.at("full fine-tuning", best, s, plan.steps)[0] for s in range(plan.seeds)]
    full_eq = [runs.done[("full fine-tuning", recipe_to_json(best), s)].curve[-1][1]
               for s in range(plan.seeds)]
    for name in regimes:
        ss = list(seeds[name])
        at = [runs.at(name, best, s, plan.steps) for s in ss]
        eq = [runs.done[(name, recipe_to_json(best), s)].curve[-1][1] for s in ss]
        out[name] = {
            "B": [x[0] for x in at], "A": [x[1] for x in at], "pct": at[0][2],
            "share": [share(at[i][0], zero[s][0], full[s]) for i, s in enumerate(ss)],
            "forgetting": [at[i][1] - zero[s][1] for i, s in enumerate(ss)],
            "B_equal_time": eq,
            "share_equal_time": [share(eq[i], zero[s][0], full_eq[s]) for i, s in enumerate(ss)],
            "equal_steps": equal_steps(plan, ratios[name])}
    log["main"] = {"regimes": out, "step_ratios": ratios, "memory_mib": memory,
                   "zero": zero, "full": full}


def sweep_section(plan: Plan, runs: Runs, best: Recipe, log: dict[str, Any]) -> None:
    zero = runs.at("no adaptation", best, 0, 0)[0]
    full = runs("full fine-tuning", best, 0, plan.steps).bpc_b
    points = []
    for placement, scaling in (("sequential", 1.0), ("parallel", best.adapter.scaling)):
        for b in SWEEP_BOTTLENECKS:
            recipe = replace(best, targets=ATTN_FFN).with_adapter(
                bottleneck=b, placement=placement, scaling=scaling)
            runs(ADAPTED, recipe, 0, plan.steps)
            bpc, _, pct = runs.at(ADAPTED, recipe, 0, plan.steps)
            points.append({"targets": "attn+ffn", "placement": placement, "bottleneck": b,
                           "scaling": scaling, "pct": pct, "B": bpc,
                           "share": share(bpc, zero, full)})
    for name in ("full fine-tuning", "head only"):
        bpc, _, pct = runs.at(name, best, 0, plan.steps)
        points.append({"targets": name, "placement": "-", "bottleneck": 0, "pct": pct,
                       "B": bpc, "share": share(bpc, zero, full)})
    log["sweep"] = points


LONG_REGIMES = ("full fine-tuning", ADAPTED, "head only")


def long_section(plan: Plan, runs: Runs, best: Recipe, log: dict[str, Any]) -> None:
    """Seed 0 of three regimes trained ``plan.long_steps``: does the share hold up?"""
    marks = sorted({plan.steps, *(plan.long_steps * k // 4 for k in (1, 2, 3, 4))})
    curves = {}
    for name in LONG_REGIMES:
        o = runs(name, best, 0, plan.long_steps, eval_at=tuple(marks))
        curves[name] = [[c[0], c[1]] for c in o.curve if c[0] in marks]
    log["long"] = {"steps": marks, "curves": curves,
                   "zero": runs.at("no adaptation", best, 0, 0)[0]}


# -- tables, from the results log (so that --render can redo them) -----------------------


def long_table(log: dict[str, Any]) -> str:
    lg = log["long"]
    by_step = {name: dict(map(tuple, curve)) for name, curve in lg["curves"].items()}
    rows = []
    for step in lg["steps"]:
        full = by_step["full fine-tuning"][step]
        cells = [f"{by_step[n][step]:.3f} ({100 * share(by_step[n][step], lg['zero'], full):.0f}%)"
                 for n in LONG_REGIMES[1:]]
        rows.append((step, f"{full:.3f}", *cells))
    return common.table(["adaptation steps", "full fine-tuning: val bpc B",
                         *(f"{n}: val bpc B (share)" for n in LONG_REGIMES[1:])], rows)


def recipes_table(log: dict[str, Any]) -> str:
    zero_a = log["recipes"]["zero"][1]
    rows = [(name, f"{r['pct']:.2f}%", f"{r['B']:.3f}", f"{100 * r['share']:.0f}%",
             f"{r['A'] - zero_a:+.3f}", f"{r['step_ratio']:.2f}x",
             f"{100 * r['share_equal_time']:.0f}%")
            for name, r in log["recipes"]["results"].items()]
    return common.table(["recipe (adapters + head, seed 0)", "trainable", "val bpc B",
                         "share of full FT gain", "forgetting A (bpc)", "step time vs full",
                         "share at equal time"], rows)


def main_table(log: dict[str, Any]) -> str:
    m = log["main"]
    memory, ratios = m["memory_mib"], m["step_ratios"]
    rows = [("no adaptation", "0.00%", mean_sd([z[0] for z in m["zero"]]), "0%", "+0.000",
             "-", "-", "-", "-", len(m["zero"]))]
    for name, r in m["regimes"].items():
        rows.append((name, f"{r['pct']:.2f}%", mean_sd(r["B"]),
                     f"{100 * statistics.mean(r['share']):.0f}%",
                     f"{statistics.mean(r['forgetting']):+.3f}", f"{ratios[name]:.2f}x",
                     f"{memory[name] / memory['full fine-tuning']:.2f}x", r["equal_steps"],
                     f"{100 * statistics.mean(r['share_equal_time']):.0f}%", len(r["B"])))
    return common.table(["regime", "trainable", "val bpc B (mean ± sd)", "share of full FT gain",
                         "forgetting A (bpc)", "step time vs full", "peak memory vs full",
                         "steps at equal time", "share at equal time", "seeds"], rows)


def sweep_table(log: dict[str, Any]) -> str:
    rows = [(p["targets"], p["placement"] + (f", s={p['scaling']:g}" if "scaling" in p else ""),
             p["bottleneck"] or "-", f"{p['pct']:.2f}%", f"{p['B']:.3f}",
             f"{100 * p['share']:.0f}%") for p in log["sweep"]]
    return common.table(["adapters on", "placement", "bottleneck", "trainable (with head)",
                         "val bpc B", "share of full FT gain"], rows)


def plot(points: list[dict[str, Any]], recipes: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for placement, marker in (("sequential", "o"), ("parallel", "s")):
        ps = [p for p in points if p["placement"] == placement]
        ax.plot([p["pct"] for p in ps], [100 * p["share"] for p in ps], marker=marker,
                label=f"{placement} s={ps[0]['scaling']:g}, attn+ffn (labels: bottleneck)")
        for p in ps:
            ax.annotate(str(p["bottleneck"]), (p["pct"], 100 * p["share"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -8))
    for name, r in recipes.items():
        ax.scatter([r["pct"]], [100 * r["share"]], marker="^", s=30, zorder=3, label=name)
    for p in points:
        if p["placement"] == "-":
            ax.scatter([p["pct"]], [100 * p["share"]], marker="*", s=150, zorder=3,
                       label=p["targets"])
    ax.axhline(95, color="grey", ls=":", lw=1)
    ax.axvline(BUDGET, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ticks = [2, 3, 5, 10, 20, 50, 100]
    ax.set_xticks(ticks, [f"{t}%" for t in ticks])
    ax.set_xlabel("trainable parameters, % of total (log scale)")
    ax.set_ylabel("share of full fine-tuning's gain on B (%)")
    ax.set_title("adapting code -> prose: parameters vs quality (adapters + head)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse()
    cache = wf.cache_root(args.cache_dir)
    if args.memory_probe:
        name, recipe_json, size_name = args.memory_probe
        memory_probe(name, recipe_json, size_name, cache)
        return
    if args.render:
        log = json.loads(Path(args.render).read_text())
    else:
        log = run_all(args, cache)
    suffix = "-quick" if log["size_name"] == "quick" else ""
    plot(log["sweep"], log["recipes"]["results"], RESULTS_DIR / f"transfer{suffix}.png")
    for title, table in (("recipes", recipes_table(log)), ("regimes", main_table(log)),
                         ("sweep", sweep_table(log)), ("longer runs", long_table(log))):
        print(f"\n{title}\n{table}")
    print(f"\n{log['seconds'] / 60:.1f} min")
    if args.write_docs or args.render:
        # stamped with the command that produced the numbers, also when --render redraws them
        common.write_section(SECTION, report(log, suffix), command=log["command"])


def run_all(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    size_name = "quick" if args.quick else "default"
    plan = Plan(size=replace(wf.SIZES[size_name], evals=4), size_name=size_name,
                steps=args.steps or (100 if args.quick else 600),
                seeds=args.seeds or (1 if args.quick else 3), cache=cache,
                long_steps=args.long_steps or (300 if args.quick else 2000))
    t0 = time.perf_counter()
    data = wf.load_data(plan.size, None, None, cache)
    base, where, reused = wf.pretrained_base(plan.size, data, 0, cache)
    print(f"base: {where} ({'reused' if reused else 'pretrained now'})", flush=True)
    log: dict[str, Any] = {"command": common.command_line(), "size": asdict(plan.size),
                           "size_name": size_name, "steps": plan.steps, "seeds": plan.seeds}
    runs = Runs(plan, data, base)
    print("recipes", flush=True)
    best = recipes_section(plan, runs, log)
    print(f"best recipe within {BUDGET}%: {log['recipes']['best']}\nregimes", flush=True)
    main_section(plan, runs, best, log)
    print("sweep", flush=True)
    sweep_section(plan, runs, best, log)
    print("longer runs", flush=True)
    long_section(plan, runs, best, log)
    log["seconds"] = time.perf_counter() - t0
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS_DIR / f"transfer{suffix}.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def verdict(log: dict[str, Any]) -> str:
    """The issue's targets, checked against the regimes table."""
    r = log["main"]["regimes"]
    ours, head = r[ADAPTED], r["head only"]
    gain, head_gain = statistics.mean(ours["share"]), statistics.mean(head["share"])
    gain_eq = statistics.mean(ours["share_equal_time"])
    marks = [
        (f"recovers >= 95% of full fine-tuning's gain: {100 * gain:.0f}% at equal steps, "
         f"{100 * gain_eq:.0f}% at equal wall-clock time", gain >= 0.95),
        (f"at most {BUDGET:g}% of the parameters trainable: {ours['pct']:.2f}%",
         ours["pct"] <= BUDGET),
        (f"clearly beats head only ({100 * head_gain:.0f}% of the gain, "
         f"{head['pct']:.2f}% trainable): by {100 * (gain - head_gain):.0f} points",
         gain - head_gain >= 0.1),
    ]
    return "Targets for adapters + head (recommended recipe):\n\n" + "\n".join(
        f"- {'met' if ok else '**not met**'}: {text}" for text, ok in marks)


def report(log: dict[str, Any], suffix: str) -> str:
    s = log["size"]
    best = log["recipes"]["best"]
    return "\n\n".join([
        f"Reference GPT d_model={s['d_model']}, {s['layers']} layers, context {s['context']}, "
        f"batch {s['batch']}, pretrained {s['pretrain_steps']} steps on corpus A (the standard "
        f"library's code; the base `adapterkit demo` caches), then adapted {log['steps']} "
        f"steps to corpus B (its docstrings and comments). Validation: {s['eval_windows']} "
        f"windows of {s['context']} bytes from each corpus's held-out files; bits per "
        f"character. One pretrained base; seeds vary the adapter init and the batches. Share "
        f"of full fine-tuning's gain: 1 - (x - full) / (no adaptation - full), per seed. "
        f"Equal wall-clock time: each regime trains as many steps as full fine-tuning's "
        f"{log['steps']} take it (step-time ratios from interleaved timing rounds). Peak "
        f"memory: peak RSS of a fresh process over three training steps, relative to full "
        f"fine-tuning. Wall time {log['seconds'] / 60:.0f} min.",
        "### Recipes (adapters + head, seed 0)",
        recipes_table(log),
        f"Best within {BUDGET:g}% trainable: **{best}**; the sections below use it.",
        "### Regimes",
        main_table(log),
        verdict(log),
        "### Bottleneck x placement (adapters + head on attn+ffn, seed 0)",
        sweep_table(log),
        f"![parameters vs quality](../benchmarks/results/transfer{suffix}.png)",
        f"### Longer runs (seed 0, {log['long']['steps'][-1]} steps)",
        long_table(log),
        reading(log),
    ])


def reading(log: dict[str, Any]) -> str:
    """What the tables say, with the numbers taken from them."""
    adapters = [p for p in log["sweep"] if p["placement"] != "-"]
    top = max(adapters, key=lambda p: p["share"])
    widest = {p["placement"]: p for p in adapters if p["bottleneck"] == max(SWEEP_BOTTLENECKS)}
    r, rec = log["main"]["regimes"], log["recipes"]["results"]
    within = [x["share"] for x in rec.values() if x["pct"] <= BUDGET]
    best = rec[log["recipes"]["best"]]
    norms = rec.get("scaled parallel b8 s=4, ffn, + LayerNorms")
    low_lr = rec.get("scaled parallel b8 s=4, ffn, lr 1e-3")

    def pts(x: float) -> str:
        n = round(100 * x)
        return f"{n:+d} point{'' if abs(n) == 1 else 's'}"

    enough = [p for p in adapters if p["share"] >= 0.95]
    if enough:
        first = min(enough, key=lambda p: p["pct"])
        lines = [f"- **95% of full fine-tuning's gain takes {first['pct']:.0f}% of the "
                 f"parameters** ({first['placement']}, bottleneck {first['bottleneck']}); the "
                 f"byte-level head alone is {r['head only']['pct']:.1f}% of this model."]
    else:
        lines = [
            f"- **No adapter configuration recovers 95% of full fine-tuning's gain here, at "
            f"any size**: the best of the sweep reaches {100 * top['share']:.0f}% with "
            f"{top['pct']:.0f}% of the parameters trainable ({top['placement']}, bottleneck "
            f"{top['bottleneck']}). Two reasons. The budget: the byte-level head alone is "
            f"{r['head only']['pct']:.1f}% of this small model, so {BUDGET:g}% leaves about "
            f"{BUDGET - r['head only']['pct']:.0f}% for adapters. And the task: code to "
            "English prose is continued pretraining on a new domain (the model must learn "
            "English spelling and phrasing), where parameter-efficient methods are known to "
            "learn less than full fine-tuning and to forget less (Biderman et al. 2024, *LoRA "
            "Learns Less and Forgets Less*: even high ranks close most of the gap for "
            "instruction tuning but not for continued pretraining). Houlsby et al.'s result "
            "(within 0.4 points of full fine-tuning with 3.6% parameters per task) is GLUE "
            "classification from a general-purpose BERT-large, whose task heads are a "
            "negligible share."]
    if within:
        lines.append(
            f"- **Within {BUDGET:g}%, the recipes are close** "
            f"({100 * (max(within) - min(within)):.0f} points from worst to best); the best "
            f"is **{log['recipes']['best']}**."
            + (f" Training the LayerNorms too (Houlsby et al.) changes it by "
               f"{pts(norms['share'] - best['share'])} at {norms['pct']:.2f}% trainable;"
               if norms else "")
            + (f" a 3x lower learning rate by {pts(low_lr['share'] - best['share'])}."
               if low_lr else ""))
    else:
        lines.append(f"- **No recipe fits in {BUDGET:g}% at this size**; the best overall is "
                     f"**{log['recipes']['best']}**.")
    if len(widest) == 2:
        lines.append(
            f"- **Placement**: at bottleneck {max(SWEEP_BOTTLENECKS)}, sequential reaches "
            f"{100 * widest['sequential']['share']:.0f}% and parallel (s="
            f"{widest['parallel']['scaling']:g}) {100 * widest['parallel']['share']:.0f}%"
            + ("; the scaling that helps a narrow parallel branch over-shoots on a wide one."
               if widest["sequential"]["share"] - widest["parallel"]["share"] >= 0.02
               else "."))
    lg = log["long"]
    last = lg["steps"][-1]
    long_share = share(dict(map(tuple, lg["curves"][ADAPTED]))[last], lg["zero"],
                       dict(map(tuple, lg["curves"]["full fine-tuning"]))[last])
    short_share = statistics.mean(r[ADAPTED]["share"])
    lines.append(
        f"- **Longer training**: after {last} steps adapters + head hold "
        f"{100 * long_share:.0f}% of full fine-tuning's gain, against "
        f"{100 * short_share:.0f}% after {log['steps']}"
        + (": full fine-tuning keeps learning the new domain while the adapters level off."
           if long_share < short_share - 0.02 else "."))
    ours, full = r[ADAPTED], r["full fine-tuning"]
    workflow_b = statistics.mean(r["workflow B (from scratch)"]["share"])
    trap = statistics.mean(r["trap: adapters + head, random base"]["share"])
    lines += [
        f"- **Forgetting on A** (bits per character, mean): full fine-tuning "
        f"{statistics.mean(full['forgetting']):+.3f}, adapters + head "
        f"{statistics.mean(ours['forgetting']):+.3f}, adapters only "
        f"{statistics.mean(r['adapters only']['forgetting']):+.3f}, head only "
        f"{statistics.mean(r['head only']['forgetting']):+.3f}. An adapters-only model "
        "switched off is the base again, bit for bit (`adapterkit demo` prints that column).",
        f"- **Workflow B from scratch** reaches {100 * workflow_b:.0f}% of the gain, the "
        f"seed's trap (adapters + head on a random frozen backbone) {100 * trap:.0f}%; "
        "both start without the pretrained base, so both trail every pretrained regime.",
        f"- **Cost**: an adapters + head step takes {log['main']['step_ratios'][ADAPTED]:.2f}x "
        "a full fine-tuning step (frozen weights need no gradient, but the backward pass "
        "still runs through them); peak memory falls less than the trainable count, since "
        "activations, not Adam states, dominate at this size. At equal wall-clock time "
        f"adapters + head trains {ours['equal_steps']} steps and reaches "
        f"{100 * statistics.mean(ours['share_equal_time']):.0f}% of full fine-tuning's gain.",
    ]
    lines.append("- **Other levers** (where the budget goes, schedules, a longer-trained or "
                 "wider base, less text in B): the next section, from "
                 "`benchmarks/transfer_levers.py`.")
    return "### Reading\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
