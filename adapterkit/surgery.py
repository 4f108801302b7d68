"""Attaching adapters to a module tree, and the exact inverse.

A wrapped module keeps its identity and its parameters. Two things change, both undone by
``eject``: its class becomes a subclass of its own class whose ``forward`` runs the original
``forward`` and then the module's ``AdapterSlot``; and the slot is registered as its last child,
under ``SLOT``. As in ``torch.nn.utils.parametrize``, nothing else is touched, so a base
``state_dict`` still loads and an optimizer built over the base stays valid.

Every set enters a model through ``install_set`` and leaves it through ``detach``; both end in
``state.sync``, which keeps model-level hooks in step (``attach`` is ``install_set`` on the
modules a selection found; fusions, averaged sets, FX sites and ``unmerge`` use it directly).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any, NamedTuple

from torch import nn

from . import state
from .config import AdapterConfig
from .layout import Layout, adapter_for, infer_layout, parallel_layout, parallel_mismatch
from .probe import Call, observe, observed_layout
from .select import select_modules
from .slot import SLOT, AdapterSlot, Owned, RNNState
from .tree import (
    adapted_class,
    adapted_modules,
    candidates,
    every_name,
    is_adapted,
    is_distributed_wrapper,
    require_sets,
    set_names,
    slot_of,
)

_SET_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def factory_kwargs(module: nn.Module, model: nn.Module) -> dict[str, Any]:
    for source in (module, model):
        for t in (*source.parameters(), *source.buffers()):
            if t.is_floating_point():
                return {"device": t.device, "dtype": t.dtype}
    return {}


def check_set_name(model: nn.Module, name: object) -> None:
    if not isinstance(name, str) or not _SET_NAME.fullmatch(name):
        raise ValueError(
            f"set name must be a non-empty string of letters, digits, '_' or '-', got {name!r}"
        )
    if name in set_names(model):
        raise ValueError(
            f"an adapter set named '{name}' is already injected; pick another name, or "
            f"eject(model, '{name}') first"
        )


def _first_nested(names: list[str]) -> tuple[str, str] | None:
    """The first ``(outer, inner)`` pair, in the order of ``names``, with inner inside outer.

    Looks up each name's ancestors instead of comparing all pairs: a model of a thousand
    blocks has thousands of targets, and the pairwise check took seconds (quadratic).
    """
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for inner in names:
        parts = inner.split(".") if inner else []
        for ancestor in ["", *(".".join(parts[:k]) for k in range(1, len(parts)))]:
            if ancestor != inner and ancestor in index:
                pairs.append((index[ancestor], index[inner]))
    if not pairs:
        return None
    outer, inner = min(pairs)
    return names[outer], names[inner]


def _check_targets(chosen: dict[str, nn.Module], named: list[tuple[str, nn.Module]]) -> None:
    for name, module in chosen.items():
        if type(module).forward is nn.Module.forward:
            raise ValueError(
                f"target '{name}' is a {type(module).__name__}, which has no forward to wrap; "
                "select the modules inside it (e.g. a glob such as "
                f"'{name}.*.mha_block')"
            )
    ids = {id(m) for m in chosen.values()}
    nested = _first_nested([n for n, m in named if id(m) in ids])  # under any of their names
    if nested is not None:
        outer, inner = nested
        raise ValueError(
            f"targets are nested: '{inner}' is inside '{outer or '<root>'}'; an adapter "
            "set wraps non-overlapping modules, so select only one of the two"
        )
    for name, module in chosen.items():
        if not is_adapted(module) and hasattr(module, SLOT):
            raise ValueError(
                f"module '{name}' already has an attribute named '{SLOT}', which adapterkit "
                "needs for its adapters; rename that attribute"
            )


# Built-in layers whose optimised inference paths compute a block without calling the
# submodules inside it, so that adapters there would be skipped in silence. Injection turns
# those paths off on every such ancestor of a wrapped module, and eject turns them back on.
_FAST_PATHS: tuple[tuple[type[nn.Module], str, object], ...] = (
    (nn.TransformerEncoderLayer, "activation_relu_or_gelu", 0),  # fused encoder-layer kernel
    (nn.TransformerEncoder, "use_nested_tensor", False),  # nested-tensor conversion
)
# Children that their parent never calls: it reads their weights directly.
NEVER_CALLED: tuple[tuple[type[nn.Module], str], ...] = ((nn.MultiheadAttention, "out_proj"),)


def _ancestors(model: nn.Module, qname: str) -> list[nn.Module]:
    parts = qname.split(".") if qname else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]


def _check_called(model: nn.Module, qname: str) -> None:
    if not qname:
        return
    parent_name, _, child = qname.rpartition(".")
    parent = model.get_submodule(parent_name)
    for cls, attr in NEVER_CALLED:
        if isinstance(parent, cls) and child == attr:
            raise ValueError(
                f"target '{qname}' is never called: {cls.__name__} uses its weights directly, so "
                f"an adapter there would be skipped; target '{parent_name or '<root>'}' instead"
            )


def _check_not_wrapped(model: nn.Module, qname: str) -> None:
    # Parameters added under fully_shard or DDP after wrapping are neither sharded nor
    # reduced: each rank would train its own adapters and drift apart without an error.
    for module in _ancestors(model, qname):
        if is_distributed_wrapper(type(module)) or isinstance(
            module, nn.parallel.DistributedDataParallel
        ):
            raise ValueError(
                f"target '{qname or '<root>'}' is inside a module already wrapped by "
                f"torch.distributed ({type(module).__name__}); adapters added now would not be "
                "sharded or reduced across ranks. Inject and freeze first, then call "
                "fully_shard / DistributedDataParallel"
            )


def _disable_fast_paths(model: nn.Module, qnames: list[str]) -> None:
    for qname in qnames:
        for module in _ancestors(model, qname):
            for cls, attr, value in _FAST_PATHS:
                if isinstance(module, cls) and getattr(module, attr, value) != value:
                    state.override_setting(module, attr, value)


def _restore_fast_paths(model: nn.Module) -> None:
    still_adapted = [name for name, _, _ in adapted_modules(model)]
    for name, module in candidates(model):
        if state.has_saved_settings(module) and not any(
                a == name or a.startswith(name + ".") or not name for a in still_adapted):
            state.restore_settings(module)


def _check_rnn(qname: str, module: nn.Module, config: AdapterConfig) -> None:
    if not isinstance(module, nn.RNNBase):
        return
    what = f"target '{qname}' is an {type(module).__name__}"
    if config.placement == "parallel":
        raise ValueError(f"{what}, whose input is a sequence of another width (or packed); "
                         "use placement='sequential' there")
    if config.output_key not in (None, 0, (0,)) or config.feature_dim not in (None, -1):
        raise ValueError(
            f"{what}: its adapter adapts the output sequence (output_key=None or 0, features "
            "on the last axis), and adapterkit adds the same change to the last layer's h_n, "
            "which is that sequence's last step, so that the two agree. Adapting h_n or c_n "
            f"alone (output_key={config.output_key!r}) would leave the sequence unadapted; "
            "leave output_key and feature_dim unset"
        )


def select(model: nn.Module, targets: object) -> tuple[dict[str, nn.Module],
                                                       list[tuple[str, nn.Module]]]:
    """The modules ``targets`` selects under any of their names, each once under its first
    name, in model order; and every ``(name, module)`` pair it matched against."""
    named = every_name(model)
    first = {id(m): n for n, m in reversed(named)}
    order = {n: i for i, (n, _) in enumerate(candidates(model))}
    chosen = {first[id(m)]: m for m in select_modules(named, targets).values()}
    return dict(sorted(chosen.items(), key=lambda item: order[item[0]])), named


class Target(NamedTuple):
    """A module that injection would wrap, its adapter's layout, and its calls on
    ``example_inputs`` (None without them)."""

    module: nn.Module
    layout: Layout
    calls: list[Call] | None = None


def resolve(
    model: nn.Module, targets: object, config: AdapterConfig, *,
    example_inputs: object = None, layouts: dict[str, Layout] | None = None,
) -> dict[str, Target]:
    """What injecting ``targets`` would wrap, by qualified name.

    Runs every check that ``attach`` runs before it changes anything, so that ``plan`` (a
    dry run) and ``attach`` refuse the same things. The layouts come from ``layouts`` (a
    saved set's), else from one run on ``example_inputs``, else from the modules themselves.
    """
    if not isinstance(config, AdapterConfig):  # checked here once, for attach and plan
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    chosen, named = select(model, targets)
    _check_targets(chosen, named)
    for qname, module in chosen.items():
        _check_called(model, qname)
        _check_not_wrapped(model, qname)
        _check_rnn(qname, module, config)
    if layouts is not None:
        found = {q: Target(m, layouts[q]) for q, m in chosen.items()}
    elif example_inputs is None:
        found = {q: Target(m, infer_layout(m, config, q, model)) for q, m in chosen.items()}
    else:
        calls = observe(model, chosen, example_inputs)
        found = {q: Target(m, observed_layout(q, m, calls[q], config, model), calls[q])
                 for q, m in chosen.items()}
    if config.placement == "parallel":
        found = {q: t._replace(layout=parallel_layout(t.module, t.layout))
                 for q, t in found.items()}
        for qname, (module, layout, _) in found.items():
            if why := parallel_mismatch(module, layout):
                raise ValueError(
                    f"target '{qname}' ({type(module).__name__}) cannot take a parallel adapter, "
                    f"which adds a branch of the input to the output: {why}; use "
                    "placement='sequential' there"
                )
    return found


def attach(
    model: nn.Module, targets: object, config: AdapterConfig, name: str, *,
    example_inputs: object = None, layouts: dict[str, Layout] | None = None,
) -> list[str]:
    """Wrap every selected module with an adapter of set ``name``; all or nothing.

    Returns the qualified names of the wrapped modules.
    """
    check_set_name(model, name)
    resolved = resolve(model, targets, config, example_inputs=example_inputs, layouts=layouts)
    new_adapters = {
        qname: adapter_for(layout, config, **factory_kwargs(module, model)).train(module.training)
        for qname, (module, layout, _) in resolved.items()
    }
    # Everything that can fail has been checked: change the model now.
    state.record_norm_counts(model)
    try:
        placed = {qname: (wrap(module, qname), new_adapters[qname])
                  for qname, (module, _, _) in resolved.items()}
    except BaseException:
        detach(model, [name])  # all or nothing
        raise
    install_set(model, name, placed, activate=True)
    return list(resolved)


def wrap(module: nn.Module, qname: str, slot: AdapterSlot | None = None) -> AdapterSlot:
    """The slot of ``module``, after giving it one (``slot``, or a new one) if it has none."""
    held = slot_of(module)
    if held is not None:
        return held
    slot = AdapterSlot(qname, RNNState.of(module)) if slot is None else slot
    # a class that refuses the swap (e.g. another memory layout) raises here
    module.__class__ = adapted_class(type(module))
    module._modules[SLOT] = slot
    return slot


def install_set(model: nn.Module, name: str, placed: dict[str, tuple[AdapterSlot, nn.Module]],
                *, activate: bool) -> None:
    """Put set ``name``'s modules (adapters or fusions) into their slots, already in ``model``;
    with ``activate``, run the set after the active ones. Every set enters a model here."""
    for _, (slot, module) in placed.items():
        slot[name] = module
    slots = list({id(slot): slot for slot, _ in placed.values()}.values())
    state.join(model, slots)
    owners = [key for key, owner, slot in adapted_modules(model) if owner is not None
              and any(slot is s for s in slots)]
    _disable_fast_paths(model, owners)
    if activate:
        state.set_active(model, (*state.active(model), name))
    state.sync(model)


def detach(model: nn.Module, names: Collection[str]) -> None:
    """Remove the sets ``names``; a module that holds no adapter any more gets its class back.

    All or nothing: every refusal is checked before the first set is touched.
    """
    drop = set(names)
    for qname, module, slot in adapted_modules(model):
        # A module whose class was swapped again after injection (fully_shard's FSDP<Cls>)
        # cannot get its own class back without dropping that wrapper, which also holds the
        # adapters' parameters: refuse before anything changes.
        hit = sorted(drop & set(slot.keys()))
        if module is not None and hit and (
            type(module) is not adapted_class(module._adapterkit_base)  # type: ignore[attr-defined]
        ):
            raise ValueError(
                f"cannot eject set '{hit[0]}' from '{qname}': its class was swapped again after "
                f"injection (to {type(module).__name__}, as fully_shard does), and restoring "
                "the original class would drop that wrapper. Eject from an unsharded model, "
                "or run the base with adapterkit.disabled(model)"
            )
    for _, module, slot in adapted_modules(model):
        for set_name in drop & set(slot.keys()):
            del slot[set_name]
        if len(slot) == 0 and module is not None:
            del module._modules[SLOT]
            module.__class__ = module._adapterkit_base  # type: ignore[attr-defined]
    _restore_fast_paths(model)
    state.set_active(model, tuple(n for n in state.active(model) if n not in drop))
    state.sync(model)


def attach_owned(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> None:
    """Give set ``name`` the modules ``{qualified name: its own module}``, each to run instead
    of the model's module of that name while the set is active; all checks first."""
    if state.graph_base(model) is not None:
        raise ValueError("own() needs modules to wrap: a GraphModule from method='fx' runs its "
                         "graph, so a set's own module there would never run; use "
                         "method='modules' (the default) for sets that own modules")
    if name not in set_names(model):
        check_set_name(model, name)
    found = dict(candidates(model))
    missing = [q for q in modules if q not in found]
    if missing:
        raise ValueError(f"own(): the model has no module named '{missing[0]}'")
    for qname, replacement in modules.items():
        module = found[qname]
        if not isinstance(replacement, nn.Module):
            raise TypeError(f"own(): '{qname}' maps to {type(replacement).__name__}, not a "
                            "module")
        if type(module).forward is nn.Module.forward:
            raise ValueError(f"own(): '{qname}' is a {type(module).__name__}, which has no "
                             "forward to run instead; select the modules inside it")
        if any(is_adapted(m) for n, m in candidates(module) if n):
            raise ValueError(f"own(): '{qname}' holds modules wrapped with adapters; a set's "
                             "own copy would leave them out: own the modules inside it")
        slot = slot_of(module)
        if slot is not None and name in slot:
            what = "owns it already" if isinstance(slot[name], Owned) else "has an adapter there"
            raise ValueError(f"own(): set '{name}' {what} ('{qname}'); eject(model, '{name}') "
                             "first, or give the module to another set")
        _check_called(model, qname)
        _check_not_wrapped(model, qname)
    named = [(n, found[n]) for n in modules] + [
        (key, owner) for key, owner, slot in adapted_modules(model) if slot.owners]
    nested = _first_nested([n for n, _ in named])
    if nested is not None:
        raise ValueError(f"own(): '{nested[1]}' is inside '{nested[0] or '<root>'}', which a "
                         "set owns too; a set's modules must not overlap")
    new_set = name not in set_names(model)
    if new_set or name in state.active(model):  # a new set is active at once, as inject's
        _check_owners(model, [*state.active(model)], extra={q: name for q in modules})
    state.record_norm_counts(model)
    try:
        placed = {q: (wrap(found[q], q), Owned(m)) for q, m in modules.items()}
    except BaseException:
        detach(model, [name] if new_set else [])  # all or nothing
        raise
    install_set(model, name, placed, activate=new_set)


def _check_owners(model: nn.Module, entries: list[Any],
                  extra: dict[str, str] | None = None) -> None:
    """Refuse entries that run two sets owning one module, or compositions of sets that own
    modules (an average mixes branches; an owned module is no branch)."""
    active = [e for e in entries if isinstance(e, str)]
    mixed = {s for e in entries if not isinstance(e, str) for s in e.sets}
    for key, _, slot in adapted_modules(model):
        owners = [s for s in active if s in slot.owners] + (
            [extra[key]] if extra and key in extra else [])
        if len(set(owners)) > 1:
            raise ValueError(
                f"sets {sorted(set(owners))} both own module '{key}', and only one module can "
                "run there: activate one of them, or route them to different examples with "
                "adapterkit.routed()"
            )
        if mixed & slot.owners:
            raise ValueError(
                f"set '{sorted(mixed & slot.owners)[0]}' owns module '{key}', and an average or "
                "fusion mixes the sets' adapters only: activate that set on its own instead"
            )


def check_entries(model: nn.Module, names: list[Any],
                  once: str = "each set may be active once") -> tuple[Any, ...]:
    """``names`` as a tuple of entries to run, each an injected set's name or a composition
    (compose/averaging.py) that checks its own sets; an error for an unknown or repeated one."""
    require_sets(model, [n for n in names if isinstance(n, str)])
    if len(set(names)) != len(names):
        raise ValueError(f"{once}, got {names}")
    for entry in names:
        if not isinstance(entry, str):
            entry.check(model)
    _check_owners(model, names)
    return tuple(names)


def store_active(model: nn.Module, names: list[Any]) -> None:
    """Make ``names`` active: set names, or compositions (compose/averaging.py) that check
    their sets."""
    state.set_active(model, check_entries(model, names))
