"""What ``adapterkit finetune`` trains: a pretrained encoder, mean pooling and a linear head.

Three regimes, each from the same pretrained weights, with the same batches for a given seed:

- ``adapters``: adapters in the encoder (``targets``, default ``"auto"``), the LayerNorms and the
  head train; every other weight is frozen (Houlsby et al. 2019). The LayerNorms and the head
  that train are the set's own copies (``adapterkit.own``), so the set's file carries them and
  the base's modules never change: a saved task cannot be loaded without its head;
- ``full``: every parameter trains (full fine-tuning);
- ``head``: the head alone, on the frozen encoder's pooled features, which are computed once.

Texts are tokenized once; batches are built from texts of similar length (shuffled in pools of
``POOL`` batches) and padded to their longest text, so little time goes to padding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import adapterkit

from ..config import AdapterConfig
from ..slot import Owned
from .data import DataError

Regime = Literal["adapters", "full", "head"]
REGIMES: tuple[Regime, ...] = ("adapters", "full", "head")
POOL = 50  # batches whose texts are sorted by length together: length buckets, still random
EVAL_BATCH = 64
OnStep = Callable[[], None]
OnEval = Callable[[int, float | None, float], None]  # (step, training loss, val accuracy)


@dataclass(frozen=True)
class Recipe:
    """The training recipe; the defaults are those docs/cli.md explains (the sweep's best)."""

    # passes over the training texts (adapters, head): the run's length follows the data.
    # The third epoch is worth 0.7 points on the default task and 0.9 on another (3 seeds
    # each, against 2.5; docs/benchmarks.md, "Run length and text length").
    epochs: float = 3.0
    # Full fine-tuning converges in fewer passes (BERT's recipe is 2 to 4 epochs); adapters
    # train longer (Houlsby et al. 2019). On the default task full fine-tuning scores the same
    # after 2 epochs as after 3 (71.2% vs 71.1%, 3 seeds), at two thirds of the time.
    full_epochs: float = 2.0
    steps: int | None = None  # when set, overrides both epochs, for every regime
    batch_size: int = 16  # more, smaller steps: +0.8 points for adapters over 32 in the sweep
    # tokens per text: the first sentences carry the label (a text's median is 23 tokens)
    max_length: int = 48
    lr: float = 1e-3  # adapters and LayerNorms
    full_lr: float = 5e-5  # full fine-tuning: the usual 2e-5..1e-4
    head_lr: float = 3e-3  # the new head, in every regime
    warmup: float = 0.1  # share of the steps with a linear ramp; then linear decay to 0
    weight_decay: float = 0.01
    bottleneck: int = 48  # MiniLM: 12 adapters, LayerNorms and head are 2.0% of the model
    placement: Literal["sequential", "parallel"] = "sequential"
    scaling: float = 1.0
    adapter_dropout: float = 0.0
    targets: tuple[str, ...] = ("auto",)
    train_norms: bool = True
    # fit the head on the frozen encoder's features first (a linear probe, Kumar et al. 2022),
    # so that the encoder's first updates follow a head that already means something
    probe: bool = True
    # validation points on the curve after step 0 (which costs nothing: the frozen features),
    # evenly spaced, the last at the end, whatever the run's length: 10 draw a curve where 2
    # drew a bent line. Each is a pass over the validation texts, as long as 18 training
    # steps on the default task (895 texts forward against 16 forward and backward), so the
    # 8 more cost about 150 steps' time, about a fifth of the default run (docs/cli.md,
    # "Time"). `--evals 1` keeps the end alone.
    evals: int = 10

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(bottleneck=self.bottleneck, placement=self.placement,
                             scaling=self.scaling, dropout=self.adapter_dropout)

    def total_steps(self, n_train: int, regime: Regime = "adapters") -> int:
        if self.steps is not None:
            return self.steps
        epochs = self.full_epochs if regime == "full" else self.epochs
        return max(1, math.ceil(epochs * math.ceil(n_train / self.batch_size)))

    def lr_of(self, regime: Regime) -> float:
        return {"adapters": self.lr, "full": self.full_lr, "head": self.head_lr}[regime]


class Classifier(nn.Module):
    """``head(dropout(mean of the encoder's last hidden states over real tokens))``."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids,
                              attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        mask = attention_mask[..., None].to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(input_ids, attention_mask)))  # (B, labels)


def load_encoder(model: str | Path) -> tuple[Callable[[], nn.Module], Any]:
    """A factory of fresh copies of a pretrained ``AutoModel`` encoder, and its tokenizer.

    The weights are read once; each call of the factory returns a copy. Offline: a path or a
    model already in the local cache. ``DataError`` if either cannot be loaded.
    """
    import copy

    if Path(model).is_dir():
        _check_model_dir(Path(model))
    elif "/" in str(model) or str(model).startswith("."):
        raise DataError(f"--model {model}: no such directory; give a directory written by "
                        "save_pretrained")
    transformers = _quiet_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
        encoder = transformers.AutoModel.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"--model {model}: cannot load a pretrained encoder and its tokenizer "
                        f"({first}); give a directory written by save_pretrained, with "
                        "weights, config.json and tokenizer files") from None
    if not hasattr(encoder.config, "hidden_size"):
        raise DataError(f"--model {model}: its config has no hidden_size; give an encoder")
    encoder.eval()
    return (lambda: copy.deepcopy(encoder)), tokenizer


WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
           "pytorch_model.bin.index.json")


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise DataError(f"--model {path}: no config.json there; give a directory written by "
                        "save_pretrained")
    if not any((path / name).is_file() for name in WEIGHTS):
        raise DataError(f"--model {path}: no weights there (none of {', '.join(WEIGHTS)}); "
                        "give a directory written by save_pretrained with the model's weights")


def _quiet_transformers() -> Any:
    """transformers, imported without its progress bars and the warnings its imports log.

    Its loading bars and warnings (and those of optional libraries it imports, such as
    torchao's missing kernels) would bury the command's own output and its one-line errors.
    """
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# -- tokens and batches ----------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """Texts tokenized once (no padding) and their class ids."""

    ids: list[list[int]]
    labels: torch.Tensor  # (N,) long
    pad_id: int

    def batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of ``rows``, padded to the longest of them."""
        width = max(len(self.ids[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(self.ids[r])] = torch.tensor(self.ids[r])
            mask[i, :len(self.ids[r])] = 1
        return ids, mask


def encode(tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
           max_length: int) -> Encoded:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids, torch.tensor(labels, dtype=torch.long), pad)


def train_order(lengths: Sequence[int], batch_size: int, steps: int,
                generator: torch.Generator) -> list[list[int]]:
    """``steps`` batches of row indices: epochs of shuffled rows, bucketed by length in pools.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> order = train_order([5, 1, 4, 2, 3, 6], batch_size=2, steps=4, generator=g)
        >>> len(order), sorted(sum(order[:3], []))
        (4, [0, 1, 2, 3, 4, 5])
    """
    out: list[list[int]] = []
    while len(out) < steps:
        rows = torch.randperm(len(lengths), generator=generator).tolist()
        epoch = []
        for start in range(0, len(rows), batch_size * POOL):
            pool = sorted(rows[start:start + batch_size * POOL], key=lambda r: lengths[r])
            epoch += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        shuffle = torch.randperm(len(epoch), generator=generator).tolist()
        out += [epoch[i] for i in shuffle]
    return out[:steps]


def eval_order(lengths: Sequence[int]) -> list[list[int]]:
    rows = sorted(range(len(lengths)), key=lambda r: lengths[r])
    return [rows[i:i + EVAL_BATCH] for i in range(0, len(rows), EVAL_BATCH)]


@torch.no_grad()
def predict(model: Classifier, data: Encoded) -> torch.Tensor:
    """The predicted class of every row of ``data``, in eval mode."""
    was = model.training
    model.eval()
    preds = torch.empty(len(data.ids), dtype=torch.long)
    try:
        for rows in eval_order([len(i) for i in data.ids]):
            preds[rows] = model(*data.batch(rows)).argmax(-1)
    finally:
        model.train(was)
    return preds


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return (preds == labels).float().mean().item()


# -- one run ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One regime trained with one seed."""

    regime: Regime
    seed: int
    accuracy: float
    curve: list[tuple[int, float]]  # (step, validation accuracy); step 0: before training
    # (step, mean training loss over the steps since the previous point), at the curve's steps
    loss_curve: list[tuple[int, float]]
    trainable: int
    total: int
    steps: int
    seconds: float  # wall time of the run: the probe, the training steps, the evaluations
    step_seconds: float  # median wall time of one training step
    model: Classifier | None = field(default=None, repr=False)


SET = "default"  # the adapter set of a single-task run


def build(regime: Regime, fresh_encoder: Callable[[], nn.Module], num_labels: int,
          recipe: Recipe, seed: int) -> Classifier:
    """The classifier of a regime, adapters injected and parameters frozen as it says."""
    torch.manual_seed(seed)
    model = Classifier(fresh_encoder(), num_labels)
    if regime == "adapters":
        add_task_set(model, SET, recipe)
    if regime != "full":
        adapterkit.freeze(model, train=trainable_entries(model, regime, recipe))
    return model


def add_task_set(model: Classifier, name: str, recipe: Recipe,
                 head: nn.Module | None = None) -> None:
    """Set ``name``: adapters in the encoder, and its own LayerNorms (with
    ``recipe.train_norms``) and head, copies of the model's (``head``: a replacement, such as
    a head with another number of labels). The set is left active, the only one."""
    targets: Any = recipe.targets[0] if len(recipe.targets) == 1 else list(recipe.targets)
    adapterkit.set_active(model, [])
    adapterkit.inject(model.encoder, targets, recipe.adapter_config(), name=name)
    adapterkit.own(model, "head" if head is None else {"head": head}, name=name)
    if recipe.train_norms:
        adapterkit.own(model, nn.LayerNorm, name=name)
    adapterkit.set_active(model, [name])


def trainable_entries(model: Classifier, regime: Regime, recipe: Recipe) -> list[str]:
    """Freeze-spec entries of what trains: the head alone, or the adapter set, which holds its
    own copies of the head and (with ``recipe.train_norms``) of the LayerNorms."""
    if regime == "head":
        return ["head"]
    return [f"adapters:{SET}"]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``model`` as one set runs it: a set's own copy of a
    module replaces one of the same size, so the copies count once, as trainable."""
    owned = {id(p) for m in model.modules() if isinstance(m, Owned) for p in m.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in owned)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _optimizer(model: Classifier, params: list[nn.Parameter], regime: Regime,
               recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW over ``params``: the head's at ``head_lr``, the others at the regime's rate."""
    head = {id(p) for p in model.head.parameters()}
    groups = [{"params": [p for p in params if id(p) in head], "lr": recipe.head_lr}]
    body = [p for p in params if id(p) not in head]
    if body:
        groups.append({"params": body, "lr": recipe.lr_of(regime)})
    try:  # the fused kernel: full fine-tuning's steps take 0.23 s instead of 0.32 here
        return torch.optim.AdamW(groups, weight_decay=recipe.weight_decay, fused=True)
    except RuntimeError:  # a device or dtype it does not support
        return torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)


def schedule(step: int, steps: int, warmup: float) -> float:
    """Linear ramp over ``warmup`` of the steps, then linear decay to 0 at ``steps``.

    Example:
        >>> [round(schedule(s, 10, 0.2), 3) for s in (0, 1, 2, 9)]
        [0.5, 1.0, 1.0, 0.125]
    """
    ramp = max(1, round(warmup * steps)) if warmup > 0 else 0
    if step < ramp:
        return (step + 1) / ramp
    return max(0.0, (steps - step) / max(1, steps - ramp))


def eval_steps(steps: int, evals: int) -> set[int]:
    return {max(1, round(steps * (i + 1) / evals)) for i in range(evals)}


def train_run(regime: Regime, model: Classifier, train: Encoded, val: Encoded, recipe: Recipe,
              seed: int, on_step: OnStep | None = None,
              features: tuple[torch.Tensor, torch.Tensor] | None = None,
              on_eval: OnEval | None = None) -> Run:
    """Train ``model`` (from ``build``) and evaluate it on ``val``.

    ``features``: the frozen base encoder's pooled features of (train, val). The ``head``
    regime trains on them alone; with ``recipe.probe`` the other regimes fit their head on
    them before training the encoder. ``on_eval(step, loss, accuracy)`` is called at each
    point of the validation curve (``loss`` is None at step 0).
    """
    steps = recipe.total_steps(len(train.ids), regime)
    # the probe is the head regime's run, the same for every regime whatever its length;
    # both take their batches from the front of one order
    probe_steps = recipe.total_steps(len(train.ids), "head")
    order = train_order([len(i) for i in train.ids], recipe.batch_size,
                        max(steps, probe_steps), torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # dropout masks
    start = time.perf_counter()
    if regime != "head" and recipe.probe:
        assert features is not None, "recipe.probe needs the frozen encoder's features"
        _fit(model, [p for p in model.head.parameters() if p.requires_grad],
             order[:probe_steps], recipe, train, features[0], "head")
    order = order[:steps]
    on_features = features[0] if regime == "head" else None
    # at step 0 the encoder is the frozen base (adapters start as the identity), so the
    # features give its accuracy without a pass over the texts
    start_point = [(0, _val_accuracy(model, val, features))] if features is not None else []
    if start_point and on_eval is not None:
        on_eval(0, None, start_point[0][1])
    fit = _fit(model, _trainable(model), order, recipe, train, on_features, regime, val,
               features if regime == "head" else None, on_step, on_eval)
    curve = start_point + fit.curve
    seconds = time.perf_counter() - start
    trainable, total = parameter_counts(model)
    return Run(regime, seed, curve[-1][1], curve, fit.losses, trainable, total, steps, seconds,
               sorted(fit.times)[len(fit.times) // 2], model)


def _trainable(model: Classifier) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class Fit:
    """What ``_fit`` saw: the validation curve and the training loss at ``eval_steps``
    (when it had validation texts), and the wall time of every step."""

    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, accuracy)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since)
    times: list[float] = field(default_factory=list)


def _fit(model: Classifier, params: Any, order: list[list[int]], recipe: Recipe,
         train: Encoded, on_features: torch.Tensor | None, regime: Regime,
         val: Encoded | None = None, val_features: Any = None,
         on_step: OnStep | None = None, on_eval: OnEval | None = None) -> Fit:
    """Steps of AdamW over ``params`` along ``order``; on features if given, else on text."""
    optimizer = _optimizer(model, list(params), regime, recipe)
    base = [g["lr"] for g in optimizer.param_groups]
    steps = len(order)
    checkpoints = eval_steps(steps, recipe.evals) if val is not None else set()
    model.train()
    fit, window = Fit(), []
    for step, rows in enumerate(order, start=1):
        t0 = time.perf_counter()
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * schedule(step - 1, steps, recipe.warmup)
        if on_features is not None:
            logits = model.head(model.dropout(on_features[rows]))
        else:
            logits = model(*train.batch(rows))
        loss = F.cross_entropy(logits, train.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        fit.times.append(time.perf_counter() - t0)
        window.append(loss.item())
        if step in checkpoints:
            assert val is not None
            fit.curve.append((step, _val_accuracy(model, val, val_features)))
            fit.losses.append((step, sum(window) / len(window)))
            window = []
            model.train()
            if on_eval is not None:
                on_eval(step, fit.losses[-1][1], fit.curve[-1][1])
        if on_step is not None:
            on_step()
    return fit


def _val_accuracy(model: Classifier, val: Encoded,
                  features: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    if features is None:
        return accuracy(predict(model, val), val.labels)
    model.eval()
    with torch.no_grad():
        return accuracy(model.head(features[1]).argmax(-1), val.labels)


@torch.no_grad()
def pooled_features(model: Classifier, data: Encoded,
                    on_batch: OnStep | None = None) -> torch.Tensor:
    """The frozen encoder's pooled features of every row, in eval mode: (N, d)."""
    model.eval()
    out = torch.empty(len(data.ids), model.head.in_features)
    for rows in eval_order([len(i) for i in data.ids]):
        out[rows] = model.pooled(*data.batch(rows))
        if on_batch is not None:
            on_batch()
    return out
