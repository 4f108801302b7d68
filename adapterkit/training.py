"""Small training loops: plain training, evaluation, and two-phase training (workflow B).

The seed's trap: adapters on a randomly initialised, frozen backbone learn little. Its two
sound workflows are (A) pretrain or load a base, freeze it, train adapters, and (B) train
everything for a warm-up, then freeze the backbone and continue with adapters only.
``train_two_phase`` is workflow B in one call.

These loops are deliberately plain (AdamW, optional schedule, a per-step callback) so that a
reader sees the whole recipe; anything fancier belongs in the user's own loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import FreezeSpec
from .freezing import FreezeReport, freeze, select_parameters, trainable_parameters

LossFn = Callable[[nn.Module, Any], torch.Tensor]
StepCallback = Callable[[int, float], None]  # (step just finished, counting from 1; its loss)
Schedule = Callable[[int], float]  # step (from 0) -> learning-rate multiplier


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy (nats) of a ``(x, y)`` batch, on the model's device.

    Example:
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=16, d_model=8, max_length=4, num_heads=2, dff=16,
        ...             dropout=0.0, N=1)
        >>> x = torch.randint(0, 16, (2, 4))
        >>> lm_loss(model, (x, x)).shape
        torch.Size([])
    """
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batch)
    logits = model(x)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def cosine_schedule(steps: int, ramp: int = 0, floor: float = 0.1) -> Schedule:
    """Linear ramp over ``ramp`` steps, then cosine decay to ``floor`` at ``steps``.

    Example:
        >>> s = cosine_schedule(100, ramp=10)
        >>> round(s(0), 2), s(9), round(s(99), 2)
        (0.1, 1.0, 0.1)
    """

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        progress = min(1.0, (step - ramp) / max(1, steps - ramp - 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int,
    *,
    lr: float = 1e-3,
    loss_fn: LossFn = lm_loss,
    weight_decay: float = 0.0,
    schedule: Schedule | None = None,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Train the parameters that require grad for ``steps`` steps of AdamW; the step losses.

    The optimizer gets ``trainable_parameters(model)`` only, as the seed does. ``batches`` is
    drawn from lazily and may be endless. ``on_step(step, loss)`` runs after every step.

    Example:
        >>> import torch, adapterkit
        >>> from adapterkit.training import train
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(4, 1)
        >>> data = [(torch.randn(8, 4), torch.zeros(8, 1))] * 50
        >>> mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> losses = train(model, data, 50, lr=0.05, loss_fn=mse)
        >>> losses[-1] < losses[0] / 10
        True
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; unfreeze something first "
                         "(adapterkit.freeze(model, train=[...]))")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return _run(model, optimizer, _take(batches, steps), steps, loss_fn, schedule, on_step, 0)


def _take(batches: Iterable[Any], steps: int) -> Iterator[Any]:
    it = iter(batches)
    for _ in range(steps):
        try:
            yield next(it)
        except StopIteration:
            raise ValueError(f"batches ran out before {steps} steps") from None


def _run(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Any], steps: int,
         loss_fn: LossFn, schedule: Schedule | None, on_step: StepCallback | None,
         offset: int) -> list[float]:
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for step, batch in enumerate(batches):
            if schedule is not None:
                for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = lr * schedule(step)
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(offset + step + 1, losses[-1])
    finally:
        model.train(was_training)
    if len(losses) != steps:
        raise ValueError(f"batches ran out after {len(losses)} of {steps} steps")
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = lm_loss) -> float:
    """Mean loss over ``batches`` in eval mode, without gradients; the mode is restored.

    Example:
        >>> import torch
        >>> from adapterkit.training import evaluate
        >>> model = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_(), model.bias.fill_(1.0)
        >>> mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> evaluate(model, [(torch.randn(4, 2), torch.zeros(4, 1))], mse)
        1.0
    """
    was_training = model.training
    model.eval()
    try:
        losses = [loss_fn(model, batch).item() for batch in batches]
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("evaluate got no batches")
    return sum(losses) / len(losses)


def bits(nats: float) -> float:
    """A cross-entropy in nats as bits (per token; per character for byte-level ASCII text).

    Example:
        >>> bits(math.log(256))  # a uniform guess over the 256 byte values
        8.0
    """
    return nats / math.log(2)


@dataclass(frozen=True)
class TwoPhaseResult:
    """What ``train_two_phase`` did: the step losses of each phase and the freeze it applied."""

    warmup_losses: list[float]
    adapt_losses: list[float]
    freeze_report: FreezeReport

    @property
    def losses(self) -> list[float]:
        return self.warmup_losses + self.adapt_losses


def train_two_phase(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    warmup_steps: int,
    adapt_steps: int,
    freeze_spec: FreezeSpec | dict | None = None,
    lr: float = 1e-3,
    adapt_lr: float | None = None,
    loss_fn: LossFn = lm_loss,
    weight_decay: float = 0.0,
    on_step: StepCallback | None = None,
) -> TwoPhaseResult:
    """Workflow B: train every parameter for ``warmup_steps``, then freeze and continue.

    Phase 1 makes every parameter of ``model`` trainable (adapters included, if injected) and
    trains them all with AdamW at ``lr``. At the switch it applies ``freeze_spec`` (default
    ``FreezeSpec()``: the adapters only, as the seed says) with ``adapterkit.freeze`` and trains
    ``adapt_steps`` more with a fresh AdamW over the trainable parameters only, at
    ``adapt_lr`` (default ``lr``). The spec is checked against the model before any step, so
    a spec that selects nothing fails at once and leaves the model as it was. Step numbers
    passed to ``on_step`` run on across the switch (1 .. warmup_steps + adapt_steps).

    Example:
        >>> import torch, adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> from adapterkit.training import train_two_phase
        >>> model = GPT(vocab_size=32, d_model=16, max_length=8, num_heads=2, dff=32,
        ...             dropout=0.0, N=1)
        >>> _ = adapterkit.inject(model, ["ffn_block"], adapterkit.AdapterConfig(bottleneck=4))
        >>> x = torch.randint(0, 32, (4, 8))
        >>> result = train_two_phase(model, [(x, x)] * 6, warmup_steps=3, adapt_steps=3,
        ...                          freeze_spec={"train": ["adapters", "cls"]})
        >>> len(result.losses), model.emb_layer.weight.requires_grad, model.cls.weight.requires_grad
        (6, False, True)
    """
    for name, value in (("warmup_steps", warmup_steps), ("adapt_steps", adapt_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    spec = FreezeSpec.coerce(freeze_spec)
    for entry in (*spec.train, *spec.freeze):
        select_parameters(model, entry)  # raises now, not after the warm-up
    batch_iter = iter(batches)
    for p in model.parameters():
        p.requires_grad_(True)
    warm: list[float] = []
    if warmup_steps:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        warm = _run(model, optimizer, _take(batch_iter, warmup_steps), warmup_steps, loss_fn,
                    None, on_step, 0)
    report = freeze(model, spec)
    adapt: list[float] = []
    if adapt_steps:
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=adapt_lr or lr,
                                      weight_decay=weight_decay)
        adapt = _run(model, optimizer, _take(batch_iter, adapt_steps), adapt_steps, loss_fn,
                     None, on_step, warmup_steps)
    return TwoPhaseResult(warm, adapt, report)
