"""Model-wide state: what adapterkit keeps about a whole adapted model, in one place.

Only this module reads or writes it; every other module asks through the functions below.

- ``ModelState``: the active list (set names and compositions, in the order they run), the
  last freeze spec applied, the modules each set is saved with (``includes``), and the route
  of an ``adapterkit.routed()`` block. One object is shared by every slot of a model, so a
  slot reads it at each forward without a walk.
- The module an FX-mode ``GraphModule`` was traced from (``graph_base``).
- The BatchNorm step counters at the first injection (``norms_updated``).
- The fast-path settings of torch layers turned off while adapters sit inside them.
- Attributes set on a model instance over its class's methods (transformers'
  ``save_pretrained``), and the hooks that keep such model-level behaviour in step with the
  sets: every path that adds or removes sets ends in ``sync(model)``, which runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .config import FreezeSpec
from .slot import AdapterSlot
from .tree import adapted_modules, candidates, set_names


@dataclass(eq=False)
class ModelState:
    """The state every slot of one model shares."""

    active: tuple[Any, ...] = ()  # set names and compositions (average(...)), in run order
    freeze_spec: FreezeSpec | None = None  # the last spec applied, saved with the sets
    route: Any = None  # inside adapterkit.routed(): a compose.routing.Route
    # {set: the include= it is saved with}, as AdapterCheckpointCallback records it at the start
    # of training, so that save_pretrained's bundle and save_adapters save the set the same way
    includes: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _states(model: nn.Module) -> list[ModelState]:
    """The distinct states of the slots under ``model``, in model order (usually one)."""
    found: dict[int, ModelState] = {}
    for _, _, slot in adapted_modules(model):
        if slot.shared is not None:  # None: a slot being made, not joined yet
            found.setdefault(id(slot.shared), slot.shared)
    return list(found.values())


def join(model: nn.Module, slots: list[AdapterSlot]) -> None:
    """Give ``slots`` (new to ``model``, or back in it) the state the model's others share."""
    ids = {id(s) for s in slots}
    others = [slot for _, _, slot in adapted_modules(model) if id(slot) not in ids]
    shared = next((s.shared for s in others if s.shared is not None), None)
    shared = shared or slots[0].shared or ModelState()
    for slot in slots:
        slot.shared = shared


def active(model: nn.Module) -> list[Any]:
    """The active list: set names and compositions, in the order they run."""
    states = _states(model)
    return list(states[0].active) if states else []


def set_active(model: nn.Module, entries: tuple[Any, ...]) -> None:
    """Make ``entries`` the active list (already checked by the caller)."""
    for shared in _states(model):
        shared.active = tuple(entries)


def freeze_spec(model: nn.Module) -> FreezeSpec | None:
    states = _states(model)
    return states[0].freeze_spec if states else None


def set_freeze_spec(model: nn.Module, spec: FreezeSpec) -> None:
    for shared in _states(model):
        shared.freeze_spec = spec


def includes(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """``{set: the modules it is saved with}`` for the sets that have them recorded."""
    states = _states(model)
    return dict(states[0].includes) if states else {}


def set_includes(model: nn.Module, name: str, include: Sequence[str]) -> None:
    """Record that set ``name`` is saved with the modules ``include`` selects (a save's
    ``include=``); kept while the model holds the set."""
    for shared in _states(model):
        shared.includes[name] = tuple(include)


def route(model: nn.Module) -> Any:
    """The route of the ``routed()`` block the model is in, or None."""
    return next((s.route for s in _states(model) if s.route is not None), None)


def set_route(model: nn.Module, value: Any) -> None:
    for shared in _states(model):
        shared.route = value


# -- FX mode ----------------------------------------------------------------------------------

_GRAPH_BASE = "_adapterkit_fx_base"
# GraphModule.__deepcopy__ sets the attributes named here on the copy
_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY",
                     "_user_preserved_attributes")


def graph_base(model: nn.Module) -> Any:
    """What an FX-mode ``GraphModule`` was made from (its ``TraceState``), else None."""
    return model.__dict__.get(_GRAPH_BASE)


def set_graph_base(gm: fx.GraphModule, base: Any) -> None:
    gm.__dict__[_GRAPH_BASE] = base
    gm.meta[_PRESERVED] = {_GRAPH_BASE: base}  # kept by deepcopy


def drop_graph_base(gm: fx.GraphModule) -> Any:
    gm.meta.pop(_PRESERVED, None)
    return gm.__dict__.pop(_GRAPH_BASE)


# -- BatchNorm statistics ----------------------------------------------------------------------

# BatchNorm layers update their running statistics in every forward in train mode, frozen or
# not, and an adapter file does not hold them: save_adapters compares their step counters with
# those at injection, so that adapters trained against other statistics are not saved alone.
_NORM_COUNTS = "_adapterkit_norm_counts"


def _norm_counts(model: nn.Module) -> dict[str, int]:
    return {name: int(m.num_batches_tracked) for name, m in candidates(model)
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.num_batches_tracked is not None and not m.num_batches_tracked.is_meta}


def record_norm_counts(model: nn.Module) -> None:
    """Note the BatchNorm step counters, at the first injection only."""
    if _NORM_COUNTS not in model.__dict__:
        model.__dict__[_NORM_COUNTS] = _norm_counts(model)


def norms_updated(model: nn.Module) -> list[str]:
    """The BatchNorm layers whose running statistics changed since adapters were injected."""
    before = model.__dict__.get(_NORM_COUNTS, {})
    return [name for name, count in _norm_counts(model).items()
            if name in before and before[name] != count]


# -- settings and methods on a module instance -----------------------------------------------

_SAVED = "_adapterkit_saved_settings"


def override_setting(module: nn.Module, attr: str, value: object) -> None:
    """Set ``module.attr`` to ``value``, keeping the first original for ``restore_settings``."""
    module.__dict__.setdefault(_SAVED, {}).setdefault(attr, getattr(module, attr))
    setattr(module, attr, value)


def has_saved_settings(module: nn.Module) -> bool:
    return bool(module.__dict__.get(_SAVED))


def restore_settings(module: nn.Module) -> None:
    for attr, value in module.__dict__.pop(_SAVED, {}).items():
        setattr(module, attr, value)


def instance_method(model: nn.Module, name: str) -> Any:
    """What the instance sets over its class's method ``name`` (None: nothing)."""
    return model.__dict__.get(name)


def set_instance_method(model: nn.Module, name: str, fn: Callable[..., Any] | None) -> None:
    """Set (or with None, remove) an instance attribute over the class's method ``name``."""
    if fn is None:
        model.__dict__.pop(name, None)
    else:
        model.__dict__[name] = fn


# -- what a weight's version stands for --------------------------------------------------------

# unmerge puts weights back bit for bit with an in-place copy, which bumps their version
# counter: it notes here that the new version holds what an older one held, so that a merge
# recorded before (merges stacked on the same modules) still recognises its weights.
_SAME_AS = "_adapterkit_same_as"


def note_restored(t: torch.Tensor, as_of: int) -> None:
    """``t`` now holds exactly what it held at version ``as_of``."""
    t.__dict__.setdefault(_SAME_AS, {})[t._version] = as_of


def version_of(t: torch.Tensor) -> int:
    """``t``'s version counter, mapped back through exact restores."""
    version, same = t._version, t.__dict__.get(_SAME_AS, {})
    while version in same:
        version = same[version]
    return version


# -- keeping model-level behaviour in step with the sets -------------------------------------

Sync = Callable[[nn.Module], None]
_SYNCS: list[Sync] = []


def on_sets_changed(fn: Sync) -> Sync:
    """Register ``fn(model)`` to run after every change of a model's sets (a decorator).

    Layers above the engine's core register here (the ``save_pretrained`` hook, the
    input-embedding hook under gradient checkpointing), so the core never imports them.
    """
    _SYNCS.append(fn)
    return fn


def sync(model: nn.Module) -> None:
    """Bring the model-wide state and hooks in step with the sets the model now holds.

    Every path that adds or removes sets ends here: inject, load, eject, merge, unmerge,
    fuse, average_sets, and FX mode's inject and eject.
    """
    if not adapted_modules(model):
        model.__dict__.pop(_NORM_COUNTS, None)
    held = set(set_names(model))
    for shared in _states(model):  # an ejected set's include is not a new set's of its name
        shared.includes = {n: inc for n, inc in shared.includes.items() if n in held}
    for fn in _SYNCS:
        fn(model)
