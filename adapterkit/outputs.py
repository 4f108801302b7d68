"""Finding the hidden state in a module's output, and putting an adapted one back.

A module returns a tensor, or a structure that holds one: a tuple (a namedtuple too), a list,
a dict (transformers' ``ModelOutput`` too) or a dataclass, possibly nested. A *path* is a
tuple of keys, one per level: an index, a dict key or a field name (``(1, 0)`` is an LSTM's
``h_n`` in ``(output, (h_n, c_n))``; ``("hidden",)`` a namedtuple's field). ``output_key``
names one; without it, the hidden state is the first tensor in depth-first order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from .config import OutputKey

Path = tuple[Any, ...]
# What counts as a hidden state: a tensor, or torch.fx's stand-in for one while tracing (so
# that a traced model keeps its adapters rather than passing the output through).
TENSOR_LIKE = (torch.Tensor, torch.fx.Proxy)


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, TENSOR_LIKE):
            return value
    return None


def _fields(output: Any) -> tuple[str, ...]:
    return getattr(type(output), "_fields", ())  # a namedtuple's


def keys(output: Any) -> list[Any] | None:
    """The keys one level down in ``output``, or None if it is not a structure."""
    if isinstance(output, (tuple, list)):
        return list(_fields(output)) or list(range(len(output)))
    if isinstance(output, Mapping):
        return list(output.keys())
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [f.name for f in dataclasses.fields(output)]
    return None


def _index(output: Any, key: Any) -> Any:
    """``key`` as the index to use on ``output``: a namedtuple's field name becomes its index."""
    if isinstance(output, tuple) and isinstance(key, str) and key in _fields(output):
        return _fields(output).index(key)
    return key


def _has(output: Any, key: Any) -> bool:
    if isinstance(output, (tuple, list)):
        key = _index(output, key)
        return isinstance(key, int) and not isinstance(key, bool) and -len(output) <= key < len(
            output)
    found = keys(output)
    return found is not None and key in found


def get_item(output: Any, key: Any) -> Any:
    if isinstance(output, (tuple, list, Mapping)):
        return output[_index(output, key)]
    return getattr(output, key)


def get_path(output: Any, path: Path) -> Any:
    for key in path:
        output = get_item(output, key)
    return output


def _first_tensor_path(output: Any) -> Path | None:
    if isinstance(output, TENSOR_LIKE):
        return ()
    for key in keys(output) or ():
        found = _first_tensor_path(get_item(output, key))
        if found is not None:
            return (key, *found)
    return None


def as_path(key: OutputKey | None) -> Path | None:
    return None if key is None else key if isinstance(key, tuple) else (key,)


def find_hidden(output: Any, key: OutputKey | None, target_name: str) -> Path | None:
    """The path to the hidden state in ``output``: ``()`` for a tensor output, the path that
    ``key`` names, or the first tensor's; None when ``key`` is None and there is no tensor.

    Example:
        >>> import collections
        >>> Out = collections.namedtuple("Out", "logits hidden")
        >>> out = Out(None, (torch.zeros(1), torch.ones(2)))
        >>> find_hidden(out, None, "m"), find_hidden(out, ("hidden", 1), "m")
        (('hidden', 0), ('hidden', 1))
    """
    if isinstance(output, TENSOR_LIKE):
        return ()
    path = as_path(key)
    if path is None:
        return _first_tensor_path(output)
    node = output
    for depth, k in enumerate(path):
        if not _has(node, k):
            where = f" at {path[:depth]}" if depth else ""
            raise ValueError(
                f"module '{target_name}' returned {type(output).__name__}; output_key={key!r} "
                f"does not name a tensor: {type(node).__name__}{where} has keys "
                f"{keys(node)}. Name a tensor, e.g. output_key={_example(output)!r}"
            )
        node = get_item(node, k)
    if not isinstance(node, TENSOR_LIKE):
        raise ValueError(
            f"module '{target_name}' returned {type(output).__name__}; output_key={key!r} "
            f"names a {type(node).__name__}, not a tensor. Name a tensor, e.g. "
            f"output_key={_example(output)!r}"
        )
    return path


def _example(output: Any) -> OutputKey | None:
    path = _first_tensor_path(output)
    return None if not path else path[0] if len(path) == 1 else path


def replace_item(output: Any, key: Any, value: Any) -> Any:
    """``output`` with ``output[key]`` replaced, of the same type where that can be built."""
    if isinstance(output, tuple):
        items = list(output)
        items[_index(output, key)] = value
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


def replace_path(output: Any, path: Path, value: Any) -> Any:
    """``output`` with the item at ``path`` replaced, every level rebuilt as its own type."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    return replace_item(output, head, replace_path(get_item(output, head), rest, value))
