"""Re-initialising adapters: back to their config's init, and off the ``meta`` device.

A model built on ``meta`` gets adapters on ``meta`` too. ``to_empty`` then gives them
uninitialised memory, and a base checkpoint holds no adapter weights: ``reset_adapters`` (or
``load_adapters``) is the step that makes the model the base again (or the trained model).
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from .adapter import Adapter
from .tree import adapted_modules, set_names


def real_device(*modules: nn.Module) -> torch.device | None:
    """The device of the first tensor, in ``modules``, that is not on ``meta``."""
    for module in modules:
        for t in chain(module.parameters(), module.buffers()):
            if not t.is_meta:
                return t.device
    return None


def _selected(model: nn.Module, name: str | None) -> list[tuple[nn.Module, Adapter]]:
    """``(module whose device the adapter takes, adapter)`` for every adapter of ``name``."""
    known = set_names(model)
    if name is not None and name not in known:
        raise ValueError(f"no adapter set named {name!r}; injected sets: {known}")
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
