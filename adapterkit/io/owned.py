"""A set's own modules (``adapterkit.own``) in its adapter file.

The file holds their tensors under ``adapters.<module>.module.<param>``, beside the adapters',
and describes each in ``owned``: ``{module: {"class": "<module>.<QualName>", "shapes": {param:
shape}}}`` (format version 4). Loading into a model whose set does not own them yet makes a
copy of the model's module of that name, as ``own`` does; a module saved with other shapes (a
head with another number of labels) is rebuilt for ``nn.Linear``, ``nn.LayerNorm`` and
``nn.Embedding``, and refused otherwise (``own`` the module first, then load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterFileError
from ..lifecycle import own_copy
from ..slot import Owned
from ..tree import candidates, set_slots


def class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(owned: dict[str, Owned]) -> dict[str, Any]:
    """The ``owned`` field of a set's file."""
    return {key: {"class": class_name(o.module),
                  "shapes": {k: list(t.shape) for k, t in o.module.state_dict().items()}}
            for key, o in owned.items()}


def read_owned(raw: object, file: Path) -> dict[str, dict[str, Any]]:
    """The validated ``owned`` field ({} when absent)."""
    if raw is None:
        return {}

    def valid(entry: object) -> bool:
        return (isinstance(entry, dict) and set(entry) == {"class", "shapes"}
                and isinstance(entry["class"], str) and isinstance(entry["shapes"], dict)
                and all(isinstance(s, list) and all(isinstance(d, int) for d in s)
                        for s in entry["shapes"].values()))

    if not isinstance(raw, dict) or not raw or not all(
            isinstance(k, str) and valid(v) for k, v in raw.items()):
        raise AdapterFileError(f"{file}: 'owned' must map module names to {{\"class\": str, "
                               "\"shapes\": {param: [int, ...]}}")
    return raw


def _resized(module: nn.Module, shapes: dict[str, list[int]]) -> nn.Module | None:
    """``module``'s kind with the parameter shapes ``shapes``, where they say all there is."""
    kw: dict[str, Any] = {}
    for t in module.parameters():
        kw = {"device": t.device, "dtype": t.dtype}
        break
    weight = shapes.get("weight")
    if weight is None:
        return None
    if type(module) is nn.Linear and len(weight) == 2:
        return nn.Linear(weight[1], weight[0], bias="bias" in shapes, **kw)
    if type(module) is nn.LayerNorm:
        return nn.LayerNorm(weight, eps=module.eps, bias="bias" in shapes, **kw)
    if type(module) is nn.Embedding and len(weight) == 2:
        return nn.Embedding(*weight, padding_idx=module.padding_idx, **kw)
    return None


def modules_to_load(model: nn.Module, name: str, owned: dict[str, dict[str, Any]],
                    file: Path) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(held, new)``: the set's own modules already in the model, and the copies to give it,
    each of the saved class and shapes; an error naming the fix for anything else."""
    held = {key: slot[name].module for key, (_, slot) in set_slots(model, name).items()
            if isinstance(slot[name], Owned)}
    found = dict(candidates(model))
    new: dict[str, nn.Module] = {}
    for key, saved in owned.items():
        shapes = {k: list(v) for k, v in saved["shapes"].items()}
        module = held.get(key)
        if module is None:
            if key not in found:
                raise AdapterFileError(f"{file}: set '{name}' owns module '{key}', which this "
                                       "model does not have")
            module = own_copy(found[key])
            if {k: list(t.shape) for k, t in module.state_dict().items()} != shapes:
                module = _resized(module, shapes) or module
            new[key] = module
        have = {k: list(t.shape) for k, t in module.state_dict().items()}
        if class_name(module) != saved["class"] or have != shapes:
            raise AdapterFileError(
                f"{file}: set '{name}' owns module '{key}' as a {saved['class']} with shapes "
                f"{shapes}, but here it would be a {class_name(module)} with {have}; give the "
                f"set a module like the saved one first (adapterkit.own(model, {{'{key}': "
                f"module}}, name='{name}')), then load"
            )
    return held, new


def expected_shapes(held: dict[str, nn.Module], new: dict[str, nn.Module]) -> dict[str, Any]:
    return {f"adapters.{key}.module.{k}": t.shape for key, module in {**held, **new}.items()
            for k, t in module.state_dict().items()}


def copy_in(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, (_, slot) in set_slots(model, name).items():
            if isinstance(slot[name], Owned):
                for k, t in slot[name].module.state_dict().items():
                    t.copy_(tensors[f"adapters.{key}.module.{k}"])
