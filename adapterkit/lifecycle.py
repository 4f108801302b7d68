"""The public verbs on a model: inject, eject, list, switch and disable adapter sets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

from torch import nn

from .adapter import Adapter
from .average import Average
from .config import AdapterConfig
from .fusion import AdapterFusion, fusion_users
from .select import Targets
from .surgery import attach, current_active, detach, store_active
from .tree import adapted_modules, set_names


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
    if method == "fx":
        from .fx import inject_fx

        return inject_fx(model, targets, config, name=name, example_inputs=example_inputs,
                         **fx_options)
    if method != "modules":
        raise ValueError(f"method must be 'modules' or 'fx', got {method!r}")
    if fx_options:
        raise TypeError(f"options {sorted(fx_options)} apply only to method='fx'")
    attach(model, expand_presets(model, targets), config, name, example_inputs=example_inputs)
    return model


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
    known = set_names(model)
    if name is not None:
        if name not in known:
            raise ValueError(f"no adapter set named {name!r}; injected sets: {known}")
        check_unused(model, [name], "eject")
    if getattr(model, "_adapterkit_fx_base", None) is not None:  # made by method="fx"
        from .fx import eject_fx

        return eject_fx(model, name)
    detach(model, known if name is None else [name])
    return model


def check_unused(model: nn.Module, names: Sequence[str], verb: str) -> None:
    """Refuse to remove sets that a fusion, or an active composition, still uses."""
    drop = set(names)
    for fusion, sets in fusion_users(model).items():
        used = [s for s in sets if s in drop]
        if used and fusion not in drop:
            raise ValueError(
                f"cannot {verb} set '{used[0]}': fusion '{fusion}' fuses it; "
                f"eject(model, '{fusion}') first"
            )
    for entry in current_active(model):
        if not isinstance(entry, str) and drop & set(entry.sets):
            raise ValueError(
                f"cannot {verb} set '{sorted(drop & set(entry.sets))[0]}': the active {entry} "
                "uses it; set_active(model, [...]) without it first"
            )


def adapters(model: nn.Module, name: str | None = None) -> dict[str, Adapter | AdapterFusion]:
    """The injected adapters (and fusions), keyed by the qualified name of the wrapped module.

    With ``name``, only that set's. Without, every set's; when the model holds several sets,
    each key carries its set as a suffix: ``decoder_blocks.0.mha_block[a]``.
    """
    known = set_names(model)
    if name is not None and name not in known:
        raise ValueError(f"no adapter set named {name!r}; injected sets: {known}")
    tag = name is None and len(known) > 1
    found: dict[str, Adapter | AdapterFusion] = {}
    for qname, _, slot in adapted_modules(model):
        for set_name, adapter in slot.items():
            if name is None or set_name == name:
                found[f"{qname}[{set_name}]" if tag else qname] = adapter  # type: ignore[assignment]
    return found


# What the active list holds: set names, and compositions of sets (``average(...)``).
Entry = str | Average


def as_entries(names: Entry | Sequence[Entry] | None) -> list[Entry]:
    """``names`` as a list of active-list entries; None is the base model (no entry)."""
    if names is None:
        return []
    if isinstance(names, (str, Average)):
        return [names]
    if not isinstance(names, Sequence):
        raise TypeError(f"give a set name, average(...) or a list of them, got {names!r}")
    bad = [n for n in names if not isinstance(n, (str, Average))]
    if bad:
        raise TypeError(f"an active entry is a set name or average(...), got {bad[0]!r}")
    return list(names)


def active(model: nn.Module) -> list[Entry]:
    """The active sets, in the order they are applied on a module that holds several."""
    return current_active(model)


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
    before = current_active(model)
    set_active(model, [])
    try:
        yield model
    finally:
        set_active(model, before)
