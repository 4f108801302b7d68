"""The public verbs on a model's sets: inject, eject, list, switch, disable and reset them.

``inject`` wraps modules by name (``surgery.attach``); other injection methods (``"fx"``)
register themselves here (``register_method``), so that this layer never imports the modes
built on top of it.

Re-initialising: a model built on ``meta`` gets adapters on ``meta`` too. ``to_empty`` then
gives them uninitialised memory, and a base checkpoint holds no adapter weights:
``reset_adapters`` (or ``load_adapters``) is the step that makes the model the base again (or
the trained model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from itertools import chain
from typing import Literal, NamedTuple

import torch
from torch import nn

from . import state
from .adapter import Adapter
from .config import AdapterConfig
from .select import Targets
from .slot import SLOT, Composition
from .surgery import attach, attach_owned, detach, select, store_active
from .tree import (
    adapted_modules,
    composed_sets,
    original_class,
    require_sets,
    set_names,
    slot_of,
)


class Method(NamedTuple):
    """An injection method other than wrapping modules: how it injects and ejects."""

    inject: Callable[..., nn.Module]
    eject: Callable[[nn.Module, str | None], nn.Module]


_METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> None:
    """Make ``inject(..., method=name)`` available (``adapterkit.fx`` registers ``"fx"``)."""
    _METHODS[name] = method


def inject(
    model: nn.Module,
    targets: Targets,
    config: AdapterConfig | None = None,
    *,
    name: str = "default",
    method: Literal["modules", "fx"] = "modules",
    example_inputs: object = None,
    **fx_options: object,
) -> nn.Module:
    """Wrap every module that ``targets`` selects with an adapter of set ``name``.

    In place: returns ``model`` itself (with ``method="fx"``, a new ``torch.fx.GraphModule``
    sharing the base's parameters; see ``docs/fx.md``). The new set is active at once,
    after the sets already active. On any error the model is left as it was.

    ``example_inputs``: inputs for one run of the model (a tensor: ``model(x)``; a tuple:
    ``model(*x)``; a dict: ``model(**x)``), on fake tensors, that records what every target
    really returns: each adapter's width then comes from the real output, and anything a
    first forward would hit (no tensor where ``output_key`` points, a width or axis that
    does not fit, a target that is never called) is an error here instead.

    Example:
        >>> import torch, adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=50, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.0, N=2).eval()
        >>> x = torch.randint(0, 50, (2, 8))
        >>> before = model(x)
        >>> model = adapterkit.inject(model, ["mha_block", "ffn_block"])
        >>> sorted(adapterkit.adapters(model))[:2]
        ['decoder_blocks.0.ffn_block', 'decoder_blocks.0.mha_block']
        >>> bool(torch.equal(model(x), before))  # zero init: the same function
        True
    """
    config = AdapterConfig() if config is None else config
    if method in _METHODS:
        return _METHODS[method].inject(model, targets, config, name=name,
                                       example_inputs=example_inputs, **fx_options)
    if method != "modules":
        raise ValueError(f"method must be one of {['modules', *_METHODS]}, got {method!r}")
    if fx_options:
        raise TypeError(f"options {sorted(fx_options)} apply only to method='fx'")
    attach(model, expand_presets(model, targets), config, name, example_inputs=example_inputs)
    return model


def own(model: nn.Module, modules: Targets | Mapping[str, nn.Module],
        name: str = "default") -> nn.Module:
    """Give set ``name`` its own copy of each module ``modules`` selects; while the set is
    active, its copy runs instead of the model's module, on the same inputs.

    ``modules`` is a selector of the target grammar (each copy starts as the module is, and
    is trainable), or a dict ``{qualified name: module}`` of replacements (a head with another
    number of labels). The set may already hold adapters, or be new (then it is active at
    once, as ``inject`` makes it). Its modules go with it: ``freeze(train=["adapters:NAME"])``
    trains them, ``save_adapters`` / ``load_adapters`` carry them, ``disabled()`` and other
    sets run the model's own modules, ``routed()`` runs each example through its set's, and
    ``eject`` removes them (the model's modules were never changed). Refused, before the model
    changes: two active sets owning one module, modules that hold adapters inside them,
    overlapping modules, FX-mode models, modules wrapped by torch.distributed.

    Example:
        >>> import torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).eval()
        >>> _ = adapterkit.own(model, {"1": torch.nn.Linear(8, 5)}, name="five_labels")
        >>> x = torch.randn(3, 8)
        >>> model(x).shape  # the new set is active: its head runs
        torch.Size([3, 5])
        >>> with adapterkit.disabled(model):
        ...     model(x).shape
        torch.Size([3, 2])
        >>> adapterkit.set_active(model, [])
        >>> _ = adapterkit.own(model, "1", name="copy")  # another set: a copy of the head
        >>> copied = model(x)
        >>> with adapterkit.disabled(model):
        ...     bool(torch.equal(copied, model(x)))  # a copy starts as the module is
        True
    """
    if isinstance(modules, Mapping):
        given = dict(modules)
    else:
        chosen = select(model, modules)[0]
        given = {q: own_copy(m) for q, m in chosen.items()}
    attach_owned(model, name, given)
    return model


def own_copy(module: nn.Module) -> nn.Module:
    """A trainable copy of ``module`` as the model has it, without adapterkit's slot."""
    copy = deepcopy(module)
    if slot_of(copy) is not None:
        del copy._modules[SLOT]
        copy.__class__ = original_class(copy)
    for p in copy.parameters():
        p.requires_grad_(True)
    return copy


def expand_presets(model: nn.Module, targets: Targets) -> Targets:
    """``"auto"`` / ``"auto:ffn"`` as the architecture's selectors; other targets as given."""
    if isinstance(targets, str) and (targets == "auto" or targets.startswith("auto:")):
        from .presets import auto_targets

        return auto_targets(model, targets)
    return targets


def eject(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter set ``name``, or every set; the original modules come back exactly.

    After ejecting every set, each wrapped module has its own class again, no adapter
    remains in the tree, and ``model.state_dict()`` is the pre-injection one.

    Example:
        >>> import adapterkit
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> keys = list(model.state_dict())
        >>> model = adapterkit.inject(model, ["0"], adapterkit.AdapterConfig(bottleneck=2))
        >>> type(model[0]).__name__, len(adapterkit.adapters(model))
        ('Linear', 1)
        >>> model = adapterkit.eject(model)
        >>> type(model[0]) is nn.Linear, list(model.state_dict()) == keys
        (True, True)
    """
    if name is not None:
        require_sets(model, name)
        check_unused(model, [name], "eject")
    if state.graph_base(model) is not None:  # made by method="fx"
        return _METHODS["fx"].eject(model, name)
    detach(model, set_names(model) if name is None else [name])
    return model


def check_unused(model: nn.Module, names: Sequence[str], verb: str) -> None:
    """Refuse to remove sets that a fusion, or an active composition, still uses."""
    drop = set(names)
    for fusion, sets in composed_sets(model).items():
        used = [s for s in sets if s in drop]
        if used and fusion not in drop:
            raise ValueError(
                f"cannot {verb} set '{used[0]}': fusion '{fusion}' fuses it; "
                f"eject(model, '{fusion}') first"
            )
    for entry in state.active(model):
        if not isinstance(entry, str) and drop & set(entry.sets):
            raise ValueError(
                f"cannot {verb} set '{sorted(drop & set(entry.sets))[0]}': the active {entry} "
                "uses it; set_active(model, [...]) without it first"
            )


def adapters(model: nn.Module, name: str | None = None) -> dict[str, nn.Module]:
    """The injected adapters (and fusions), keyed by the qualified name of the wrapped module.

    With ``name``, only that set's. Without, every set's; when the model holds several sets,
    each key carries its set as a suffix: ``decoder_blocks.0.mha_block[a]``.
    """
    if name is not None:
        require_sets(model, name)
    tag = name is None and len(set_names(model)) > 1
    found: dict[str, nn.Module] = {}
    for qname, _, slot in adapted_modules(model):
        for set_name, adapter in slot.items():
            if name is None or set_name == name:
                found[f"{qname}[{set_name}]" if tag else qname] = adapter
    return found


# What the active list holds: set names, and compositions of sets (``average(...)``): plain
# objects that follow slot.Composition (a fusion module is active by its set name instead).
Entry = str | Composition


def _is_entry(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, Composition)
                                       and not isinstance(value, nn.Module))


def as_entries(names: Entry | Sequence[Entry] | None) -> list[Entry]:
    """``names`` as a list of active-list entries; None is the base model (no entry)."""
    if names is None:
        return []
    if _is_entry(names):
        return [names]  # type: ignore[list-item]
    if not isinstance(names, Sequence):
        raise TypeError(f"give a set name, average(...) or a list of them, got {names!r}")
    bad = [n for n in names if not _is_entry(n)]
    if bad:
        raise TypeError(f"an active entry is a set name or average(...), got {bad[0]!r}")
    return list(names)


def active(model: nn.Module) -> list[Entry]:
    """The active sets, in the order they are applied on a module that holds several."""
    return state.active(model)


def set_active(model: nn.Module, names: Entry | Sequence[Entry]) -> None:
    """Make exactly ``names`` active, applied in that order; ``[]`` runs the base model.

    An entry is a set name (an adapter set or a fusion) or an output average of sets,
    ``average({"a": 0.7, "b": 0.3})`` (see ``docs/composition.md``).

    Example:
        >>> import adapterkit
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> _ = adapterkit.inject(model, ["0"], name="a")
        >>> _ = adapterkit.inject(model, ["0"], name="b")
        >>> adapterkit.set_active(model, ["b"]); adapterkit.active(model)
        ['b']
    """
    store_active(model, as_entries(names))


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block; the active sets come back on exit, error or not."""
    before = state.active(model)
    set_active(model, [])
    try:
        yield model
    finally:
        set_active(model, before)


# -- re-initialising -------------------------------------------------------------------------


def real_device(*modules: nn.Module) -> torch.device | None:
    """The device of the first tensor, in ``modules``, that is not on ``meta``."""
    for module in modules:
        for t in chain(module.parameters(), module.buffers()):
            if not t.is_meta:
                return t.device
    return None


def _selected(model: nn.Module, name: str | None) -> list[tuple[nn.Module, Adapter]]:
    """``(module whose device the adapter takes, adapter)`` for every adapter of ``name``."""
    if name is not None:
        require_sets(model, name)
    return [
        (owner if owner is not None else model, adapter)  # type: ignore[misc]
        for _, owner, slot in adapted_modules(model)
        for set_name, adapter in slot.items()
        if name is None or set_name == name
    ]


def check_not_meta(model: nn.Module, modules: dict[str, nn.Module], what: str) -> None:
    """Refuse ``what`` (e.g. loading adapters) when one of ``modules`` is all on ``meta``:
    weights put there now would be lost at ``to_empty``."""
    on_meta = [name for name, module in modules.items() if real_device(module, model) is None]
    if on_meta:
        raise ValueError(
            f"{what} into a model on the meta device (module '{on_meta[0]}' has no memory): "
            "the weights would be lost at to_empty. Call model.to_empty(device=...) and load "
            "the base weights first"
        )


def materialize(model: nn.Module, name: str | None = None) -> None:
    """Give adapters still on ``meta`` real, uninitialised memory where their module lives.

    Checks every adapter before it moves one: a model whose modules are all on ``meta``
    is refused (the adapters would be lost again at ``to_empty``).
    """
    moves = []
    for home, adapter in _selected(model, name):
        if any(p.is_meta for p in adapter.parameters()):
            device = real_device(home, model)
            if device is None:
                raise ValueError(
                    "the model is on the meta device: call model.to_empty(device=...) and load "
                    "the base weights first, then reset or load the adapters"
                )
            moves.append((adapter, device))
    for adapter, device in moves:
        adapter.to_empty(device=device)


def reset_adapters(model: nn.Module, name: str | None = None) -> nn.Module:
    """Put the adapters of set ``name`` (default: every set) back to their config's init.

    ``down`` is drawn as ``nn.Linear`` draws it and ``up`` follows ``AdapterConfig.init``
    (zero: the model is the base again, exactly). In place: parameters keep their identity,
    so an optimizer over them stays valid. Adapters still on the ``meta`` device get memory on
    the device of the module they wrap first. Returns ``model``.

    Example:
        >>> import torch, adapterkit
        >>> with torch.device("meta"):  # a big model: built without memory
        ...     model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> model = adapterkit.inject(model, ["0"], adapterkit.AdapterConfig(bottleneck=4))
        >>> base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> model = model.to_empty(device="cpu")
        >>> model.load_state_dict(base.state_dict(), strict=False).unexpected_keys
        []
        >>> model = adapterkit.reset_adapters(model)  # else they hold uninitialised memory
        >>> x = torch.randn(3, 8)
        >>> bool(torch.equal(model(x), base(x)))
        True
    """
    selected = _selected(model, name)
    materialize(model, name)
    for _, adapter in selected:
        adapter.reset_parameters()
    return model
