"""Averaging adapter sets: their outputs at run time (``average``), or their parameters into a
new set (``average_sets``).

Output averaging is a composition, an entry of the active list: at every module, the output is
``h + sum_s w_s * branch_s`` over the averaged sets that wrap the module, where ``h`` is the
module's output and ``branch_s`` what set ``s`` alone adds to it. With weights that sum to 1
(required) this is ``sum_s w_s * output_s``, the weighted mean of what each set alone computes
there; a set that does not wrap a module adds nothing there. Its inverse is ``set_active``.

Parameter averaging builds a new set whose every tensor is ``sum_s w_s * tensor_s``; the
sets must have the same targets and configs. Its inverse is ``eject(model, name)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..slot import Composition
from ..surgery import check_set_name, install_set
from ..tree import adapted_modules, require_sets, set_slots

_TOLERANCE = 1e-6  # how far from 1 the weights may sum (decimal weights rarely sum exactly)


def _weights(weights: Mapping[str, float], what: str, *,
             sum_to_one: bool) -> tuple[tuple[str, float], ...]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{what} takes a non-empty dict {{set name: weight}}, got {weights!r}")
    for name, w in weights.items():
        if not isinstance(name, str):
            raise ValueError(f"{what}: set names are strings, got {name!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"{what}: the weight of '{name}' must be a finite number, got {w!r}")
    total = sum(weights.values())
    if sum_to_one and abs(total - 1.0) > _TOLERANCE:
        scaled = {k: round(v / total, 6) for k, v in weights.items()} if total else None
        hint = f", e.g. {scaled}" if scaled else ""
        raise ValueError(
            f"{what}: weights must sum to 1, these sum to {total:g}; a sum other than 1 would "
            f"scale the base model's output too. Give weights that sum to 1{hint}"
        )
    return tuple((k, float(v)) for k, v in weights.items())


@dataclass(frozen=True)
class Average:
    """An active-list entry: the weighted mean of sets' outputs at every module.

    Build it with ``average({...})``. ``str()`` is how ``active(model)`` shows it.
    """

    weights: tuple[tuple[str, float], ...]

    @property
    def sets(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)

    def __str__(self) -> str:
        return f"average({dict(self.weights)})"

    __repr__ = __str__

    def check(self, model: nn.Module) -> None:
        """Refuse sets the model lacks, and fusions (which have no branch to weigh)."""
        require_sets(model, list(self.sets), f"{self}: ")
        for _, _, slot in adapted_modules(model):
            fused = [s for s in self.sets if s in slot and isinstance(slot[s], Composition)]
            if fused:
                raise ValueError(f"{self}: '{fused[0]}' is a fusion; average adapter sets only")

    # -- the composition protocol of AdapterSlot ----------------------------------------------

    def present(self, slot: Any) -> bool:
        return any(name in slot for name in self.sets)

    def output_key(self, slot: Any) -> Any:
        keys = {slot[name].config.output_key for name in self.sets if name in slot}
        if len(keys) > 1:
            raise ValueError(
                f"{self} at module '{slot.target_name}': the sets adapt different outputs "
                f"(output_key {sorted(map(repr, keys))}); average sets that adapt the same one"
            )
        return keys.pop()

    def delta(self, slot: Any, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        total = None
        for name, w in self.weights:
            if name in slot:
                part = w * slot.delta(name, slot[name], hidden, args, kwargs)
                total = part if total is None else total + part
        return torch.zeros_like(hidden) if total is None else total


def average(weights: Mapping[str, float]) -> Average:
    """Output averaging, as an entry of the active list: ``set_active(model, average({...}))``.

    At each module, the output is ``sum_s w_s * output_s``: the weighted mean of what each set
    alone computes there (a set that does not wrap the module counts as the identity there).
    Weights must sum to 1. It can be stacked with other sets (``[average(...), "c"]``) and used
    per example in ``routed``.

    Example:
        >>> import torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
        >>> cfg = adapterkit.AdapterConfig(bottleneck=2, init="normal", init_std=0.5)
        >>> for name in ["a", "b"]:
        ...     _ = adapterkit.inject(model, ["0"], cfg, name=name)
        >>> x = torch.randn(3, 4)
        >>> outputs = {}
        >>> for name in ["a", "b"]:
        ...     adapterkit.set_active(model, name)
        ...     outputs[name] = model(x)
        >>> adapterkit.set_active(model, adapterkit.average({"a": 0.7, "b": 0.3}))
        >>> adapterkit.active(model)
        [average({'a': 0.7, 'b': 0.3})]
        >>> torch.allclose(model(x), 0.7 * outputs["a"] + 0.3 * outputs["b"], atol=1e-6)
        True
    """
    return Average(_weights(weights, "average", sum_to_one=True))


# -- parameter averaging -------------------------------------------------------------------------


def _check_same(model: nn.Module, sets: tuple[str, ...]) -> dict[str, Any]:
    """The slots of the first set, once every set is known to match it in targets and shapes."""
    require_sets(model, list(sets), "average_sets: ")
    first = sets[0]
    slots = {key: slot for key, (_, slot) in set_slots(model, first).items()}
    for other in sets[1:]:
        theirs = set_slots(model, other)
        if set(theirs) != set(slots):
            only = sorted(set(slots) ^ set(theirs))
            raise ValueError(
                f"average_sets: sets '{first}' and '{other}' wrap different modules (only one "
                f"of them wraps {only[:3]}); parameter averaging needs the same targets. "
                "Use output averaging instead: set_active(model, average({...}))"
            )
    for key, slot in slots.items():
        mine = slot[first]
        if not isinstance(mine, Adapter):
            raise ValueError(f"average_sets: '{first}' is a fusion; average adapter sets only")
        for other in sets[1:]:
            theirs = slot[other]
            if not isinstance(theirs, Adapter):
                raise ValueError(f"average_sets: '{other}' is a fusion; average adapter sets only")
            _check_config(first, other, mine, theirs)
            shapes = {k: v.shape for k, v in mine.state_dict().items()}
            other_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
            if shapes != other_shapes or getattr(mine, "feature_dim", -1) != getattr(
                    theirs, "feature_dim", -1):
                raise ValueError(
                    f"average_sets: at module '{key}' the adapters of '{first}' and '{other}' "
                    f"have different shapes or feature axes ({dict(shapes)} vs "
                    f"{dict(other_shapes)})"
                )
    return slots


def _check_config(first: str, other: str, mine: Adapter, theirs: Adapter) -> None:
    # init and init_std only say how training started: they do not change what a set computes
    a = dataclasses.replace(mine.config, init="zeros", init_std=0.0)
    b = dataclasses.replace(theirs.config, init="zeros", init_std=0.0)
    if a != b:
        diff = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
        field = diff[0]
        raise ValueError(
            f"average_sets: sets '{first}' and '{other}' differ in {field} "
            f"({getattr(a, field)!r} vs {getattr(b, field)!r}); averaging parameters is only "
            "meaningful for sets of the same config"
        )


def average_sets(model: nn.Module, weights: Mapping[str, float], name: str) -> nn.Module:
    """Add set ``name`` whose every parameter is the weighted sum of the sets' parameters.

    The sets must wrap the same modules with the same config (``init`` aside) and shapes;
    anything else is refused, with the reason, before the model changes. Any finite weights
    are taken: weights that sum to 1 average the sets, others (a negative weight, a sum other
    than 1) give task arithmetic, as PEFT's ``add_weighted_adapter`` allows. The new set is not
    active (``set_active(model, name)``); ``eject(model, name)`` removes it again. Unlike
    output averaging, parameter averaging is not the mean of the sets' outputs, whatever the
    activation: even an ``"identity"`` branch ``scaling * up(down(x))`` is bilinear in ``up``
    and ``down``, so averaging each of them does not average their product. It is a new
    adapter.

    Example:
        >>> import torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> cfg = adapterkit.AdapterConfig(bottleneck=2, init="normal")
        >>> for name in ["a", "b"]:
        ...     _ = adapterkit.inject(model, ["0"], cfg, name=name)
        >>> _ = adapterkit.average_sets(model, {"a": 0.5, "b": 0.5}, name="ab")
        >>> a, b, ab = (adapterkit.adapters(model, n)["0"] for n in ["a", "b", "ab"])
        >>> torch.allclose(ab.up.weight, (a.up.weight + b.up.weight) / 2)
        True
        >>> adapterkit.active(model)
        ['a', 'b']
    """
    pairs = _weights(weights, "average_sets", sum_to_one=False)
    sets = tuple(s for s, _ in pairs)
    check_set_name(model, name)
    slots = _check_same(model, sets)
    new: dict[str, Adapter] = {}
    for key, slot in slots.items():
        adapter = copy.deepcopy(slot[sets[0]])  # the same layout, dtype, device and mode
        with torch.no_grad():
            for pname, t in adapter.state_dict().items():
                t.copy_(sum(w * slot[s].state_dict()[pname].double() for s, w in pairs))
        for p in adapter.parameters():  # trainable, as a freshly injected set
            p.requires_grad_(True)
            p.grad = None
        new[key] = adapter
    # everything is checked and built: change the model now
    install_set(model, name, {key: (slot, new[key]) for key, slot in slots.items()},
                activate=False)
    return model
