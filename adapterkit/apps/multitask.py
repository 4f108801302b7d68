"""Many tasks on one base: ``adapterkit finetune --task NAME TRAIN VAL ...``.

Each task is an adapter set of its own name on one encoder: its adapters, and its own copies
of the LayerNorms and its own head (``adapterkit.own``; the head a new ``Linear`` with the
task's number of labels). Training batches mix the tasks: the encoder runs inside
``adapterkit.routed`` (each text through its task's adapters and LayerNorms), and each task's
head is applied to its own rows of the pooled features. The heads are applied per group
rather than through ``routed()``, which refuses owned modules whose outputs differ in shape
in one batch (heads with different label counts): per group is exact (each text gets its
task's head on its own features, nothing padded) and costs nothing more. The loss is the
mean over the batch of each text's cross-entropy over its own task's labels.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import adapterkit

from ..slot import Owned
from .classify import (
    Classifier,
    Encoded,
    OnStep,
    Recipe,
    Run,
    _fit,
    _optimizer,
    accuracy,
    add_task_set,
    eval_steps,
    pooled_features,
    predict,
    schedule,
    train_order,
)
from .textdata import Task


@dataclass(frozen=True)
class TaskData:
    """One task of a multi-task run: its name (the set's), its texts, tokenized."""

    name: str
    task: Task
    train: Encoded
    val: Encoded


def build_tasks(fresh_encoder: Callable[[], nn.Module], tasks: Sequence[TaskData],
                recipe: Recipe, seed: int) -> Classifier:
    """One encoder with a set per task (adapters, own LayerNorms, own head); the sets'
    modules train, nothing else; no set is left active."""
    torch.manual_seed(seed)
    model = Classifier(fresh_encoder(), 2)  # the base's head: every task owns its own
    width = model.head.in_features
    for t in tasks:
        add_task_set(model, t.name, recipe, head=nn.Linear(width, len(t.task.labels)))
    adapterkit.set_active(model, [])
    with warnings.catch_warnings():  # they train through routed(), not by being active
        warnings.filterwarnings("ignore", message=".*not active", category=UserWarning)
        adapterkit.freeze(model, train=[f"adapters:{t.name}" for t in tasks])
    return model


def head_of(model: Classifier, name: str) -> nn.Module:
    """Set ``name``'s own head."""
    owned = adapterkit.adapters(model, name)["head"]
    assert isinstance(owned, Owned)
    return owned.module


class _HeadView(nn.Module):
    """What ``classify._fit`` needs for a probe on features: one task's head and the dropout."""

    def __init__(self, head: nn.Module, dropout: nn.Module) -> None:
        super().__init__()
        self.head, self.dropout = head, dropout


def counts(model: Classifier, name: str, names: Sequence[str]) -> tuple[int, int]:
    """(trainable, total) of task ``name`` as it runs: the base, less the modules the set
    owns, plus the set's adapters and own modules (those of the other sets left out)."""
    in_sets = {id(p) for n in names for m in adapterkit.adapters(model, n).values()
               for p in m.parameters()}
    mine = adapterkit.adapters(model, name)
    shadowed = {id(p) for k, m in mine.items() if isinstance(m, Owned)
                for p in model.get_submodule(k).parameters() if id(p) not in in_sets}
    trainable = sum(p.numel() for m in mine.values() for p in m.parameters())
    base = sum(p.numel() for p in model.parameters()
               if id(p) not in in_sets and id(p) not in shadowed)
    return trainable, base + trainable


def task_features(model: Classifier, tasks: Sequence[TaskData]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The frozen base encoder's pooled features of each task's (train, val) texts."""
    adapterkit.set_active(model, [])
    return {t.name: (pooled_features(model, t.train), pooled_features(model, t.val))
            for t in tasks}


def task_accuracy(model: Classifier, t: TaskData) -> float:
    """Validation accuracy of task ``t``, its set alone active."""
    adapterkit.set_active(model, [t.name])
    try:
        return accuracy(predict(model, t.val), t.val.labels)
    finally:
        adapterkit.set_active(model, [])


def train_tasks(model: Classifier, tasks: Sequence[TaskData], recipe: Recipe, seed: int,
                features: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                on_step: OnStep | None = None,
                on_eval: Callable[[str, int, float | None, float], None] | None = None
                ) -> dict[str, Run]:
    """Train every task's set on batches that mix the tasks; a ``Run`` per task.

    With ``recipe.probe`` each task's head is first fitted on the frozen encoder's features
    of its own texts (``features``), as a single-task run fits it. The run's length is
    ``recipe``'s, counted over all the tasks' texts together.
    """
    names = [t.name for t in tasks]
    of_row = [i for i, t in enumerate(tasks) for _ in t.train.ids]
    every = Encoded([ids for t in tasks for ids in t.train.ids],
                    torch.cat([t.train.labels for t in tasks]), tasks[0].train.pad_id)
    steps = recipe.total_steps(len(every.ids))
    order = train_order([len(i) for i in every.ids], recipe.batch_size, steps,
                        torch.Generator().manual_seed(seed))
    heads = {t.name: head_of(model, t.name) for t in tasks}
    start = time.perf_counter()
    curves: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    if recipe.probe:
        assert features is not None, "recipe.probe needs the frozen encoder's features"
        for t in tasks:
            probe = recipe.total_steps(len(t.train.ids), "head")
            rows = train_order([len(i) for i in t.train.ids], recipe.batch_size, probe,
                               torch.Generator().manual_seed(seed))
            view = _HeadView(heads[t.name], model.dropout)
            _fit(view, heads[t.name].parameters(), rows, recipe, t.train,  # type: ignore
                 features[t.name][0], "head")
            model.eval()
            with torch.no_grad():
                point = accuracy(heads[t.name](features[t.name][1]).argmax(-1), t.val.labels)
            curves[t.name].append((0, point))
            if on_eval is not None:
                on_eval(t.name, 0, None, point)
    torch.manual_seed(seed)  # dropout masks
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(model, params, "adapters", recipe)
    base_lr = [g["lr"] for g in optimizer.param_groups]
    checkpoints = eval_steps(steps, recipe.evals)
    losses: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    window = {n: [0.0, 0] for n in names}
    times = []
    model.train()
    for step, rows in enumerate(order, start=1):
        t0 = time.perf_counter()
        for group, lr in zip(optimizer.param_groups, base_lr, strict=True):
            group["lr"] = lr * schedule(step - 1, steps, recipe.warmup)
        ids, mask = every.batch(rows)
        labels = every.labels[rows]
        row_tasks = [of_row[r] for r in rows]
        optimizer.zero_grad(set_to_none=True)
        with adapterkit.routed(model, [names[i] for i in row_tasks]):
            pooled = model.dropout(model.pooled(ids, mask))
            loss = pooled.new_zeros(())
            for i in sorted(set(row_tasks)):
                where = torch.tensor([k for k, j in enumerate(row_tasks) if j == i])
                each = F.cross_entropy(heads[names[i]](pooled[where]), labels[where],
                                       reduction="sum")
                loss = loss + each
                window[names[i]][0] += each.item()
                window[names[i]][1] += len(where)
            (loss / len(rows)).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        if step in checkpoints:
            for t in tasks:
                total, n = window[t.name]
                # None: no text of the task in the steps since the previous point
                losses[t.name].append((step, total / n if n else None))  # type: ignore
                window[t.name] = [0.0, 0]
                curves[t.name].append((step, task_accuracy(model, t)))
                if on_eval is not None:
                    on_eval(t.name, step, losses[t.name][-1][1], curves[t.name][-1][1])
            model.train()
        if on_step is not None:
            on_step()
    seconds = time.perf_counter() - start
    median = sorted(times)[len(times) // 2]
    runs = {}
    for t in tasks:
        trainable, total = counts(model, t.name, names)
        runs[t.name] = Run("adapters", seed, curves[t.name][-1][1], curves[t.name],
                           losses[t.name], trainable, total, steps, seconds, median, model)
    return runs
