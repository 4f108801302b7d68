"""Serving many ``finetune`` tasks on one base: ``MultiTask``.

    serving = MultiTask.load(None, {"topic": "out/topic", "sentiment": "out/sentiment"})
    serving.classify([("topic", "a text"), ("sentiment", "another")])  # ['money', 'positive']

Every task's set (its adapters, and its own LayerNorms and head) is loaded onto one copy of
the encoder. ``classify`` sorts the requests by length into batches; each batch runs the
encoder once inside ``adapterkit.routed`` (each text through its task's set), and each task's
head is applied to its own rows of the pooled features (heads with different label counts
cannot share one output, so they are applied per group, as ``finetune --task`` trains them).
Each text gets the label that its task, loaded alone into the base, predicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import adapterkit

from .classify import EVAL_BATCH, Classifier, Encoded, Recipe, load_encoder
from .multitask import head_of

PathLike = str | os.PathLike[str]


class MultiTask:
    """Several tasks saved by ``adapterkit finetune`` (``OUT/adapters`` or ``OUT/NAME``),
    served on one base. Build it with ``MultiTask.load``."""

    def __init__(self, model: Classifier, tokenizer: Any, labels: Mapping[str, Sequence[str]],
                 max_length: int) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = {name: list(ls) for name, ls in labels.items()}
        self.max_length = max_length

    @classmethod
    def load(cls, base: PathLike | None, tasks: Mapping[str, PathLike],
             max_length: int = Recipe().max_length) -> MultiTask:
        """The encoder of ``base`` (a ``save_pretrained`` directory; None: ``finetune``'s
        default, MiniLM-L6), with the set saved at ``tasks[name]`` loaded as set ``name``.

        ``max_length``: tokens per text, as the tasks were trained (``finetune``'s default).
        Refused, before anything loads: a folder without ``labels.json``, and one written
        before sets owned their heads (its head saved with ``include=``, as the base's own:
        tasks cannot share that one; load it alone with ``load_adapters``).
        """
        if not tasks:
            raise ValueError("give at least one task: {name: folder written by finetune}")
        labels = {}
        for name, folder in tasks.items():
            where = Path(folder)
            if not (where / "labels.json").is_file():
                raise ValueError(f"task '{name}': {where} has no labels.json; give a folder "
                                 "that adapterkit finetune wrote (OUT/adapters or OUT/NAME)")
            meta = json.loads((where / "adapter_config.json").read_text())
            if "head" not in meta.get("owned", {}):
                raise ValueError(
                    f"task '{name}': {where} was written before sets owned their heads (its "
                    "head is saved with include=, as the base's own, which tasks cannot "
                    "share); load it alone (Classifier + adapterkit.load_adapters), or train "
                    "it again with this version of adapterkit finetune")
            labels[name] = json.loads((where / "labels.json").read_text())
        if base is None:
            from .finetune import default_model

            base = default_model()
        fresh, tokenizer = load_encoder(base)
        model = Classifier(fresh(), 2)
        for name, folder in tasks.items():
            adapterkit.load_adapters(model, folder, name=name)
            adapterkit.set_active(model, [])  # one set at a time owns the head
        return cls(model, tokenizer, labels, max_length)

    @torch.no_grad()
    def classify(self, requests: Sequence[tuple[str, str]],
                 batch_size: int = EVAL_BATCH) -> list[str]:
        """The label of each ``(task, text)``, in order; the tasks mix in each batch."""
        unknown = sorted({task for task, _ in requests} - set(self.labels))
        if unknown:
            raise ValueError(f"unknown task '{unknown[0]}'; the tasks loaded are "
                             f"{sorted(self.labels)}")
        if not requests:
            return []
        ids = self.tokenizer([text for _, text in requests], truncation=True,
                             max_length=self.max_length)["input_ids"]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        data = Encoded(ids, torch.zeros(len(ids), dtype=torch.long), pad)
        rows = sorted(range(len(ids)), key=lambda r: len(ids[r]))
        out: list[str] = [""] * len(requests)
        self.model.eval()
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            names = [requests[r][0] for r in batch]
            with adapterkit.routed(self.model, names):
                pooled = self.model.pooled(*data.batch(batch))
            for name in sorted(set(names)):
                where = [i for i, n in enumerate(names) if n == name]
                preds = head_of(self.model, name)(pooled[where]).argmax(-1).tolist()
                for i, p in zip(where, preds, strict=True):
                    out[batch[i]] = self.labels[name][p]
        return out
