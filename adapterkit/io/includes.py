"""The modules saved with an adapter set (a save's ``include=``): which, and their tensors.

``include=None`` (the default of ``save_adapters``) means the modules recorded for the set
(``AdapterCheckpointCallback`` records its ``include`` at the start of training), else none;
either way, a freeze spec that trains modules outside the file is refused, naming them, so that
a trained head is never dropped without a word. An explicit ``include`` (``[]`` too) is the
caller's choice and is taken as it is.

An included module that holds adapters is saved without them: a key with a path component
``SLOT`` belongs to adapterkit's slot, whose sets are saved as sets, so that the file loads
into a plain base and into one that already holds the set alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import state
from ..freezing import select_parameters
from ..slot import SLOT
from ..surgery import select
from ..tree import adapted_modules, candidates


def as_include(include: Sequence[str] | str) -> tuple[str, ...]:
    """One string is one entry, not a list of characters."""
    return (include,) if isinstance(include, str) else tuple(include)


def included_modules(model: nn.Module, include: Sequence[str]) -> dict[str, nn.Module]:
    """The modules a save's ``include`` selects, by name (each once); an error if an entry
    selects nothing."""
    return select(model, list(include))[0] if include else {}


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without the tensors of adapterkit's slots inside it."""
    return {k: t for k, t in module.state_dict().items() if SLOT not in k.split(".")}


def _own_parameters(module: nn.Module) -> set[int]:
    """The ids of a module's parameters outside adapterkit's slots (what ``module_state`` holds)."""
    return {id(p) for _, sub in candidates(module) for p in sub.parameters(recurse=False)}


def _selected(model: nn.Module, entry: str) -> set[int]:
    try:
        return select_parameters(model, entry)
    except ValueError:  # the model changed since the spec was applied (a set ejected)
        return set()


def _holders(model: nn.Module, ids: set[int]) -> list[str]:
    """Module names whose ``include`` covers ``ids``: the outermost modules all of whose
    parameters are in ``ids``, then the owner of any parameter still left."""
    names: list[str] = []
    covered: set[int] = set()
    for name, module in candidates(model):
        own = _own_parameters(module)
        if name and own and own <= ids and not own <= covered:
            names.append(name)
            covered |= own
    for name, module in candidates(model):
        own = {id(p) for p in module.parameters(recurse=False)}
        if name and own & (ids - covered):
            names.append(name)
            covered |= own
    return names


def _include_for(model: nn.Module, left: dict[str, set[int]]) -> list[str]:
    """What ``include`` would hold the parameters each entry leaves out: the modules the entry
    names when it names modules that hold them (``"lm_head"``, though its weight is tied to
    the embedding), else ``_holders`` (``"cls.bias"`` -> ``cls``); each once, outermost only,
    in model order."""
    names: list[str] = []
    for entry, ids in left.items():
        try:
            chosen = included_modules(model, [entry])
        except ValueError:  # a parameter name, or a selector of parameters only
            chosen = {}
        own = set().union(*map(_own_parameters, chosen.values()))
        names += list(chosen) if chosen and ids <= own else _holders(model, ids)
    order = {name: i for i, (name, _) in enumerate(candidates(model))}
    unique = sorted(set(names), key=lambda n: order.get(n, len(order)))
    return [n for n in unique if not any(n.startswith(o + ".") for o in unique)]


def left_out(model: nn.Module, include: Sequence[str]) -> tuple[list[str], list[str]]:
    """The train entries of the model's freeze spec that select parameters a file with
    ``include`` would not hold (adapters and what ``freeze`` takes back left aside), and the
    modules an ``include`` would name to hold them."""
    spec = state.freeze_spec(model)
    if spec is None:
        return [], []
    adapters = {id(p) for _, _, slot in adapted_modules(model) for p in slot.parameters()}
    held = set().union(*map(_own_parameters, included_modules(model, include).values()))
    frozen = set().union(*(_selected(model, e) for e in spec.freeze))
    left: dict[str, set[int]] = {}
    for entry in spec.train:
        if entry == "adapters" or entry.startswith("adapters:"):
            continue
        ids = _selected(model, entry) - adapters - frozen - held
        if ids:
            left[entry] = ids
    return list(left), _include_for(model, left)


def resolve_include(model: nn.Module, name: str, include: Sequence[str] | str | None,
                    who: str = "save_adapters") -> tuple[str, ...]:
    """The modules set ``name`` is saved with: ``include`` when given, else those recorded
    for the set (else none), refused when the freeze spec trains modules outside them.

    Raises:
        ValueError: ``include`` is None and the freeze spec trains modules the file would not
            hold; the message names them and both fixes (``include=[...]``, ``include=[]``).
    """
    if include is not None:
        return as_include(include)
    recorded = state.includes(model).get(name, ())
    entries, modules = left_out(model, recorded)
    if entries:
        also = f" (recorded for the set: include={list(recorded)!r})" if recorded else ""
        raise ValueError(
            f"{who}: the freeze spec trains {entries} (modules {modules}) beside the adapters, "
            f"and the file of set {name!r} would not hold them{also}: loaded into a fresh "
            "base, the adapters would run without what trained with them. Save them with the "
            f"set ({who}(..., include={list(recorded) + modules!r})), or save the adapters "
            "alone (include=[])"
        )
    return recorded
