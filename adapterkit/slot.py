"""The container that holds a wrapped module's adapters and applies them to its output.

A wrapped module gets one ``AdapterSlot`` child, registered under ``SLOT`` ("adapterkit"), with
one adapter per set. Its parameters therefore appear as
``<module>.adapterkit.<set>.down.weight`` and no base key changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .config import FreezeSpec

SLOT = "adapterkit"
# What counts as a hidden state: a tensor, or torch.fx's stand-in for one while tracing (so
# that a traced model keeps its adapters rather than passing the output through).
TENSOR_LIKE = (torch.Tensor, torch.fx.Proxy)


class AdapterSlot(nn.ModuleDict):
    """The adapters of one wrapped module, keyed by set name, and the order they run in."""

    def __init__(self, target_name: str) -> None:
        super().__init__()
        self.target_name = target_name  # for error messages only
        # The model-wide list of active sets (and compositions, such as average(...)); every
        # slot holds the same tuple and applies those of its own adapters that it names, in
        # that order.
        self.active: tuple[Any, ...] = ()
        self.freeze_spec: FreezeSpec | None = None  # the last spec applied, saved with sets
        self.route: Any = None  # set inside adapterkit.routed(): a routing.Route

    def run(self, output: Any, args: tuple, kwargs: dict) -> Any:
        if self.route is not None:  # adapterkit.routed(): each example its own sets
            return self.route.run(self, output, args, kwargs)
        return self.apply_entries(self.active, output, args, kwargs)

    def apply_entries(self, entries: tuple, output: Any, args: tuple, kwargs: dict) -> Any:
        """Apply ``entries`` (set names, or compositions such as ``average(...)``) in order;
        an entry with nothing at this module passes the output through."""
        for entry in entries:
            module = self.entry(entry)
            if module is not None:
                output = self._apply_one(str(entry), module, output, args, kwargs)
        return output

    def entry(self, entry: Any) -> Any:
        """What runs ``entry`` here: its ``Adapter`` or fusion module, a composition that has
        a set here, or None."""
        if isinstance(entry, str):
            return self._modules.get(entry)
        return entry if entry.present(self) else None

    def _apply_one(
        self, name: str, adapter: Any, output: Any, args: tuple, kwargs: dict
    ) -> Any:
        if isinstance(output, TENSOR_LIKE):
            return self._adapt(name, adapter, output, args, kwargs)
        key = find_hidden(output, self.output_key(adapter), self.target_name)
        if key is None:
            return output  # nothing tensor-like to adapt: pass through untouched
        hidden = get_item(output, key)
        return replace_item(output, key, self._adapt(name, adapter, hidden, args, kwargs))

    def output_key(self, adapter: Any) -> int | str | None:
        """The ``output_key`` an entry adapts: an adapter's own, a composition's sets'."""
        if isinstance(adapter, Adapter):
            return adapter.config.output_key
        return adapter.output_key(self)

    def _adapt(
        self, name: str, adapter: Any, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        if not isinstance(adapter, Adapter):  # a composition: a mix of its sets' deltas
            return hidden + self._delta(name, adapter, hidden, args, kwargs)
        self._check(name, adapter, hidden, "output")
        if adapter.config.placement == "sequential":
            return adapter(hidden)
        return hidden + adapter.branch(self._input(name, adapter, args, kwargs))

    def _delta(self, name: str, adapter: Any, hidden: torch.Tensor, args: tuple,
               kwargs: dict) -> torch.Tensor:
        """What an entry adds to ``hidden``: an adapter's branch, of the output or of the
        input (``_adapt(...) - hidden``, exactly); a composition's mix of its sets' deltas."""
        if not isinstance(adapter, Adapter):
            return adapter.delta(self, hidden, args, kwargs)
        self._check(name, adapter, hidden, "output")
        if adapter.config.placement == "sequential":
            return adapter.branch(hidden)
        return adapter.branch(self._input(name, adapter, args, kwargs))

    def _input(self, name: str, adapter: Adapter, args: tuple, kwargs: dict) -> torch.Tensor:
        x = first_tensor(args, kwargs)
        if x is None:
            raise ValueError(
                f"module '{self.target_name}' was called without a tensor argument, so the "
                f"parallel adapter of set '{name}' has no input; use placement='sequential'"
            )
        self._check(name, adapter, x, "input")
        return x

    def _check(self, name: str, adapter: Adapter, t: torch.Tensor, what: str) -> None:
        if isinstance(t, torch.fx.Proxy):
            return  # being traced by torch.fx: no shape yet, and no branching on one
        if t.dim() == 0 or t.shape[-1] != adapter.d_model:
            size = t.shape[-1] if t.dim() else "nothing (a scalar)"
            raise ValueError(
                f"module '{self.target_name}' {what}s last dimension {size}, but the adapter "
                f"of set '{name}' has d_model={adapter.d_model}; inject with "
                f"AdapterConfig(d_model=...) equal to the {what}'s last dimension, "
                "or choose a target whose output is the hidden state"
            )

    def extra_repr(self) -> str:
        return f"active={list(self.active)}"


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, TENSOR_LIKE):
            return value
    return None


def _keys(output: Any) -> list[Any] | None:
    if isinstance(output, (tuple, list)):
        return list(range(len(output)))
    if isinstance(output, Mapping):
        return list(output.keys())
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [f.name for f in dataclasses.fields(output)]
    return None


def get_item(output: Any, key: Any) -> Any:
    if isinstance(output, (tuple, list, Mapping)):
        return output[key]
    return getattr(output, key)


def find_hidden(output: Any, key: int | str | None, target_name: str) -> Any:
    """The key of the hidden state in a structured output, or None if it holds no tensor."""
    keys = _keys(output)
    if keys is None:
        return None
    if key is None:
        return next((k for k in keys if isinstance(get_item(output, k), TENSOR_LIKE)), None)
    if key not in keys or not isinstance(get_item(output, key), TENSOR_LIKE):
        raise ValueError(
            f"module '{target_name}' returned {type(output).__name__} with keys {keys}; "
            f"output_key={key!r} does not name a tensor among them"
        )
    return key


def replace_item(output: Any, key: Any, value: torch.Tensor) -> Any:
    """``output`` with ``output[key]`` replaced, of the same type where that can be built."""
    if isinstance(output, tuple):
        items = list(output)
        items[key] = value
        make = getattr(type(output), "_make", None)  # namedtuple
        return make(items) if make is not None else tuple(items)
    if isinstance(output, list):
        items = list(output)
        items[key] = value
        return items
    if type(output) is dict:
        return {**output, key: value}
    if isinstance(output, MutableMapping):
        # Structured outputs such as transformers' ModelOutput are built fresh by every
        # forward and keep their attribute and item views in step on assignment.
        output[key] = value
        return output
    return dataclasses.replace(output, **{key: value})
