"""Transfer quality, continued: the levers tried to bring adapters closer to full fine-tuning.

`benchmarks/transfer.py` finds that adapters + head, within 5% trainable parameters, recover
about 70% of full fine-tuning's gain when the reference GPT, pretrained on the standard
library's code (corpus A), is adapted to its docstrings and comments (corpus B). This script
tries the levers the literature offers beyond that script's recipe table, one at a time, at
its settings (seed 0, 600 adaptation steps, the demo's default base unless a row says other):

- the budget: where 5% of trainable parameters go (the byte-level head alone is 3.8%);
- training: learning rates, a decaying schedule, LayerNorms, adapters on attention's query
  and value projections (which can change where attention looks);
- the base: pretrained four times longer, or twice as wide (the head is then 2.0%);
- the amount of B: 64 KB to all of it (2.6 MB), with early stopping: every regime is evaluated
  every 50 steps on half of B's validation windows, and the step that does best there is
  reported on the other half.

    python benchmarks/transfer_levers.py --write-docs   # 20 min on 2 cores with the bases cached,
                                                        # plus about 15 to pretrain the two new ones
    python benchmarks/transfer_levers.py --quick        # a smoke run at the demo's quick size
    python benchmarks/transfer_levers.py --render benchmarks/results/transfer_levers.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import common  # (sets OMP_WAIT_POLICY before torch is imported)
import torch
from transfer import recipe_to_json

import adapterkit
from adapterkit.apps import workflow as wf
from adapterkit.apps.data import random_windows
from adapterkit.apps.workflow import REGIMES, Recipe
from adapterkit.training import bits, cosine_schedule, evaluate, train

SECTION = "Transfer quality: levers tried (benchmarks/transfer_levers.py)"
RESULTS = common.ROOT / "benchmarks" / "results"
BY_NAME = {r.name: r for r in REGIMES}
BUDGET = 5.0
RECIPE = Recipe()  # the demo's: scaled parallel b8 s=4 on the FFN (transfer.py's best)
FULL, HEAD, ADAPTED, ONLY, ZERO = ("full fine-tuning", "head only", "adapters + head",
                                   "adapters only", "no adaptation")
EVERY = 50  # early-stopping evaluations in the data section
SECTIONS = ("training", "bases", "data")


@dataclass(frozen=True)
class Lever:
    """One adaptation run: a regime of workflow.REGIMES, a recipe, a schedule."""

    label: str
    regime: str
    recipe: Recipe = RECIPE
    decay: bool = False  # cosine decay to 0 after the ramp, instead of a constant rate


@dataclass(frozen=True)
class Base:
    label: str
    size: wf.Size


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo's quick size, 60 steps")
    p.add_argument("--cache-dir", help="where pretrained bases are cached (as the CLI)")
    p.add_argument("--write-docs", action="store_true",
                   help=f"replace the section '{SECTION}' of docs/benchmarks.md")
    p.add_argument("--widths", type=int, nargs="+", default=[2], metavar="F",
                   help="width factors of the wider bases (default 2: d_model 256). At 4x, "
                   "full fine-tuning at the recipe's lr 1e-3 diverged (bpc on B rose from "
                   "3.28 to 3.70), so wider bases need their own fine-tuning rates")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="run only these sections; the others come from the results file of "
                   "an earlier run, and the report names the command of each")
    p.add_argument("--render", metavar="JSON", help="redo the tables and docs section from "
                   "the results file of an earlier run, without running anything")
    return p.parse_args()


class Runner:
    """Adaptation runs, memoised, on bases pretrained (or taken from the cache) on demand."""

    def __init__(self, cache: Path, steps: int) -> None:
        self.cache, self.steps = cache, steps
        self.data: dict[tuple[int, int], wf.Data] = {}
        self.bases: dict[str, dict[str, torch.Tensor]] = {}
        self.done: dict[str, dict[str, Any]] = {}

    def base(self, base: Base) -> tuple[wf.Data, dict[str, torch.Tensor]]:
        key = (base.size.context, base.size.eval_windows)
        if key not in self.data:
            self.data[key] = wf.load_data(base.size, None, None, self.cache)
        data = self.data[key]
        if base.label not in self.bases:
            t0 = time.perf_counter()
            state, path, reused = wf.pretrained_base(base.size, data, 0, self.cache)
            print(f"base {base.label}: {path.name} ({'reused' if reused else 'pretrained'}, "
                  f"{time.perf_counter() - t0:.0f}s)", flush=True)
            self.bases[base.label] = state
        return data, self.bases[base.label]

    def __call__(self, base: Base, lever: Lever, b_bytes: int = 0) -> dict[str, Any]:
        """bpc on B (the report half when ``b_bytes``: early stopping) and A, trainable %."""
        key = json.dumps([base.label, lever.regime, recipe_to_json(lever.recipe), lever.decay,
                          b_bytes])
        if key not in self.done:
            t0 = time.perf_counter()
            self.done[key] = self._run(base, lever, b_bytes)
            print(f"  {base.label} | {lever.label}"
                  f"{f' | B {b_bytes // 1024} KB' if b_bytes else ''}: "
                  f"B {self.done[key]['bpc_b']:.3f} [{time.perf_counter() - t0:.0f}s]",
                  flush=True)
        return self.done[key]

    def _run(self, base: Base, lever: Lever, b_bytes: int) -> dict[str, Any]:
        data, state = self.base(base)
        regime = BY_NAME[lever.regime]
        model = wf.build(regime, lever.recipe, base.size, state, 0)
        s = adapterkit.summary(model)
        # early stopping: choose the step on one half of B's validation batches, report the
        # other half; without it, the whole validation set after the last step
        pick, report = (data.val_b[0::2], data.val_b[1::2]) if b_bytes else (None, data.val_b)
        best: list[float] = [float("inf"), 0.0, 0.0]  # selection bpc, reported bpc, step

        def check(step: int) -> None:
            if pick is not None:
                chosen = bits(evaluate(model, pick))
                if chosen < best[0]:
                    best[:] = [chosen, bits(evaluate(model, report)), step]

        check(0)
        if regime.train != ():
            tokens = data.train_b[:b_bytes] if b_bytes else data.train_b
            g = torch.Generator().manual_seed(3)  # the batches of transfer.py's seed 0
            schedule = cosine_schedule(self.steps, ramp=min(50, self.steps),
                                       floor=0.0 if lever.decay else 1.0)
            lr = lever.recipe.lr_full if regime.train is None else lever.recipe.lr_adapter
            train(model, random_windows(tokens, base.size.batch, base.size.context, g),
                  self.steps, lr=lr, schedule=schedule,
                  on_step=lambda step, _loss: check(step) if step % EVERY == 0 else None)
        last = bits(evaluate(model, report))
        return {"pct": 100 * s.trainable / s.total, "bpc_b": best[1] if pick else last,
                "bpc_b_last": last, "best_step": best[2] if pick else self.steps,
                "bpc_a": bits(evaluate(model, data.val_a))}


def fit_bottleneck(base: Base, regime: str, recipe: Recipe) -> int:
    """The largest bottleneck (a multiple of 4) that keeps ``regime`` within the budget."""
    best, state = 4, base.size.model(0).state_dict()  # any weights: only counts matter
    for b in range(4, 4 * base.size.d_model + 1, 4):
        model = wf.build(BY_NAME[regime], recipe.with_adapter(bottleneck=b), base.size, state, 0)
        s = adapterkit.summary(model)
        if 100 * s.trainable / s.total > BUDGET:
            break
        best = b
    return best


def share(x: float, zero: float, full: float) -> float:
    return 1 - (x - full) / (zero - full)


# -- the three sections ---------------------------------------------------------------------


def training_section(run: Runner, base: Base) -> dict[str, Any]:
    """Budget and training levers on the demo's base, each against its own reference."""
    only = fit_bottleneck(base, ONLY, RECIPE)
    both = RECIPE.with_adapter(bottleneck=only // 2)
    both = replace(both, targets=("mha_block", "ffn_block"), train_norms=True)
    qv = replace(RECIPE.with_adapter(bottleneck=only // 4 + only // 16),
                 targets=("q_proj", "v_proj", "ffn_block"))
    levers = [
        (Lever("full fine-tuning, lr 3e-4", FULL, replace(RECIPE, lr_full=3e-4)), FULL),
        (Lever(HEAD, HEAD), FULL),
        (Lever(f"{ADAPTED}: the recipe (scaled parallel b{RECIPE.adapter.bottleneck} s=4, "
               "ffn)", ADAPTED), FULL),
        (Lever(f"{ADAPTED}, lr 1e-2", ADAPTED, replace(RECIPE, lr_adapter=1e-2)), FULL),
        (Lever(f"{ADAPTED}, + LayerNorms", ADAPTED, replace(RECIPE, train_norms=True)), FULL),
        (Lever(f"{ONLY}: all of the budget to adapters, b{only} ffn", ONLY,
               RECIPE.with_adapter(bottleneck=only)), FULL),
        (Lever(f"{ONLY}: b{only // 2} attn+ffn, + LayerNorms", ONLY, both), FULL),
        (Lever(f"{ONLY}: b{qv.adapter.bottleneck} on q_proj, v_proj and ffn_block", ONLY, qv),
         FULL),
        (Lever(f"{ADAPTED}, cosine decay to 0", ADAPTED, decay=True), "decay"),
        (Lever(f"{ONLY}, b{only} ffn, cosine decay to 0", ONLY,
               RECIPE.with_adapter(bottleneck=only), decay=True), "decay"),
    ]
    zero = run(base, Lever(ZERO, ZERO))["bpc_b"]
    refs = {FULL: run(base, Lever(FULL, FULL))["bpc_b"],
            "decay": run(base, Lever("full fine-tuning, cosine decay to 0", FULL,
                                     decay=True))["bpc_b"]}
    rows = []
    for lever, ref in levers:
        r = run(base, lever)
        rows.append({"label": lever.label, "pct": r["pct"], "bpc_b": r["bpc_b"],
                     "bpc_a": r["bpc_a"], "reference": ref,
                     "share": share(r["bpc_b"], zero, refs[ref])})
    return {"zero": zero, "references": refs, "rows": rows}


def bases_section(run: Runner, bases: list[Base]) -> list[dict[str, Any]]:
    """The same regimes, each filling the budget, on bases that differ in length and width."""
    out = []
    for base in bases:
        zero = run(base, Lever(ZERO, ZERO))
        full, head = run(base, Lever(FULL, FULL)), run(base, Lever(HEAD, HEAD))
        row = {"base": base.label, "size": asdict(base.size), "zero": zero["bpc_b"],
               "zero_a": zero["bpc_a"], "full": full["bpc_b"], "head_pct": head["pct"],
               "head": share(head["bpc_b"], zero["bpc_b"], full["bpc_b"])}
        for regime in (ADAPTED, ONLY):
            b = fit_bottleneck(base, regime, RECIPE)
            r = run(base, Lever(f"{regime}, b{b} ffn", regime, RECIPE.with_adapter(bottleneck=b)))
            row[regime] = {"bottleneck": b, "pct": r["pct"],
                           "share": share(r["bpc_b"], zero["bpc_b"], full["bpc_b"])}
        out.append(row)
    return out


def data_section(run: Runner, base: Base, sizes: list[int]) -> list[dict[str, Any]]:
    """Every regime with early stopping, as the training text of B shrinks."""
    only = fit_bottleneck(base, ONLY, RECIPE)
    data, _ = run.base(base)
    out = []
    for n in sizes:
        n = min(n, len(data.train_b))
        zero = run(base, Lever(ZERO, ZERO), n)["bpc_b"]
        full = run(base, Lever(FULL, FULL), n)
        row = {"bytes": n, "epochs": run.steps * base.size.batch * base.size.context / n,
               "zero": zero, "full": full["bpc_b"], "full_step": full["best_step"],
               "full_last": full["bpc_b_last"]}
        for name, lever in ((HEAD, Lever(HEAD, HEAD)), (ADAPTED, Lever(ADAPTED, ADAPTED)),
                            (ONLY, Lever(f"{ONLY}, b{only}", ONLY,
                                         RECIPE.with_adapter(bottleneck=only)))):
            r = run(base, lever, n)
            row[name] = {"pct": r["pct"], "bpc_b": r["bpc_b"], "step": r["best_step"],
                         "share": share(r["bpc_b"], zero, full["bpc_b"])}
        out.append(row)
    return out


# -- report -----------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def rerun(log: dict[str, Any]) -> str:
    """Which sections a later command re-ran, if any."""
    later = {k: c for k, c in log.get("commands", {}).items() if c != log["command"]}
    titles = {"training": "Budget and training", "bases": "The base", "data": "The amount of B"}
    return "".join(f" Section '{titles[k]}' was re-run by `{c}`." for k, c in later.items())


def render(log: dict[str, Any]) -> str:
    t = log["training"]
    ref_text = {FULL: f"full fine-tuning, lr 1e-3 ({t['references'][FULL]:.3f})",
                "decay": f"full fine-tuning, cosine decay ({t['references']['decay']:.3f})"}
    parts = [
        f"Settings of `benchmarks/transfer.py`: {log['steps']} adaptation steps, seed 0, the "
        f"recipe scaled parallel b{RECIPE.adapter.bottleneck} s=4 on the FFN at lr 3e-3 unless "
        "a row says other. Share: 1 - (x - reference) / (no adaptation - reference). Wall "
        f"time {log['seconds'] / 60:.0f} min." + rerun(log),
        "### Budget and training (the demo's base)",
        f"No adaptation: {t['zero']:.3f} bpc on B.",
        common.table(["run", "trainable", "val bpc B", "forgetting A (bpc)", "reference",
                      "share of the reference's gain"],
                     [[r["label"], f"{r['pct']:.2f}%", f"{r['bpc_b']:.3f}",
                       f"{r['bpc_a'] - log['zero_a']:+.3f}", ref_text[r["reference"]],
                       pct(r["share"])] for r in t["rows"]]),
        "### The base: longer pretraining, twice the width",
        "Each adapter regime gets the widest FFN bottleneck (a multiple of 4) that keeps it "
        f"within {BUDGET:g}% trainable.",
        common.table(["base", "head's share of the model", "no adaptation: bpc B",
                      "full fine-tuning: bpc B", "head only: share", "adapters + head: share",
                      "adapters only: share"],
                     [[b["base"], f"{b['head_pct']:.2f}%", f"{b['zero']:.3f}",
                       f"{b['full']:.3f}", pct(b["head"]),
                       f"{pct(b[ADAPTED]['share'])} (b{b[ADAPTED]['bottleneck']}, "
                       f"{b[ADAPTED]['pct']:.2f}%)",
                       f"{pct(b[ONLY]['share'])} (b{b[ONLY]['bottleneck']}, "
                       f"{b[ONLY]['pct']:.2f}%)"] for b in log["bases"]]),
        "### The amount of B (early stopping)",
        f"Training text of B cut to its first N bytes; evaluation every {EVERY} steps on half "
        "of B's validation windows, the best step reported on the other half (so no "
        "adaptation differs slightly from the tables above).",
        common.table(["B training text", "epochs in the run", "no adaptation",
                      "full fine-tuning: best (step; last step)", "head only: share",
                      "adapters + head: share", "adapters only: share"],
                     [[f"{d['bytes'] / 1024:,.0f} KB", f"{d['epochs']:.1f}",
                       f"{d['zero']:.3f}",
                       f"{d['full']:.3f} ({d['full_step']}; {d['full_last']:.3f})",
                       pct(d[HEAD]["share"]), pct(d[ADAPTED]["share"]),
                       f"{pct(d[ONLY]['share'])} ({d[ONLY]['pct']:.2f}%)"]
                      for d in log["data"]]),
        reading(log),
    ]
    return "\n\n".join(parts)


def reading(log: dict[str, Any]) -> str:
    rows = log["training"]["rows"]
    recipe = next(r for r in rows if "the recipe" in r["label"])
    adapted = [r for r in rows if r["label"].startswith(ADAPTED) and r is not recipe]
    within = [r for r in rows if r["pct"] <= BUDGET and not r["label"].startswith((FULL, HEAD))]
    top = max(within, key=lambda r: r["share"])
    head = next(r for r in rows if r["label"] == HEAD)

    def pts(r: dict[str, Any]) -> str:
        return f"{r['label'][len(ADAPTED) + 2:]} {100 * (r['share'] - recipe['share']):+.0f}"

    lines = [
        f"- **Best lever within {BUDGET:g}%: {top['label']}**: {pct(top['share'])} of its "
        f"reference's gain, against {pct(recipe['share'])} for the recipe: with the head "
        f"trainable, the byte-level head ({head['pct']:.2f}% of this model) takes most of "
        f"the {BUDGET:g}%.",
        "- **Training choices for adapters + head**, in points against the recipe: "
        + "; ".join(pts(r) for r in adapted) + ".",
    ]
    decayed = next((r for r in adapted if r["reference"] == "decay"), None)
    if decayed and decayed["share"] < recipe["share"]:
        lines[-1] += (" A decaying schedule helps full fine-tuning more than the adapters, so "
                      "the share falls.")
    bases = log["bases"]
    first = bases[0][ADAPTED]["share"]
    if len(bases) > 1:
        lines.append("- **The base**: " + "; ".join(
            f"{b['base']} (head {b['head_pct']:.1f}%): adapters + head "
            f"{pct(b[ADAPTED]['share'])}, adapters only {pct(b[ONLY]['share'])}"
            for b in bases) + ". Against the demo's base, in points of adapters + head: "
            + "; ".join(f"{b['base']} {100 * (b[ADAPTED]['share'] - first):+.0f}"
                        for b in bases[1:]) + ".")
    data = sorted(log["data"], key=lambda d: d["bytes"])
    reached = [d for d in data if d[ADAPTED]["share"] >= 0.95]
    best_only = max(data, key=lambda d: d[ONLY]["share"])
    lines.append(
        f"- **The amount of B**: with {data[0]['bytes'] / 1024:,.0f} KB, full fine-tuning "
        f"does best at step {data[0]['full_step']} of {log['steps']} (then it overfits); with "
        f"all {data[-1]['bytes'] / 1024:,.0f} KB, at step {data[-1]['full_step']}. Adapters only "
        f"reach {pct(best_only[ONLY]['share'])} with {best_only['bytes'] / 1024:,.0f} KB, "
        f"adapters + head {pct(max(d[ADAPTED]['share'] for d in data))} at best; "
        + (f"95% or more with {max(d['bytes'] for d in reached) / 1024:,.0f} KB or less."
           if reached else "no cut of B brings adapters + head to 95%."))
    return "### Reading\n\n" + "\n".join(lines)


def main() -> None:
    args = parse()
    if args.render:
        log = json.loads(Path(args.render).read_text())
    else:
        log = run_all(args)
    text = render(log)
    print(text)
    if args.write_docs or args.render:
        common.write_section(SECTION, text, command=log["command"])


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    name = "quick" if args.quick else "default"
    size = wf.SIZES[name]
    main_base = Base(f"d={size.d_model}, {size.pretrain_steps} steps (the demo's)", size)
    longer = replace(size, pretrain_steps=4 * size.pretrain_steps)
    bases = [main_base, Base(f"d={size.d_model}, {longer.pretrain_steps} steps", longer)]
    for factor in args.widths:
        # The post-LN GPT at 4x width diverged when pretrained at the demo's 2e-3 (validation
        # bpc on A 4.5, against 1.7 at 2x): beyond 2x the rate halves per doubling.
        wider = replace(size, d_model=factor * size.d_model,
                        pretrain_steps=3 * size.pretrain_steps // 2,
                        pretrain_lr=size.pretrain_lr * min(1.0, 2 / factor))
        lr = "" if wider.pretrain_lr == size.pretrain_lr else f" at lr {wider.pretrain_lr:g}"
        bases.append(Base(f"d={wider.d_model}, {wider.pretrain_steps} steps{lr}", wider))
    run = Runner(wf.cache_root(args.cache_dir), steps=60 if args.quick else 600)
    path = RESULTS / f"transfer_levers{'-quick' if args.quick else ''}.json"
    command = common.command_line()
    log: dict[str, Any] = {"command": command, "steps": run.steps, "size_name": name,
                           "commands": {}}
    if set(args.sections) != set(SECTIONS):  # the other sections from the earlier run
        if not path.is_file():
            raise SystemExit(f"--sections needs the results of a full run in {path}")
        log = json.loads(path.read_text())
        log.setdefault("commands", {})
    log["zero_a"] = run(main_base, Lever(ZERO, ZERO))["bpc_a"]
    for section in args.sections:
        log["commands"][section] = command
        if section == "training":
            log["training"] = training_section(run, main_base)
        elif section == "bases":
            log["bases"] = bases_section(run, bases)
        else:
            log["data"] = data_section(run, main_base, [64 * 1024, 256 * 1024, 1024 * 1024,
                                                        1 << 40])
    log.setdefault("seconds", 0.0)
    log["seconds"] += time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log, indent=1) + "\n")
    return log


if __name__ == "__main__":
    main()
