"""Saving and loading one adapter set: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format is described in ``docs/format.md`` (reading and writing the files: ``adapterfile``).
Loading checks everything before it changes anything, and never unpickles: tensors come only
through safetensors. The public ``save_adapters`` / ``load_adapters`` (``folders.py``) call
``save_set`` / ``load_set`` for a folder of this format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import state
from ..adapter import NEEDS_INIT, Adapter
from ..compose.fusion import AdapterFusion, add_fusion, fusion_layout
from ..config import AdapterConfig, FusionConfig
from ..errors import AdapterFileError
from ..layout import Layout, adapter_for, infer_layout, layout_of
from ..lifecycle import check_not_meta, materialize
from ..select import closest_names
from ..slot import Owned
from ..surgery import attach, attach_owned, detach
from ..tree import (
    adapted_modules,
    candidates,
    is_distributed_wrapper,
    original_class,
    require_sets,
    set_names,
    set_slots,
)
from .adapterfile import (
    CONFIG_FILE,
    FORMAT,
    LAYOUT_VERSION,
    WEIGHTS_FILE,
    config_json,
    layout_json,
    read_adapter_config,
    read_tensors,
    write_atomically,
    write_on_rank_zero,
)
from .includes import included_modules, module_state, resolve_include
from .owned import copy_in, describe, expected_shapes, modules_to_load

# -- what a set looks like in a model ------------------------------------------------------


def _set_slots(model: nn.Module, name: str) -> dict[str, tuple[nn.Module | None, nn.Module]]:
    """``{key: (owner, the set's adapter or fusion there)}``."""
    return {key: (owner, slot[name]) for key, (owner, slot) in set_slots(model, name).items()}


def _base_shapes(module: nn.Module) -> dict[str, list[int]]:
    """Shapes of a module's own parameters, adapters left out: the base's fingerprint."""
    return {
        name: list(p.shape)
        for prefix, sub in candidates(module)
        for name, p in (
            (f"{prefix}.{n}" if prefix else n, p) for n, p in sub.named_parameters(recurse=False)
        )
    }


def gathered(t: torch.Tensor) -> torch.Tensor:
    # A sharded parameter (FSDP2 DTensor) is written whole: every rank must take part.
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().to("cpu").clone().contiguous()


def _saved_includes(model: nn.Module, names: list[str], file: Path) -> dict[str, nn.Module]:
    modules = dict(candidates(model))
    for name in names:
        if name not in modules:
            raise AdapterFileError(f"{file} holds weights of module '{name}', which this model "
                                   "does not have")
    return {name: modules[name] for name in names}


# -- save -----------------------------------------------------------------------------------


def collect(
    model: nn.Module, name: str, include: Sequence[str] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What ``save_adapters`` writes for set ``name``: the config JSON and the tensors.

    ``include=None``: the modules recorded for the set, refused when the freeze spec trains
    others (``includes.resolve_include``). Every check runs before anything is gathered.
    """
    require_sets(model, name, "save_adapters: ")
    everything = _set_slots(model, name)  # its own modules' tensors go with its adapters'
    found = {k: v for k, v in everything.items() if not isinstance(v[1], Owned)}
    owned = {k: v[1] for k, v in everything.items() if isinstance(v[1], Owned)}
    included = included_modules(model, resolve_include(model, name, include))
    check_norms(model, included)
    tensors = {
        f"adapters.{key}.{pname}": gathered(t)
        for key, (_, adapter) in everything.items()
        for pname, t in adapter.state_dict().items()
    }
    tensors |= {
        f"modules.{mname}.{pname}": gathered(t)
        for mname, module in included.items()
        for pname, t in module_state(module).items()  # its adapters are saved as sets
    }
    first_adapter = next((a for _, a in found.values()), None)
    spec = state.freeze_spec(model)
    # each adapter's width and feature axis: found by inject, maybe on example_inputs
    layouts = {key: layout_json(_layout(a)) for key, (_, a) in found.items()}
    own = any(set(entry) - {"d_model", "feature_dim"} for entry in layouts.values())
    meta = {
        "format": FORMAT,
        "format_version": LAYOUT_VERSION if own else (
            4 if owned else 3 if isinstance(first_adapter, AdapterFusion) else 2),
        "name": name,
        "config": config_json(AdapterConfig() if first_adapter is None else first_adapter.config),
        "targets": list(found),
        "layouts": layouts,
        "include": list(included),
        "freeze": spec.to_dict() if spec is not None else None,
        "base": {
            "class": original_class(model).__name__,
            "modules": {
                key: _base_shapes(owner) for key, (owner, _) in found.items() if owner is not None
            },
            # method="fx": the targets are graph sites, which only an FX injection finds again
            **({"graph": True} if state.graph_base(model) is not None else {}),
        },
        **({"owned": describe(owned)} if owned else {}),
    }
    return meta, tensors


def _layout(adapter: nn.Module) -> Layout:
    if isinstance(adapter, Adapter):
        return layout_of(adapter)
    return Layout(adapter.d_model, adapter.feature_dim)  # a fusion's, of its sets' outputs


def save_set(model: nn.Module, path: Path, name: str, include: Sequence[str] | None) -> Path:
    """Write set ``name`` (and the modules ``include`` selects) to directory ``path``
    atomically; under ``torch.distributed``, rank 0 writes once every rank gathered."""
    meta, tensors = collect(model, name, include)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return write_on_rank_zero(path, meta, tensors)
    return write_atomically(path, meta, tensors)


def check_norms(model: nn.Module, included: dict[str, nn.Module]) -> None:
    """Refuse a save that leaves out BatchNorm statistics that moved since injection."""
    stale = [name for name in state.norms_updated(model)
             if not any(name == inc or name.startswith(inc + ".") or not inc for inc in included)]
    if stale:
        raise ValueError(
            f"BatchNorm layers {stale[:4]} updated their running statistics since the adapters "
            "were injected (forward passes in train mode), and the adapter file would not hold "
            "them: loaded into the base, the adapters would run against other statistics. "
            f"Save them too (include={stale[:4]!r}), or keep BatchNorm layers in eval mode "
            "while the adapters train (see docs/models.md)"
        )


# -- load -----------------------------------------------------------------------------------


def _check_graph(model: nn.Module, meta: dict, name: str, file: Path) -> None:
    traced = state.graph_base(model) is not None
    if (traced or meta["base"].get("graph")) and not _set_slots(model, name):
        source = "this model was made" if traced else f"{file} was saved"
        raise AdapterFileError(
            f"set '{name}' is not injected in this model, and {source} with method='fx', "
            "where a trace decides the sites: inject the set first with "
            f"adapterkit.inject(model, <the same targets>, method='fx', name='{name}') on the "
            f"same base, then load into the GraphModule it returns (sites: "
            f"{', '.join(meta['targets'][:4])})"
        )


def _check_unsharded(model: nn.Module, path: Path) -> None:
    sharded = [name or "<root>" for name, m in candidates(model)
               if is_distributed_wrapper(type(m))]
    if sharded:
        raise ValueError(
            f"cannot load {path} into a model that fully_shard has already sharded (at "
            f"{', '.join(sharded[:3])}); call load_adapters on the unsharded model, then "
            "fully_shard it"
        )


_COMPILED_CLASS, _COMPILED_PREFIX = "OptimizedModule", "_orig_mod."


def _through_compile(meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A file that adapterkit before issue 20 saved from ``torch.compile``'s wrapper records
    the wrapper's class and every name under its ``_orig_mod.``: read it as the file of the
    model inside, whose class it never recorded (the shapes are still checked)."""
    if meta["base"].get("class") != _COMPILED_CLASS:
        return meta, tensors

    def strip(name: str) -> str:
        while name.startswith(_COMPILED_PREFIX):
            name = name.removeprefix(_COMPILED_PREFIX)
        return name

    def key(k: str) -> str:  # adapters.<target>.<param>, modules.<module>.<key>
        head, _, rest = k.partition(".")
        return f"{head}.{strip(rest)}"

    layouts = meta["layouts"]
    base = {**meta["base"], "class": None,
            "modules": {strip(t): v for t, v in meta["base"].get("modules", {}).items()}}
    meta = {**meta, "targets": [strip(t) for t in meta["targets"]], "base": base,
            "include": [strip(m) for m in meta["include"]],
            "layouts": None if layouts is None else {strip(t): v for t, v in layouts.items()}}
    return meta, {key(k): t for k, t in tensors.items()}


def _check_base(model: nn.Module, meta: dict, file: Path) -> dict[str, nn.Module]:
    saved_class = meta["base"].get("class")
    if saved_class is not None and saved_class != original_class(model).__name__:
        raise AdapterFileError(
            f"{file} was saved from a {saved_class}, but this model is a "
            f"{original_class(model).__name__}; load it into the base it was trained on"
        )
    modules = dict(candidates(model))
    # FX slots (method="fx") sit on graph sites, keyed by site, with no module of their own
    sites = {key: slot for key, owner, slot in adapted_modules(model) if owner is None}
    modules |= sites
    targets: dict[str, nn.Module] = {}
    for target in meta["targets"]:
        if target not in modules:
            raise AdapterFileError(
                f"{file} adapts module '{target}', which this model does not have; "
                f"closest: {', '.join(closest_names(target, [n for n in modules if n]))}"
            )
        targets[target] = modules[target]
        if target in sites:
            continue  # no module to fingerprint; the adapter shapes are checked below
        want = meta["base"].get("modules", {}).get(target)
        have = _base_shapes(modules[target])
        if want is not None and want != have:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            k = diff[0]
            raise AdapterFileError(
                f"{file} was saved from a different base: module '{target}' parameter '{k}' "
                f"had shape {want.get(k)}, this model's has {have.get(k)}"
            )
    return targets


def _layouts(model: nn.Module, meta: dict, name: str, targets: dict[str, nn.Module],
             file: Path) -> dict[str, Layout]:
    """Each target's adapter layout: the injected set's, else the file's, else inferred."""
    existing = {k: v for k, v in _set_slots(model, name).items() if not isinstance(v[1], Owned)}
    if existing and set(existing) != set(targets):
        raise AdapterFileError(
            f"set '{name}' is already injected on {sorted(existing)}, but the file adapts "
            f"{sorted(targets)}; load under another name=..."
        )
    if existing:
        return {t: _layout(a) for t, (_, a) in existing.items()}
    if isinstance(meta["config"], FusionConfig):  # a fusion takes the layout of its sets
        slots = {key: slot for key, _, slot in adapted_modules(model)}
        return {t: Layout(*_fusion_layout(slots.get(t, {}), meta["config"], t, file))
                for t in targets}
    if meta["layouts"] is not None:
        return meta["layouts"]
    return {t: infer_layout(m, meta["config"], t, model) for t, m in targets.items()}


def _expected(
    model: nn.Module, meta: dict, layouts: dict[str, Layout], file: Path
) -> dict[str, torch.Size]:
    config: AdapterConfig | FusionConfig = meta["config"]
    fusion = isinstance(config, FusionConfig)
    shapes: dict[str, torch.Size] = {}
    for target, layout in layouts.items():
        probe = (AdapterFusion(layout.d_model, config, device="meta") if fusion  # type: ignore[arg-type]
                 else adapter_for(layout, config, device="meta"))  # type: ignore[arg-type]
        shapes |= {f"adapters.{target}.{k}": v.shape for k, v in probe.state_dict().items()}
    for mname, module in _saved_includes(model, meta["include"], file).items():
        shapes |= {f"modules.{mname}.{k}": v.shape for k, v in module_state(module).items()}
    return shapes


def _fusion_layout(slot: Any, config: FusionConfig, target: str, file: Path) -> tuple[int, int]:
    try:
        return fusion_layout(slot, config, target)
    except ValueError as err:
        raise AdapterFileError(
            f"{file} holds a fusion of {list(config.sets)}: {err}. Load or inject the fused "
            "sets first, under those names"
        ) from None


def load_set(model: nn.Module, path: Path, name: str | None = None) -> nn.Module:
    """Load the set in adapterkit's folder ``path`` (see ``load_adapters``)."""
    meta, tensors = _through_compile(read_adapter_config(path), read_tensors(path))
    name = meta["name"] if name is None else name
    file = path / WEIGHTS_FILE
    if not isinstance(meta["config"], FusionConfig):  # a fusion sits on its sets' slots
        _check_graph(model, meta, name, path / CONFIG_FILE)
    _check_unsharded(model, path)
    targets = _check_base(model, meta, path / CONFIG_FILE)
    layouts = _layouts(model, meta, name, targets, path / CONFIG_FILE)
    held, new_owned = modules_to_load(model, name, meta["owned"], path / CONFIG_FILE)
    expected = _expected(model, meta, layouts, path / CONFIG_FILE)
    expected |= expected_shapes(held, new_owned)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k])
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing[:5]}" if missing else "",
                 f"unexpected keys {unexpected[:5]}" if unexpected else "",
                 ", ".join(f"'{k}' has shape {list(tensors[k].shape)}, the model expects "
                           f"{list(expected[k])}" for k in wrong[:5])]
        raise AdapterFileError(
            f"{file} does not fit this model: " + "; ".join(p for p in parts if p)
            + ". Load it into the model and config it was saved from"
        )
    check_not_meta(model, targets, f"cannot load {path}")
    new_set = name not in set_names(model)
    if not _set_slots(model, name) and isinstance(meta["config"], FusionConfig):
        add_fusion(model, name, meta["config"], list(targets))
    elif targets and not _set_slots(model, name):
        attach(model, lambda qname, _m: qname in targets, meta["config"], name,
               layouts=layouts)
    if new_owned:
        try:
            attach_owned(model, name, new_owned)
        except BaseException:
            if new_set:
                detach(model, [name])  # all or nothing
            raise
    materialize(model, name)  # adapters made on meta before to_empty: give them memory
    copy_in(model, name, tensors)
    with torch.no_grad():
        for target, (_, adapter) in _set_slots(model, name).items():
            if isinstance(adapter, Owned):
                continue
            for k, t in adapter.state_dict().items():
                t.copy_(tensors[f"adapters.{target}.{k}"])
            adapter.__dict__[NEEDS_INIT] = False
        for mname, module in _saved_includes(model, meta["include"], file).items():
            for k, t in module_state(module).items():
                t.copy_(tensors[f"modules.{mname}.{k}"])
    return model
