"""Every adapter set of a model in one folder, beside the model's own files.

``model.save_pretrained(d)`` of a transformers model that holds adapters writes, next to
transformers' ``config.json`` and ``model.safetensors``::

    d/adapterkit/sets.json      {"format": "adapterkit-sets", "sets": [...], "active": [...]}
    d/adapterkit/<set>/         one save_adapters directory per set (docs/format.md)

and ``load_adapters(model, d)`` reads it back: every set, and which of them are active. The
files sit in a subfolder because transformers' ``from_pretrained`` takes a folder whose top
level holds ``adapter_config.json`` for a PEFT adapter (when peft is installed).

The hook that makes ``save_pretrained`` write them lives here too: while a transformers
``PreTrainedModel`` holds sets, an instance attribute over the class's method runs the method,
then ``save_bundle``, so that ``from_pretrained(d)`` followed by
``adapterkit.load_adapters(model, d)`` is the trained model again (``Trainer.save_model`` and
Trainer checkpoints call ``save_pretrained`` too). ``state.sync`` keeps it in step with the
sets on every path that adds or removes them. transformers is never imported.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import state
from ..errors import AdapterFileError
from ..surgery import detach, store_active
from ..tree import adapted_modules, is_pretrained, set_names
from .adapterfile import CONFIG_FILE, WEIGHTS_FILE, write_atomically
from .checkpoint import collect, load_set

SUBDIR = "adapterkit"
INDEX = "sets.json"
INDEX_FORMAT = "adapterkit-sets"


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds the ``adapterkit/sets.json`` that ``save_bundle`` writes."""
    return (Path(path) / SUBDIR / INDEX).is_file()


def check_saveable(model: nn.Module) -> None:
    """Raise, before any file is written, if ``save_bundle`` could not write this model."""
    # save_pretrained writes from the main process only, so a sharded adapter cannot be
    # gathered here (every rank would have to join): refuse before anything is written.
    sharded = any(hasattr(p, "full_tensor") for _, _, slot in adapted_modules(model)
                  for p in slot.parameters())
    compositions = [e for e in state.active(model) if not isinstance(e, str)]
    if compositions:
        raise ValueError(
            f"the active list holds {compositions[0]}, which sets.json records only as set "
            "names; set_active(model, [set names]) before saving, and set the composition "
            "again after loading"
        )
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ValueError(
            "the adapters are sharded (fully_shard), and save_pretrained writes from one "
            "process; call adapterkit.save_adapters(model, path, name) on every rank instead"
        )


def save_bundle(model: nn.Module, directory: str | os.PathLike[str],
                include: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Write every set of ``model`` under ``directory/adapterkit/``; returns that folder.

    ``include`` maps a set name to modules saved with that set (``save_adapters``'
    ``include``); by default, the modules recorded for each set (``AdapterCheckpointCallback``
    records its ``include``), so that ``save_pretrained`` after training writes what the
    callback wrote. A set with none recorded is saved alone: ``save_pretrained``'s own
    ``model.safetensors`` holds every module. A set folder there that the model no longer
    holds is removed, so that loading the folder gives back exactly the sets the model had.
    """
    check_saveable(model)
    root = Path(directory) / SUBDIR
    names = set_names(model)
    include = state.includes(model) if include is None else include
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        write_atomically(root / name, *collect(model, name, include.get(name, ())))
    index = {"format": INDEX_FORMAT, "format_version": 1, "sets": names,
             "active": state.active(model)}
    tmp = root / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, root / INDEX)
    for child in root.iterdir():
        ours = {CONFIG_FILE, WEIGHTS_FILE}
        if child.is_dir() and child.name not in names and {p.name for p in child.iterdir()} <= ours:
            shutil.rmtree(child)
    return root


def read_index(root: Path) -> dict[str, Any]:
    file = root / INDEX
    try:
        index = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file} is damaged: not valid JSON ({err})") from None
    sets = index.get("sets") if isinstance(index, dict) else None
    active = index.get("active") if isinstance(index, dict) else None
    if (index.get("format") != INDEX_FORMAT or not isinstance(sets, list) or not sets
            or not isinstance(active, list) or not set(active) <= set(sets)
            or not all(isinstance(s, str) for s in sets)):
        raise AdapterFileError(
            f"{file} is not an adapterkit sets index: expected {{'format': '{INDEX_FORMAT}', "
            "'sets': [names], 'active': [names among sets]}"
        )
    return index


def load_bundle(model: nn.Module, directory: str | os.PathLike[str],
                name: str | None = None) -> nn.Module:
    """Load every set under ``directory/adapterkit/`` and make the saved ones active.

    ``name`` renames the set when the folder holds one. All or nothing: a set that fails to
    load leaves the model as it was.
    """
    root = Path(directory) / SUBDIR
    index = read_index(root)
    sets: list[str] = index["sets"]
    if name is not None and len(sets) != 1:
        raise ValueError(
            f"{directory} holds the sets {sets}; name= renames a single set: load one with "
            f"adapterkit.load_adapters(model, '{root / sets[0]}', name={name!r})"
        )
    rename = {s: (name if name is not None else s) for s in sets}
    before_sets, before_active = set_names(model), state.active(model)
    kept = {
        (key, set_name, k): t.clone()
        for key, _, slot in adapted_modules(model)
        for set_name, adapter in slot.items() if set_name in rename.values()
        for k, t in adapter.state_dict().items()
    }
    try:
        for saved in sets:
            load_set(model, root / saved, rename[saved])
    except BaseException:
        _roll_back(model, before_sets, before_active, kept)
        raise
    loaded = set(rename.values())
    store_active(model, [n for n in before_active if n not in loaded]
                 + [rename[n] for n in index["active"]])
    return model


def _roll_back(model: nn.Module, before_sets: list[str], before_active: list[str],
               kept: dict[tuple[str, str, str], torch.Tensor]) -> None:
    detach(model, [n for n in set_names(model) if n not in before_sets])
    with torch.no_grad():
        for key, _, slot in adapted_modules(model):
            for set_name, adapter in slot.items():
                for k, t in adapter.state_dict().items():
                    if (key, set_name, k) in kept:
                        t.copy_(kept[(key, set_name, k)])
    store_active(model, before_active)


# -- save_pretrained keeps the adapters -------------------------------------------------------

_HOOKED = "save_pretrained"


class SavePretrained:
    """``model.save_pretrained`` that also writes the adapters to ``<dir>/adapterkit/``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if set_names(model):
            check_saveable(model)  # before transformers writes anything
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        is_main = kwargs.get("is_main_process", args[0] if args else True)
        if is_main and set_names(model):
            save_bundle(model, save_directory)
        return result


@state.on_sets_changed
def _sync_save_hook(model: nn.Module) -> None:
    hooked = isinstance(state.instance_method(model, _HOOKED), SavePretrained)
    if set_names(model) and is_pretrained(model) and not hooked:
        state.set_instance_method(model, _HOOKED, SavePretrained(model))
    elif hooked and not set_names(model):
        state.set_instance_method(model, _HOOKED, None)
