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

from . import guards
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
        # The model-wide list of active sets; every slot holds the same tuple and applies
        # those of its own adapters that it names, in that order.
        self.active: tuple[str, ...] = ()
        self.freeze_spec: FreezeSpec | None = None  # the last spec applied, saved with sets

    def run(self, output: Any, args: tuple, kwargs: dict) -> Any:
        for name in self.active:
            adapter = self._modules.get(name)
            if adapter is not None:
                output = self._apply_one(name, adapter, output, args, kwargs)
        return output

    def _apply_one(
        self, name: str, adapter: Adapter, output: Any, args: tuple, kwargs: dict
    ) -> Any:
        if isinstance(output, TENSOR_LIKE):
            return self._adapt(name, adapter, output, args, kwargs)
        key = find_hidden(output, adapter.config.output_key, self.target_name)
        if key is None:
            return output  # nothing tensor-like to adapt: pass through untouched
        hidden = get_item(output, key)
        return replace_item(output, key, self._adapt(name, adapter, hidden, args, kwargs))

    def _adapt(
        self, name: str, adapter: Adapter, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        self._check(name, adapter, hidden, "output")
        if not isinstance(hidden, torch.fx.Proxy):
            guards.check_forward(self.target_name, name, adapter, hidden)
        if adapter.config.placement == "sequential":
            return adapter(hidden)
        x = first_tensor(args, kwargs)
        if x is None:
            raise ValueError(
                f"module '{self.target_name}' was called without a tensor argument, so the "
                f"parallel adapter of set '{name}' has no input; use placement='sequential'"
            )
        self._check(name, adapter, x, "input")
        return hidden + adapter.branch(x)

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
