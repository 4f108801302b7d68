"""Merging a linear adapter set into the weights it wraps, and the exact inverse.

A set with ``activation="identity"`` computes an affine branch: ``branch(v) = M v + c`` with
``M = scaling * up.weight @ down.weight`` (rank <= bottleneck) and
``c = scaling * (up.weight @ down.bias + up.bias)``. On a module ``y = W x + b``:

- sequential: ``y + branch(y) = (I + M) W x + (I + M) b + c``, so ``W' = W + M W``,
  ``b' = b + M b + c``;
- parallel: ``y + branch(x) = (W + M) x + b + c``, so ``W' = W + M``, ``b' = b + c`` -- LoRA
  (``delta W = B A`` with ``B = scaling * up.weight``, ``A = down.weight``) plus a bias shift.

transformers' ``Conv1D`` (GPT-2) stores ``W`` transposed (``y = x W + b``); the same algebra
holds with ``M`` transposed. The products are formed in float64 and rounded once to the
weight's dtype, so the merged model computes the adapted function to that rounding, at exactly
the base's cost. ``merge`` keeps the original weights in the ``Merged`` record it returns;
``unmerge(model, record)`` puts them back bit for bit and the set's own adapter objects back in
their slots, provided the merged weights were not changed since.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import state
from ..adapter import Adapter
from ..lifecycle import check_unused
from ..report import format_table
from ..slot import AdapterSlot
from ..surgery import detach, install_set, wrap
from ..tree import adapted_modules, original_class, require_sets, set_names, slot_of


@dataclass
class _Undo:
    """Everything unmerge needs: originals, the adapters, where they sat, what was active."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # originals, cloned
    before: dict[str, tuple[int, int | None]]  # versions of weight and bias before the merge
    versions: dict[str, tuple[int, int | None]]  # of weight and bias right after the merge
    adapters: dict[str, Adapter]
    slots: dict[str, AdapterSlot]  # the very slot objects, put back where merge emptied them
    slot_order: dict[str, list[str]]
    active: tuple[Any, ...]
    done: bool = False


@dataclass
class Merged:
    """What ``merge`` changed; ``unmerge(model, merged)`` undoes it. ``str()`` is a table."""

    name: str
    modules: tuple[str, ...]  # the modules whose weights now hold the set
    new_bias: tuple[str, ...]  # of those, the ones that had no bias and got one
    _owners: dict[str, nn.Module] = field(repr=False)
    _undo: _Undo = field(repr=False)

    def __str__(self) -> str:
        rows = [(m, "added" if m in self.new_bias else "updated") for m in self.modules]
        return f"merged set '{self.name}'\n" + format_table(["module", "bias"], rows)


def _linear_kind(module: nn.Module) -> str | None:
    """"linear" (weight out x in), "conv1d" (transformers' Conv1D, in x out), or None."""
    cls = original_class(module)
    if issubclass(cls, nn.Linear) and cls.forward is nn.Linear.forward:
        return "linear"
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return "conv1d"
    return None


def _check_module(qname: str, module: nn.Module, adapter: Adapter, name: str,
                  tied: dict[int, list[str]]) -> str:
    kind = _linear_kind(module)
    cls = original_class(module).__name__
    if kind is None:
        raise ValueError(
            f"cannot merge set '{name}': module '{qname}' is a {cls}, not a Linear (nor "
            "transformers' Conv1D), so no single weight matrix can absorb the adapter; target "
            "the Linear layers themselves to merge, or keep the set as an adapter"
        )
    weight = module.weight
    if type(weight) is not nn.Parameter or type(weight.data) is not torch.Tensor or (
            not weight.is_floating_point() or weight.is_meta):
        raise ValueError(
            f"cannot merge set '{name}' into '{qname}': its weight is a "
            f"{type(weight.data).__name__} of {weight.dtype} (quantized, sharded or on meta), not "
            "a plain floating-point tensor; merge into an unquantized, unsharded base"
        )
    others = [n for n in tied.get(id(weight), []) if not n.startswith(qname + ".")]
    if others:
        raise ValueError(
            f"cannot merge set '{name}' into '{qname}': its weight is shared with {others[0]} "
            "(tied weights), which would change too"
        )
    if getattr(adapter, "feature_dim", -1) != -1:
        raise ValueError(
            f"cannot merge set '{name}' into '{qname}': its adapter mixes axis "
            f"{adapter.feature_dim}, not the last axis that the layer's weight maps"
        )
    out_dim, in_dim = weight.shape if kind == "linear" else weight.shape[::-1]
    parallel = adapter.config.placement == "parallel"
    if out_dim != adapter.d_model or in_dim != (adapter.d_in if parallel else in_dim):
        raise ValueError(
            f"cannot merge set '{name}' into '{qname}': the module maps {in_dim} -> {out_dim} "
            f"features but the adapter maps {adapter.d_in} -> {adapter.d_model}"
        )
    return kind


def _check_set(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, Adapter, str]]:
    require_sets(model, name)
    if state.graph_base(model) is not None:
        raise ValueError(
            f"cannot merge set '{name}': the model was injected with method='fx', where a site "
            "need not be a module with a weight; inject with method='modules' to merge"
        )
    check_unused(model, [name], "merge")
    if state.route(model) is not None:
        raise ValueError(f"cannot merge set '{name}' inside routed(); merge outside it")
    active = state.active(model)
    tied: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(pname)
    found = {}
    for qname, owner, slot in adapted_modules(model):
        if name not in slot:
            continue
        adapter = slot[name]
        config = adapter.config if isinstance(adapter, Adapter) else None
        if config is None:
            raise ValueError(f"cannot merge set '{name}': it is a fusion, which is not linear")
        if config.activation != "identity":
            raise ValueError(
                f"cannot merge set '{name}': its activation is '{config.activation}', so its "
                "branch is not linear and no weight matrix computes it; only sets injected with "
                "AdapterConfig(activation='identity') merge"
            )
        if config.dropout > 0 and adapter.training:
            raise ValueError(
                f"cannot merge set '{name}' in train mode: its dropout ({config.dropout}) makes "
                "each forward random, and merged weights compute the eval-mode function; call "
                "model.eval() first"
            )
        here = [e for e in active if slot.entry(e) is not None]
        if name in active and here[0] != name:
            raise ValueError(
                f"cannot merge set '{name}': at '{qname}' it runs after {here[0]}, and merged "
                f"weights run before every adapter; set_active an order with '{name}' first, "
                "or merge the sets in the order they run"
            )
        assert owner is not None  # FX models were refused above
        found[qname] = (owner, adapter, _check_module(qname, owner, adapter, name, tied))
    return found


def _merged_weights(module: nn.Module, adapter: Adapter, kind: str
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The new weight and bias in float64; the bias is None where none is needed."""
    down, up, s = adapter.down, adapter.up, adapter.scaling
    m = s * (up.weight.double() @ down.weight.double())  # (out, in): branch(v) = m v + c
    c = s * (up.weight.double() @ down.bias.double() + up.bias.double())
    w = module.weight.detach().double()
    b = None if module.bias is None else module.bias.detach().double()
    if adapter.config.placement == "sequential":
        w = w + (m @ w if kind == "linear" else w @ m.T)
        b = c if b is None else b + m @ b + c
    else:
        w = w + (m if kind == "linear" else m.T)
        b = c if b is None else b + c
    if module.bias is None and not b.any():
        b = None  # the branch adds no constant: the module can stay without a bias
    return w, b


def merge(model: nn.Module, name: str) -> Merged:
    """Fold linear adapter set ``name`` into the weights of the modules it wraps; remove it.

    Afterwards the model computes what it computed with ``name`` active and applied first (to
    float rounding), with no adapter of that set left. Refused, with the reason and before
    anything changes: a set whose activation is not ``"identity"``, a target that is not an
    ``nn.Linear`` or transformers' ``Conv1D``, quantized or tied weights, a fusion, a set that
    a fusion or an active ``average`` uses, an active set that runs after another on some
    module, dropout in train mode, and FX-mode models. A target without a bias gets one when
    the adapter adds a constant. Keep the returned record to ``unmerge``.

    Example:
        >>> import torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
        >>> cfg = adapterkit.AdapterConfig(bottleneck=2, activation="identity",
        ...                                placement="parallel", init="normal", init_std=0.3)
        >>> _ = adapterkit.inject(model, ["0"], cfg, name="lora")
        >>> x = torch.randn(4, 8)
        >>> before = model(x)
        >>> merged = adapterkit.merge(model, "lora")
        >>> type(model[0]) is torch.nn.Linear, torch.allclose(model(x), before, atol=1e-6)
        (True, True)
        >>> _ = adapterkit.unmerge(model, merged)
        >>> adapterkit.active(model), torch.equal(model(x), before)
        (['lora'], True)
    """
    found = _check_set(model, name)
    new = {q: _merged_weights(owner, adapter, kind) for q, (owner, adapter, kind) in found.items()}
    undo = _Undo(
        weights={q: (o.weight.detach().clone(),
                     None if o.bias is None else o.bias.detach().clone())
                 for q, (o, _, _) in found.items()},
        before={q: _versions(o) for q, (o, _, _) in found.items()},
        versions={},
        adapters={q: adapter for q, (_, adapter, _) in found.items()},
        slots={q: slot_of(o) for q, (o, _, _) in found.items()},  # type: ignore[misc]
        slot_order={q: list(slot_of(o).keys()) for q, (o, _, _) in found.items()},  # type: ignore[union-attr]
        active=tuple(state.active(model)),
    )
    added = []
    with torch.no_grad():
        for qname, (owner, _, _) in found.items():
            weight, bias = new[qname]
            owner.weight.copy_(weight)
            if bias is not None and owner.bias is None:
                owner.bias = nn.Parameter(bias.to(owner.weight.dtype),
                                          requires_grad=owner.weight.requires_grad)
                added.append(qname)
            elif bias is not None:
                owner.bias.copy_(bias)
    detach(model, [name])
    undo.versions = {q: _versions(o) for q, (o, _, _) in found.items()}
    owners = {q: o for q, (o, _, _) in found.items()}
    return Merged(name, tuple(found), tuple(added), owners, undo)


def _versions(module: nn.Module) -> tuple[int, int | None]:
    """The versions of a module's weight and bias, seen through exact restores (unmerge)."""
    bias = module.bias
    return state.version_of(module.weight), None if bias is None else state.version_of(bias)


def _check_unmerge(model: nn.Module, merged: Merged) -> None:
    undo, name = merged._undo, merged.name
    if undo.done:
        raise ValueError(f"set '{name}' was already unmerged with this record")
    if name in set_names(model):
        raise ValueError(
            f"cannot unmerge '{name}': the model holds a set of that name again; "
            f"eject(model, '{name}') first"
        )
    modules = dict(model.named_modules())
    for qname, owner in merged._owners.items():
        if modules.get(qname) is not owner:
            raise ValueError(f"cannot unmerge '{name}': '{qname}' is no longer the merged module")
        if _versions(owner) != undo.versions[qname]:
            raise ValueError(
                f"cannot unmerge '{name}': the weights of '{qname}' changed after the merge "
                "(trained or loaded?); restoring the originals would silently drop that change"
            )


def unmerge(model: nn.Module, merged: Merged) -> nn.Module:
    """Undo ``merge`` exactly: original weights back bit for bit, the set's adapters back.

    The adapter objects are the very ones merged (an optimizer over them stays valid), in
    their place in each slot, and the active list is what it was before the merge. Refused if
    the merged weights changed since (``unmerge`` would drop that change) or a set of the same
    name exists again.

    Example: see ``merge``.
    """
    _check_unmerge(model, merged)
    undo, name = merged._undo, merged.name
    with torch.no_grad():
        for qname, owner in merged._owners.items():
            weight, bias = undo.weights[qname]
            owner.weight.copy_(weight)
            if bias is None:
                owner.register_parameter("bias", None)
            else:
                owner.bias.copy_(bias)
            # the weights hold what they held before the merge, bit for bit: an older merge's
            # record (merges stacked on the same modules) may unmerge next
            weight_before, bias_before = undo.before[qname]
            state.note_restored(owner.weight, weight_before)
            if bias_before is not None:
                state.note_restored(owner.bias, bias_before)
    # attach's own path: a slot the merge emptied goes back (the same object), then the set
    slots = {q: wrap(owner, q, undo.slots[q]) for q, owner in merged._owners.items()}
    install_set(model, name, {q: (slot, undo.adapters[q]) for q, slot in slots.items()},
                activate=False)
    for qname, slot in slots.items():
        order = undo.slot_order[qname]
        entries = dict(slot._modules)
        slot._modules.clear()
        for key in [*order, *(k for k in entries if k not in order)]:
            if key in entries:
                slot._modules[key] = entries[key]
    known = set(set_names(model))
    state.set_active(model, tuple(e for e in undo.active
                                  if set([e] if isinstance(e, str) else e.sets) <= known))
    undo.done = True
    return model
