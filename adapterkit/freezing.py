"""Applying a declarative freeze spec: what ``train`` selects stays trainable, all else freezes.

Also what makes gradients reach adapters under reentrant gradient checkpointing. A reentrant
checkpoint whose inputs do not require grad gives nothing inside it a gradient; with a frozen
embedding, nothing does. ``freeze`` makes the input embeddings' output require grad while
adapters train and a module has ``gradient_checkpointing`` on (as PEFT's
``enable_input_require_grads``; transformers does it itself only for models whose input is
``input_ids``, not for ViT's ``pixel_values``). The hooks go when the last set does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import state
from .adapter import is_quantized, quantized_message, quantized_weights, where
from .config import FreezeSpec, as_entries
from .report import format_table, percent
from .select import compile_selector, no_match_error
from .slot import Composition, Owned
from .tree import adapted_modules, every_name, is_pretrained, require_sets, set_names


@dataclass(frozen=True)
class FreezeReport:
    """What a ``freeze`` call changed; ``str()`` is a table, ``repr()`` one short line.

    ``frozen`` and ``unfrozen`` hold the names of the parameters that stopped and started
    requiring grad; the repr gives their counts only, so that a REPL's echo of ``freeze(...)``
    stays one line on a model of any size.

    Example:
        >>> import torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> _ = adapterkit.inject(model, ["0"], adapterkit.AdapterConfig(bottleneck=2))
        >>> report = adapterkit.freeze(model, train=["adapters", "1"])
        >>> report  # what a REPL echoes for freeze(...)
        FreezeReport(froze=2 tensors, unfroze=0 tensors, trainable=32 of 52 (61.54%), \
spec=FreezeSpec(train=('adapters', '1'), freeze=()))
        >>> report.frozen
        ('0.weight', '0.bias')
    """

    spec: FreezeSpec
    frozen: tuple[str, ...]  # parameter names that stopped requiring grad
    unfrozen: tuple[str, ...]  # parameter names that started requiring grad
    trainable: int  # trainable parameter count after the call
    total: int

    def __repr__(self) -> str:
        return (f"FreezeReport(froze={len(self.frozen)} tensors, unfroze={len(self.unfrozen)} "
                f"tensors, trainable={self.trainable:,} of {self.total:,} "
                f"({percent(self.trainable, self.total)}), spec={self.spec!r})")

    def __str__(self) -> str:
        rows = [("froze", len(self.frozen)), ("unfroze", len(self.unfrozen))]
        table = format_table(["change", "tensors"], rows)
        return (
            f"{table}\ntrainable after: {self.trainable} of {self.total} "
            f"({percent(self.trainable, self.total)})"
        )


def _adapter_params(model: nn.Module, set_name: str | None) -> set[int]:
    if set_name is not None:
        require_sets(model, set_name, f"'adapters:{set_name}': ")
    return {
        id(p)
        for _, _, slot in adapted_modules(model)
        for name, adapter in slot.items()
        if set_name is None or name == set_name
        for p in adapter.parameters()
    }


def select_parameters(model: nn.Module, entry: str) -> set[int]:
    """The ids of the parameters one freeze-spec entry selects; an error if none."""
    if entry == "adapters" or entry.startswith("adapters:"):
        found = _adapter_params(model, entry.partition(":")[2] or None)
        if not found:
            raise ValueError(f"{entry!r} selects no parameter: the model has no adapters yet")
        return found
    match = compile_selector(entry)
    modules = every_name(model)  # a shared module answers to each of its names
    found = {id(p) for name, module in modules if name and match(name, module)
             for p in module.parameters()}
    named = list(model.named_parameters(remove_duplicate=False))
    found |= {id(p) for name, p in named if match(name, p)}
    if not found:
        names = [n for n, _ in modules if n] + [n for n, _ in named]
        raise no_match_error(entry, names, what="module or parameter")
    return found


def _check_not_quantized(model: nn.Module, keep: set[int]) -> None:
    """A quantized weight gets no gradient: refuse to call it trainable."""
    for key, _, slot in adapted_modules(model):
        for set_name, adapter in slot.items():
            names = quantized_weights(adapter)
            if names and any(id(p) in keep for p in adapter.parameters()):
                raise ValueError(quantized_message(where(key, set_name), names,
                                                   "and this spec would train it"))
    for name, p in model.named_parameters():
        if id(p) in keep and is_quantized(p):
            raise ValueError(
                f"parameter '{name}' is quantized ({type(p).__name__}) and this spec would "
                "train it, but a quantized weight gets no gradient: leave it out of quantize_ "
                "(its filter_fn) or out of train"
            )


def _reached(model: nn.Module, active: list) -> set[str]:
    """The sets an active list runs: its set names, and the sets its fusions and averages use."""
    reached = {e for e in active if isinstance(e, str)}
    reached |= {s for e in active if not isinstance(e, str) for s in e.sets}
    for _, _, slot in adapted_modules(model):
        reached |= {s for e in active if isinstance(e, str) and e in slot
                    and isinstance(slot[e], Composition) for s in slot[e].sets}
    return reached


def _warn_inactive(model: nn.Module) -> None:
    active = state.active(model)
    reached = _reached(model, active)
    idle = {
        set_name: n
        for set_name in set_names(model) if set_name not in reached
        if (n := sum(p.numel() for _, _, slot in adapted_modules(model) if set_name in slot
                     for p in slot[set_name].parameters() if p.requires_grad))
    }
    if idle:
        warnings.warn(
            f"freeze made adapter set(s) {sorted(idle)} trainable ({sum(idle.values())} "
            f"parameters), but they are not active (active: {active}): they get no gradient, "
            "and DistributedDataParallel stops with 'Expected to have finished reduction in "
            "the prior iteration'. Activate them (adapterkit.set_active) or train only the "
            f"active ones (train=[{', '.join(repr('adapters:' + a) for a in active)}])",
            stacklevel=3,
        )


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _warn_low_precision(model: nn.Module) -> None:
    low = sorted({
        (set_name, str(p.dtype).removeprefix("torch."))
        for _, _, slot in adapted_modules(model) for set_name, adapter in slot.items()
        # an explicit dtype is a choice: no warning (a fusion has its sets' dtype, no choice;
        # a set's own module is a copy of the model's, in the model's dtype)
        if not isinstance(adapter, Owned) and getattr(adapter.config, "dtype", None) is None
        for p in adapter.parameters() if p.requires_grad and p.dtype in _LOW_PRECISION
    })
    if low:
        sets = sorted({s for s, _ in low})
        dtypes = sorted({d for _, d in low})
        warnings.warn(
            f"freeze made the adapters of set(s) {sets} trainable in {', '.join(dtypes)} (the "
            "wrapped modules' dtype): optimizer updates below half a step of that dtype are "
            "lost, as most are at small learning rates. Inject with "
            "AdapterConfig(dtype='float32') to train them in float32 (or give the low dtype "
            "explicitly to keep it)",
            stacklevel=3,
        )


def freeze(
    model: nn.Module,
    spec: FreezeSpec | dict | None = None,
    *,
    train: Sequence[str] | str | None = None,
    freeze: Sequence[str] | str = (),
) -> FreezeReport:
    """Make exactly what the spec selects trainable; frozen parameters get ``grad = None``.

    Give either a ``FreezeSpec`` (or its dict form) or ``train=`` / ``freeze=`` (a list of
    entries, or one entry as a string). Entries of ``freeze`` win over ``train``. An entry
    that selects nothing, or adapter weights that a quantization library replaced, is an
    error raised before anything changes. Making an inactive set trainable warns (its
    parameters get no gradient, which DistributedDataParallel refuses), and so does making
    bfloat16 / float16 adapters trainable without an explicit ``AdapterConfig.dtype`` (small
    updates to them are lost).

    On a transformers model with frozen input embeddings, trainable adapters also get the
    embeddings' output to require grad while gradient checkpointing is on, so that a
    reentrant checkpoint passes them gradients (see this module's docstring).

    Example:
        >>> import adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=64, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.1, N=2)
        >>> _ = adapterkit.inject(model, ["mha_block", "ffn_block"])
        >>> report = adapterkit.freeze(model, train=["adapters", "cls"], freeze=["cls.bias"])
        >>> sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
        ['cls', 'decoder_blocks']
        >>> model.cls.bias.requires_grad
        False
    """
    if spec is not None and (train is not None or freeze):
        raise TypeError("give a spec or train=/freeze=, not both")
    if spec is None:
        spec = FreezeSpec(train=("adapters",) if train is None else as_entries("train", train),
                          freeze=as_entries("freeze", freeze))
    spec = FreezeSpec.coerce(spec)

    keep: set[int] = set()
    for entry in spec.train:
        keep |= select_parameters(model, entry)
    for entry in spec.freeze:
        keep -= select_parameters(model, entry)
    _check_not_quantized(model, keep)

    frozen, unfrozen = [], []
    for name, p in model.named_parameters():
        wanted = id(p) in keep
        if p.requires_grad != wanted:
            (unfrozen if wanted else frozen).append(name)
            p.requires_grad_(wanted)
        if not wanted:
            p.grad = None
    state.set_freeze_spec(model, spec)  # saved with the adapters: how a checkpoint trained
    adapters_train = any(p.requires_grad for _, _, slot in adapted_modules(model)
                         for p in slot.parameters())
    require_input_grads(model, adapters_train)
    _warn_inactive(model)
    _warn_low_precision(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return FreezeReport(spec, tuple(frozen), tuple(unfrozen), trainable, total)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, each once: what the optimizer should get.

    Example:
        >>> import torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = adapterkit.inject(model, ["0"], adapterkit.AdapterConfig(bottleneck=2))
        >>> _ = adapterkit.freeze(model, train=["adapters"])
        >>> opt = torch.optim.Adam(adapterkit.trainable_parameters(model), lr=1e-3)
        >>> sum(p.numel() for p in adapterkit.trainable_parameters(model))
        22
    """
    return [p for p in model.parameters() if p.requires_grad]


# -- gradients under reentrant checkpointing ------------------------------------------------


class RequireGradWhileCheckpointing:
    """Forward hook on an input embedding: its output requires grad while gradient
    checkpointing is on, so that a reentrant checkpoint above it passes gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.checkpointing = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if (isinstance(output, torch.Tensor) and torch.is_grad_enabled()
                and not output.requires_grad
                and any(m.gradient_checkpointing for m in self.checkpointing)):
            output.requires_grad_(True)


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embeddings of ``model`` and of the transformers models inside it."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if not is_pretrained(module):
            continue
        try:
            embedding = module.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embedding, nn.Module):
            found.setdefault(id(embedding), embedding)
    return list(found.values())


def require_input_grads(model: nn.Module, wanted: bool) -> None:
    """Install (``wanted``) or remove the ``RequireGradWhileCheckpointing`` hooks."""
    for module in model.modules():
        hooks = module._forward_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, RequireGradWhileCheckpointing)]:
            del hooks[key]
    if not wanted or not is_pretrained(model):
        return
    hook = RequireGradWhileCheckpointing(model)
    for embedding in _input_embeddings(model):
        if not any(p.requires_grad for p in embedding.parameters()):
            embedding.register_forward_hook(hook)


@state.on_sets_changed
def _drop_input_hooks(model: nn.Module) -> None:
    if not set_names(model):
        require_input_grads(model, False)
