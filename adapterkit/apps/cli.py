"""The ``adapterkit`` command line: fine-tuning, the seed's workflows, and dry runs of a plan.

    adapterkit finetune [--model PATH] [--train FILE --val FILE] [--regimes R ...] (finetune.py)
    adapterkit demo [--quick] [--out DIR] [--data-a PATH] [--data-b PATH] [--seed N]
    adapterkit plan [--model gpt | module:callable] [--targets T ...]

``demo`` pretrains the reference GPT on corpus A (cached), adapts it to corpus B under each
regime of ``REGIMES`` from the same pretrained weights, prints the parameter counts and the
validation bits per character of every regime, saves and reloads the best adapters, and
plots the validation curves. See ``docs/cli.md``.

Bad input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

import adapterkit

from ..config import AdapterConfig
from ..report import format_table, percent
from ..training import bits, evaluate
from .data import DataError
from .finetune import add_parser as add_finetune_parser
from .progress import finetune_progress, progress_tools
from .workflow import (
    CACHE_ENV,
    NORMS,
    REGIMES,
    SIZES,
    Data,
    Outcome,
    Recipe,
    Size,
    cache_root,
    gain_share,
    load_data,
    pretrained_base,
    run_regime,
)

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit status 2."""


# -- the demo command ------------------------------------------------------------------------


def check_targets(size: Size, recipe: Recipe) -> None:
    """Fail fast on a target that selects nothing, before any training."""
    model = size.model(0)
    adapterkit.inject(model, list(recipe.targets), recipe.adapter)


def results_table(outcomes: Sequence[Outcome], a_off: dict[str, float]) -> str:
    """The demo's table; ``a_off``: bpc on A with the adapters switched off, per regime."""
    by = {o.regime: o for o in outcomes}
    zero, full = by.get("no adaptation"), by.get("full fine-tuning")
    rows = []
    for o in outcomes:
        share = gain_share(o.bpc_b, zero.bpc_b, full.bpc_b) if zero and full else math.nan
        forgot = o.bpc_a - zero.bpc_a if zero else math.nan
        rows.append((o.regime, f"{o.trainable:,}", f"{o.total:,}", percent(o.trainable, o.total),
                     f"{o.bpc_b:.3f}", f"{100 * share:.0f}%" if share == share else "-",
                     f"{o.bpc_a:.3f}", f"{forgot:+.3f}",
                     f"{a_off[o.regime]:.3f}" if o.regime in a_off else "-",
                     f"{o.seconds:.0f}s"))
    return format_table(["regime", "trainable", "total", "trainable %", "val bpc B",
                         "share of full FT gain", "val bpc A", "forgetting A",
                         "A, adapters off", "time"], rows)


def save_and_reload(outcomes: Sequence[Outcome], recipe: Recipe, size: Size,
                    base: dict[str, torch.Tensor], data: Data, out: Path) -> dict[str, Any]:
    """Save the best adapter regime on the pretrained base, reload into a fresh model, compare."""
    pretrained = {r.name for r in REGIMES if r.adapters and r.base == "pretrained"}
    best = min((o for o in outcomes if o.regime in pretrained), key=lambda o: o.bpc_b)
    regime = next(r for r in REGIMES if r.name == best.regime)
    include = [t for t in (regime.train or ()) if t != "adapters"]
    if recipe.train_norms:
        include += list(NORMS)
    path = adapterkit.save_adapters(best.model, out / "adapters", include=include)
    fresh = size.model(0)
    fresh.load_state_dict(base)
    adapterkit.load_adapters(fresh, path)
    reloaded = bits(evaluate(fresh, data.val_b))
    trained = bits(evaluate(best.model, data.val_b))
    return {"regime": best.regime, "path": str(path), "include": include,
            "bpc_b_trained": trained, "bpc_b_reloaded": reloaded,
            "matches": abs(reloaded - trained) <= 1e-6}


def plot_curves(outcomes: Sequence[Outcome], path: Path, title: str) -> bool:
    """Validation curves (B and A) of every regime as a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    zero = next((o for o in outcomes if o.regime == "no adaptation"), outcomes[0])
    last = max(c[0] for o in outcomes for c in o.curve)
    pretrained = {r.name for r in REGIMES if r.base == "pretrained"}
    for o in outcomes:
        curve = o.curve if len(o.curve) > 1 else [o.curve[0], (last, *o.curve[0][1:])]
        style = ":" if o.regime == "no adaptation" else "-"
        # A random base never saw A: its A curve says nothing about forgetting
        for ax, i in zip(axes, (1, 2) if o.regime in pretrained else (1,), strict=False):
            ax.plot([c[0] for c in curve], [c[i] for c in curve], style, marker=".",
                    label=o.regime)
    for ax, i, name in zip(axes, (1, 2), ("B (adaptation target)",
                                          "A (forgetting; regimes on the pretrained base)"),
                           strict=True):
        shown = [o for o in outcomes if i == 1 or o.regime in pretrained]
        low = min(c[i] for o in shown for c in o.curve)
        high = max([zero.curve[0][i] + 0.3] + [o.curve[-1][i] + 0.1 for o in shown])
        ax.set_ylim(low - 0.1, high)
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("validation bits per character")
        ax.set_title(f"corpus {name}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def demo(args: argparse.Namespace) -> int:
    size = SIZES["quick" if args.quick else args.size]
    size = replace(size, **{k: v for k, v in (("pretrain_steps", args.pretrain_steps),
                                               ("adapt_steps", args.steps)) if v is not None})
    recipe = Recipe()
    if args.targets:
        recipe = replace(recipe, targets=tuple(args.targets))
    if changes := _adapter_changes(args):
        recipe = replace(recipe, adapter=_config(changes, recipe.adapter))
    try:
        check_targets(size, recipe)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--targets: {err}") from None
    out, cache = Path(args.out), cache_root(args.cache_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory (it is created if missing)")
    bar, progress = progress_tools(args.progress)
    t0 = time.perf_counter()
    data = load_data(size, args.data_a, args.data_b, cache, progress)
    print(f"corpus A: {len(data.a.train):,} + {len(data.a.val):,} bytes (train + validation), "
          f"{data.a.source}")
    print(f"corpus B: {len(data.b.train):,} + {len(data.b.val):,} bytes (train + validation), "
          f"{data.b.source}")
    print(f"model: reference GPT, d_model={size.d_model}, layers={size.layers}, "
          f"context={size.context}, batch={size.batch}; adapters: "
          f"{', '.join(recipe.targets)}, {_describe(recipe.adapter)}")
    base, where, reused = pretrained_base(size, data, args.seed, cache, bar)
    if reused:
        print(f"pretrained base: reused from cache {where}")
    else:
        print(f"pretrained base: {size.pretrain_steps} steps on A, cached at {where}")
    outcomes, a_off = [], {}
    for regime in REGIMES:
        outcome = run_regime(regime, recipe, size, data, base, args.seed, bar)
        print(f"\n{regime.name}:")
        print("\n".join(str(adapterkit.summary(outcome.model)).splitlines()[-2:]))
        outcomes.append(outcome)
        if regime.adapters and regime.base == "pretrained":
            with adapterkit.disabled(outcome.model):  # what the base still knows
                a_off[regime.name] = bits(evaluate(outcome.model, data.val_a))
    print(f"\nvalidation bits per character after {size.adapt_steps} adaptation steps "
          "(lower is better; forgetting: change on A from the base):")
    print(results_table(outcomes, a_off))
    reload = save_and_reload(outcomes, recipe, size, base, data, out)
    verdict = "matches" if reload["matches"] else "DOES NOT MATCH"
    print(f"\nsaved the adapters of '{reload['regime']}' to {reload['path']}; reloaded into a "
          f"fresh base: val bpc B {reload['bpc_b_reloaded']:.4f} vs "
          f"{reload['bpc_b_trained']:.4f} trained ({verdict})")
    plotted = plot_curves(outcomes, out / "curves.png",
                          f"adapting a GPT pretrained on A to B (seed {args.seed})")
    print(f"validation curves: {out / 'curves.png'}" if plotted else
          "validation curves: not plotted (matplotlib is not installed; pip install "
          "'adapterkit[cli]')")
    results = {"command": " ".join(["adapterkit", *args.argv]), "size": asdict(size),
               "seed": args.seed, "recipe": {**asdict(recipe), "adapter": recipe.adapter.to_dict()},
               "base": {"path": str(where), "reused": reused},
               "regimes": [o.as_dict() for o in outcomes], "bpc_a_adapters_off": a_off,
               "reload": reload,
               "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out / 'results.json'} ({results['seconds']:.0f} s in all)")
    return 0 if reload["matches"] else 1


def _config(changes: dict[str, Any], base: AdapterConfig | None = None) -> AdapterConfig:
    try:
        return replace(base, **changes) if base is not None else AdapterConfig(**changes)
    except ValueError as err:  # e.g. --scaling nan
        raise UsageError(str(err)) from None


def _adapter_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The AdapterConfig fields the flags set; a sequential adapter is unscaled unless told."""
    changes = {k: v for k in ("bottleneck", "placement", "scaling")
               if (v := getattr(args, k)) is not None}
    if args.placement == "sequential" and args.scaling is None:
        changes["scaling"] = 1.0
    return changes


def _describe(config: AdapterConfig) -> str:
    width = (f"d/{config.reduction_factor:g}" if config.reduction_factor is not None
             else config.bottleneck_for(0))
    return f"bottleneck {width}, {config.placement}, scaling {config.scaling:g}"


# -- the plan command ------------------------------------------------------------------------


def load_factory(spec: str) -> nn.Module:
    """The model a ``module:callable`` factory returns, called without arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model {spec!r}: give 'gpt' or a factory as 'module:callable', "
                         "e.g. 'mypackage.models:build'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would, so local modules import
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r} ({err})") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UsageError(f"--model {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {attr!r} is not callable")
    try:
        model = factory()
    except Exception as err:  # the user's code: report it in one line
        raise UsageError(f"--model {spec!r}: the factory raised {type(err).__name__}: {err}"
                         ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r}: the factory returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def plan_command(args: argparse.Namespace) -> int:
    model = SIZES[args.size].model(0) if args.model == "gpt" else load_factory(args.model)
    changes = _adapter_changes(args)
    config = _config(changes) if changes else None
    targets: Any = args.targets[0] if len(args.targets) == 1 else list(args.targets)
    try:
        print(adapterkit.plan(model, targets, config))
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    return 0


# -- parsing and main ------------------------------------------------------------------------


PROG = "adapterkit"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # main prints "adapterkit: error: " once; a command's errors name the command
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        raise UsageError(f"{where}{message} (see {self.prog} --help)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Bottleneck adapters for any PyTorch "
                     "model: fine-tuning a pretrained encoder (finetune), the seed's workflows "
                     "end to end (demo) and dry runs (plan).")
    parser.add_argument("--version", action="version", version=adapterkit.__version__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="pretrain the reference GPT on A, adapt it to B under "
                       "several regimes, compare, save and reload",
                       description="Pretrain the reference GPT on corpus A (cached), adapt it "
                       "to corpus B under each regime from the same weights, print trainable "
                       "parameters and validation bits per character, save and reload the "
                       "best adapters, plot the curves. Default data: the running Python's "
                       "standard library (A: code, B: its docstrings and comments).")
    d.add_argument("--quick", action="store_true", help="a small model and few steps: "
                   "under 90 s on 2 CPU cores")
    d.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="model and step counts (default: %(default)s; --quick means quick)")
    d.add_argument("--out", default="out", help="directory for results.json, curves.png and "
                   "adapters/ (default: %(default)s)")
    d.add_argument("--data-a", metavar="PATH", help="plain text file for corpus A "
                   "(pretraining); default: the standard library's code")
    d.add_argument("--data-b", metavar="PATH", help="plain text file for corpus B "
                   "(adaptation); default: the standard library's docstrings and comments")
    d.add_argument("--seed", type=int, default=0, help="seed of the base, adapters and "
                   "batches (default: %(default)s)")
    d.add_argument("--steps", type=_positive, help="adaptation steps per regime "
                   "(default: the size's)")
    d.add_argument("--pretrain-steps", type=_positive, help="pretraining steps "
                   "(default: the size's)")
    _adapter_flags(d, "default: the benchmark's recipe, ffn_block with scaled parallel "
                   "adapters, bottleneck 8, scaling 4")
    d.add_argument("--cache-dir", metavar="DIR", help=f"where pretrained bases and extracted "
                   f"corpora are cached (default: ${CACHE_ENV}, else "
                   "$XDG_CACHE_HOME/adapterkit, else ~/.cache/adapterkit)")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    d.set_defaults(run=demo)
    add_finetune_parser(sub, _positive, finetune_progress)
    p = sub.add_parser("plan", help="dry run: what adapterkit.inject would do to a model",
                       description="Print adapterkit.plan(model, targets) for the reference "
                       "GPT or for the model a 'module:callable' factory returns.")
    p.add_argument("--model", default="gpt", help="'gpt' (the reference GPT) or an importable "
                   "factory 'module:callable' called without arguments (default: %(default)s)")
    p.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="size of the reference GPT (default: %(default)s)")
    _adapter_flags(p, "default: mha_block ffn_block, with AdapterConfig's defaults")
    p.set_defaults(run=plan_command)
    return parser


def _adapter_flags(parser: argparse.ArgumentParser, defaults: str) -> None:
    parser.add_argument("--targets", nargs="+", metavar="T", default=None,
                        help=f"modules to adapt, in the selection grammar ({defaults})")
    parser.add_argument("--bottleneck", type=_positive, help="adapter bottleneck width")
    parser.add_argument("--placement", choices=["sequential", "parallel"],
                        help="adapter placement")
    parser.add_argument("--scaling", type=float, help="multiplier of the adapter branch "
                        "(default with --placement sequential: 1)")


def _fail(message: str) -> int:
    print(f"adapterkit: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input)."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv
        if args.command == "plan" and not args.targets:
            args.targets = ["mha_block", "ffn_block"]  # the seed's two adapters per block
        return args.run(args)
    except UsageError as err:
        return _fail(str(err))
    except DataError as err:
        return _fail(str(err))
    except OSError as err:  # a directory that cannot be written, a full disk: not a bug here
        print(f"adapterkit: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("adapterkit: interrupted", file=sys.stderr)
        return 130
