"""The sweep behind `adapterkit finetune`'s default recipe: one line of results per setting.

Each setting is the sweep's starting recipe (START) with some fields changed, trained under
some regimes and seeds on one task; the accuracy (mean over seeds) and the time go to a JSON
Lines file, one line per setting, so that a sweep can be stopped and resumed (settings
already in the file are skipped) and its table printed again.

    python benchmarks/finetune_sweep.py --grid recipe            # the grid of docs/benchmarks.md
    python benchmarks/finetune_sweep.py --set lr=2e-3 bottleneck=48 --regimes adapters
    python benchmarks/finetune_sweep.py --task library --grid recipe   # another task
    python benchmarks/finetune_sweep.py --table                  # print what the file holds

Tasks: `package` (the default task), `library` and `kind` (see finetune_tasks.py), or
`files:TRAIN,VAL` for CSV/JSONL files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import common  # (sets OMP_WAIT_POLICY before torch is imported)
import finetune_tasks

from adapterkit.apps.classify import Recipe
from adapterkit.apps.finetune import default_model, load_encoder, run_all, summarise
from adapterkit.apps.textdata import Task, read_task

RESULTS = common.ROOT / "benchmarks" / "results" / "finetune_sweep.jsonl"
# The sweep's starting point, from which every row changes some fields: the first recipe tried
# (the naive one plus LayerNorms and a schedule), spelled out so that the recorded
# rows keep their meaning when the defaults move. The sweep led to START + {"probe": True,
# "bottleneck": 48, "batch_size": 16}; the run's length was then set to fit 10 minutes
# (docs/benchmarks.md, "Run length and text length").
START = Recipe(epochs=3.0, full_epochs=3.0, max_length=64, batch_size=32, bottleneck=32,
               probe=False)
SECTION = "Fine-tuning recipe sweep (benchmarks/finetune_sweep.py)"
INTRO = ("Each row: the sweep's starting recipe (3 epochs of batches of 32, max length 64, "
         "AdamW with 10% warmup and linear decay, adapters at lr 1e-3 with bottleneck 32 "
         "where `auto` puts them, LayerNorms trained, head at 3e-3, full fine-tuning at 5e-5) "
         "with the setting changed, on MiniLM-L6, seed 0; "
         "accuracy on the task's validation texts at the end of training (no checkpoint "
         "picked on validation). `s per seed` is wall time on the shared 2-core machine "
         "(loaded by other jobs, so only roughly comparable). Tasks: `package` is the default "
         "task; `library` and `kind` are in benchmarks/finetune_tasks.py.")

COMMANDS = """The rows came from these runs (`--set` rows are `--regimes adapters` unless said):

```bash
python benchmarks/finetune_sweep.py --grid recipe   # stopped after the warmup row
python benchmarks/finetune_sweep.py --task library --grid core   # stopped after lr=2e-3
python benchmarks/finetune_sweep.py --set epochs=6.0
python benchmarks/finetune_sweep.py --set targets=auto:ffn bottleneck=64
python benchmarks/finetune_sweep.py --set targets=query,value,output.dense bottleneck=20
python benchmarks/finetune_sweep.py --set probe=true --regimes adapters full
python benchmarks/finetune_sweep.py --set probe=true bottleneck=48
python benchmarks/finetune_sweep.py --set probe=true batch_size=16
python benchmarks/finetune_sweep.py --set probe=true lr=2e-3
python benchmarks/finetune_sweep.py --set probe=true adapter_dropout=0.1
python benchmarks/finetune_sweep.py --set probe=true bottleneck=48 batch_size=16
python benchmarks/finetune_sweep.py --set probe=true batch_size=16 epochs=4.0
```

The machine was shared with three other agents' jobs (load average 4 to 9 on 2 cores), and
up to five sweep runs ran at once, so the seconds are wall time under load, not costs."""

# One lever at a time around the default, then the combinations that looked best.
Setting = tuple[tuple[str, ...], dict[str, Any]]
# the levers that moved most on the default task, also run on other tasks
CORE: list[Setting] = [
    (("full",), {}),
    (("full",), {"full_lr": 1e-4}),
    (("adapters",), {}),
    (("head",), {}),
    (("adapters",), {"lr": 2e-3}),
    (("adapters",), {"bottleneck": 48}),
]
GRIDS: dict[str, list[Setting]] = {
    "recipe": [
        *CORE,
        (("adapters",), {"epochs": 6.0}),
        (("adapters", "full"), {"epochs": 2.0}),
        (("full",), {"full_lr": 2e-5}),
        (("adapters",), {"train_norms": False}),
        (("adapters",), {"head_lr": 1e-3}),
        (("adapters",), {"warmup": 0.0}),
        (("adapters",), {"lr": 3e-4}),
        (("adapters",), {"max_length": 128}),
        (("adapters",), {"bottleneck": 16}),
        (("head",), {"head_lr": 1e-2}),
    ],
    "core": CORE,
}


def load(task: str) -> Task:
    if task.startswith("files:"):
        train, val = task.removeprefix("files:").split(",")
        return read_task(train, val)
    return finetune_tasks.TASKS[task]()


def parse_value(text: str) -> Any:
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["key"]: row for row in rows}


def key_of(task: str, regimes: tuple[str, ...], changes: dict[str, Any], seeds: int) -> str:
    return json.dumps([task, list(regimes), changes, seeds], sort_keys=True)


def run_setting(task_name: str, task: Task, loaded: tuple, regimes: tuple[str, ...],
                changes: dict[str, Any], seeds: int) -> dict[str, Any]:
    fields = {k: tuple(v) if k == "targets" else v for k, v in changes.items()}
    if "epochs" in fields:  # the sweep's `epochs` is every regime's, as it was when recorded
        fields.setdefault("full_epochs", fields["epochs"])
    recipe = replace(START, evals=1, **fields)
    t0 = time.perf_counter()
    runs = run_all(task, *loaded, recipe, regimes, seeds,
                   lambda total, desc: contextlib.nullcontext(_Quiet()))
    summary = summarise(runs)
    return {"key": key_of(task_name, regimes, changes, seeds), "task": task_name,
            "changes": changes, "seeds": seeds, "steps": recipe.total_steps(len(task.train)),
            "seconds": time.perf_counter() - t0, "machine": common.machine(),
            "regimes": {r: {k: s[k] for k in ("accuracy", "accuracies", "trainable", "total",
                                              "step_seconds", "seconds")}
                        for r, s in summary.items()}}


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass


def table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        changes = ", ".join(f"{k}={v}" for k, v in row["changes"].items()) or "(start)"
        for regime, r in row["regimes"].items():
            lines.append((row["task"], regime, changes, row["seeds"], row["steps"],
                          f"{100 * r['accuracy']:.1f}",
                          " ".join(f"{100 * a:.1f}" for a in r["accuracies"]),
                          f"{100 * r['trainable'] / r['total']:.2f}%",
                          f"{r['seconds'] / row['seeds']:.0f}"))
    return common.table(["task", "regime", "setting", "seeds", "steps", "accuracy %",
                         "per seed", "trainable", "s per seed"], lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="package")
    p.add_argument("--grid", choices=sorted(GRIDS))
    p.add_argument("--set", nargs="*", default=None, metavar="FIELD=VALUE")
    p.add_argument("--regimes", nargs="+", default=["adapters", "full", "head"])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the results file and stop")
    p.add_argument("--write", action="store_true", help="with --table: also write the table "
                   "to docs/benchmarks.md")
    args = p.parse_args()
    if args.table:
        body = table(list(done(args.results).values()))
        print(body)
        if args.write:
            common.write_section(SECTION, f"{INTRO}\n\n{body}\n\n{COMMANDS}",
                                 "python benchmarks/finetune_sweep.py --table --write (the "
                                 "runs: below)")
        return
    settings = list(GRIDS[args.grid]) if args.grid else []
    if args.set is not None:
        changes = dict(item.split("=", 1) for item in args.set)
        settings.append((tuple(args.regimes), {
            k: tuple(v.split(",")) if k == "targets" else parse_value(v)
            for k, v in changes.items()}))
    task = load(args.task)
    print(task.describe(), flush=True)
    loaded = load_encoder(default_model())
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for regimes, changes in settings:
        if key_of(args.task, regimes, changes, args.seeds) in done(args.results):
            continue
        row = run_setting(args.task, task, loaded, regimes, changes, args.seeds)
        with args.results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(table([row]).splitlines()[-len(regimes):], flush=True)


if __name__ == "__main__":
    main()
