"""PEFT's LoRA folders read into an adapter set, exactly (``load_adapters``).

PEFT 0.21.2 computes, at a targeted ``nn.Linear`` (or GPT-2's ``Conv1D``) ``y = W x + b``,
``y + s * (B A dropout(x) + b_B)``: ``s = alpha / r`` (``alpha / sqrt(r)`` with use_rslora),
``b_B`` only with ``lora_bias``. That is adapterkit's identity-activation parallel adapter,
``y + S * (up(down(x)))``, with

- ``down.weight = A`` (the adapter's width is the module's rank), ``down.bias = 0``;
- ``up.weight = (s / S) B`` and ``up.bias = (s b_B + delta) / S``, where ``S``, the set's
  scaling, is the modules' common ``s``, else 1 (each module's own ``s`` folded into its
  ``up``), and ``delta`` is what the folder changes in the layer's own bias.

A folder saved with ``bias="lora_only"`` or ``"all"`` holds trained biases, which PEFT puts in
place of the base's. adapterkit leaves the base as it is, so that eject is exact, and adds the
difference to the output instead: in ``up.bias`` on a targeted layer, and through a
zero-weight adapter of width 1 on any other Linear, Conv1D or LayerNorm whose bias moved.
``modules_to_save`` copies (a classifier) load into the modules themselves, which the set then
includes, as ``save_adapters(..., include=...)`` does.

Keys are ``base_model.model.<path>``, ``<path>`` relative to the model PEFT was given; a
folder saved from ``BertForSequenceClassification`` (``bert.encoder...``) loads into a
``BertModel`` (``encoder...``) and the reverse, through transformers' ``base_model_prefix``.
Every check runs before the model changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import state
from ..adapter import NEEDS_INIT
from ..config import AdapterConfig
from ..errors import AdapterFileError
from ..layout import Layout, linear_like
from ..lifecycle import check_not_meta, materialize
from ..select import closest_names
from ..surgery import attach
from ..tree import candidates, set_slots
from .adapterfile import CONFIG_FILE, WEIGHTS_FILE, read_tensors
from .includes import module_state
from .peft_config import EMBEDDING, LoraSpec, read_spec
from .peft_names import Frame, check_targets, frames, kind_error

PREFIX = "base_model.model."
_SET_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.(?P<param>weight|bias)$")
_OTHER_METHODS = {  # keys of PEFT methods whose config may still say LORA (hand-edited)
    "lora_magnitude_vector": "DoRA (use_dora): lora_magnitude_vector",
    "lora_embedding_A": EMBEDDING, "lora_embedding_B": EMBEDDING,
}


def is_peft_config(meta: dict) -> bool:
    """Whether a parsed ``adapter_config.json`` is PEFT's: it has ``peft_type`` (adapterkit's
    has ``format``; one with both is refused as neither)."""
    return "peft_type" in meta


# -- the keys of the weights file ------------------------------------------------------------


@dataclass
class _Keys:
    """The file's tensors by what they are, with PEFT's module paths (prefix removed)."""

    lora: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # A, B, B.bias
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # base parameters it sets


def _owner(key: str) -> str:
    """The module a parameter key belongs to (a LoRA layer's ``base_layer`` is the module)."""
    return key.rpartition(".")[0].removesuffix(".base_layer")


def _split_keys(tensors: dict[str, torch.Tensor], file: Path) -> _Keys:
    keys = _Keys()
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(
                f"{file} has key '{key}', which is not a PEFT key (base_model.model.<module "
                "path>...); load a folder written by PEFT's save_pretrained"
            )
        path = key.removeprefix(PREFIX)
        for marker, what in _OTHER_METHODS.items():
            if marker in path.split("."):
                raise AdapterFileError(
                    f"{file} holds {what} (key '{key}'); adapterkit reads PEFT's LoRA on Linear "
                    "and Conv1D layers only, exactly. Load this adapter with PEFT itself"
                )
        match = _LORA_KEY.match(path)
        if match is None:
            # a parameter of the base itself: a trained bias (bias="all"/"lora_only"), or a
            # modules_to_save copy; PEFT loads it in place of the base's
            keys.params[path] = t
            continue
        part = match["ab"] if match["param"] == "weight" else f"{match['ab']}.bias"
        keys.lora.setdefault(match["module"], {})[part] = t
    return keys


# -- where PEFT's paths are in this model ----------------------------------------------------


def _frame(model: nn.Module, modules: dict[str, nn.Module], keys: _Keys, meta: dict,
           file: Path) -> Frame:
    """The first reading of PEFT's paths (``peft_names.frames``) under which every module the
    file names is in the model."""
    misses = []
    for frame in frames(model):
        missing = [p for p in keys.lora if frame.module(p) not in modules]
        missing += [_owner(k) for k in keys.params
                    if (key := frame.param(_plain(k))) is None
                    or key.rpartition(".")[0] not in modules]
        if not missing:
            return frame
        misses.append(missing)
    saved = (meta.get("auto_mapping") or {}).get("base_model_class")
    origin = f" (PEFT saved it from a {saved})" if isinstance(saved, str) else ""
    first = min(misses, key=len)[0]  # of the reading that fits best
    prefix = getattr(model, "base_model_prefix", "")
    raise AdapterFileError(
        f"{file} does not fit this {type(model).__name__}{origin}: it holds weights for module "
        f"'{first}' (keys base_model.model.{first}.*), which this model does not have"
        + (f", nor under its base_model_prefix '{prefix}'" if prefix else "")
        + f"; closest: {', '.join(closest_names(first, [n for n in modules if n]))}. Load it "
        "into the model it was trained on"
    )


def _plain(key: str) -> str:
    """A base parameter's key: PEFT's ``<target>.base_layer.bias`` is ``<target>.bias``."""
    return key.replace(".base_layer.", ".")


# -- which modules, with what ----------------------------------------------------------------


def _widths(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear-like layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.nx, module.nf  # type: ignore[return-value]


@dataclass
class _Module:
    """What the set puts on one module: the adapter's layout and tensors (float64)."""

    layout: Layout
    lora: bool  # False: a zero-weight adapter that adds a bias difference
    scaling: float  # PEFT's s for the module (1 for a bias-only adapter)
    down: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor  # s * b_B + delta, before dividing by the set's scaling


def _lora_module(path: str, module: nn.Module, parts: dict[str, torch.Tensor], spec: LoraSpec,
                 delta: torch.Tensor | None, file: Path) -> _Module:
    d_in, d_out = _widths(module)
    a, b, bias = parts.get("A"), parts.get("B"), parts.get("B.bias")
    r = spec.rank(path)
    where = f"{file}: module '{path}'"
    if set(parts) - {"A", "B", "B.bias"}:
        raise AdapterFileError(f"{where} has lora_A.bias, which PEFT's LoRA does not have")
    if a is None or b is None:
        raise AdapterFileError(f"{where} has only {sorted(parts)} of lora_A.weight and "
                               "lora_B.weight")
    if a.shape != (r, d_in) or b.shape != (d_out, r):
        raise AdapterFileError(
            f"{where} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; this model's layer "
            f"maps {d_in} -> {d_out} and the config gives it rank {r} (r, rank_pattern), so "
            f"PEFT expects [{r}, {d_in}] and [{d_out}, {r}]"
        )
    if (bias is not None) != spec.lora_bias or (bias is not None and bias.shape != (d_out,)):
        raise AdapterFileError(
            f"{where}: lora_bias is {spec.lora_bias} but lora_B.bias is "
            f"{'absent' if bias is None else list(bias.shape)}; expected "
            f"{[d_out] if spec.lora_bias else 'absent'}"
        )
    s = spec.scaling(path)
    up_bias = torch.zeros(d_out, dtype=torch.float64)
    if bias is not None:
        up_bias = s * bias.double()
    if delta is not None:
        up_bias = up_bias + delta
    layout = Layout(d_out, -1, d_in if d_in != d_out else None, r)
    return _Module(layout, True, s, a.double(), b.double(), up_bias)


def _bias_owner_error(path: str, module: nn.Module, file: Path) -> str | None:
    if linear_like(module):
        return None
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return None
    return (f"{file} changes the bias of '{path}' (PEFT's bias='all'), a "
            f"{type(module).__name__}, where adapterkit cannot add the difference at its output "
            "exactly without changing the base (only Linear, Conv1D and LayerNorm biases)")


def _bias_module(module: nn.Module, delta: torch.Tensor) -> _Module:
    """A zero-weight adapter of width 1 that adds ``delta`` to the module's output."""
    d_in, d_out = _widths(module) if linear_like(module) else (delta.numel(), delta.numel())
    layout = Layout(d_out, -1, d_in if d_in != d_out else None, 1)
    zeros = torch.zeros
    return _Module(layout, False, 1.0, zeros(1, d_in, dtype=torch.float64),
                   zeros(d_out, 1, dtype=torch.float64), delta)


def _delta(name: str, module: nn.Module, saved: torch.Tensor, file: Path) -> torch.Tensor | None:
    own = module.bias if isinstance(getattr(module, "bias", None), torch.Tensor) else None
    if own is None or saved.shape != own.shape:
        have = "no bias" if own is None else f"a bias of shape {list(own.shape)}"
        raise AdapterFileError(f"{file} sets the bias of '{name}' to shape {list(saved.shape)}; "
                               f"this model's module has {have}")
    delta = saved.double() - own.detach().double().cpu()
    return delta if delta.any() else None


@dataclass
class Plan:
    """Everything ``load_adapters`` changes for a PEFT folder, found before it changes any."""

    name: str
    config: AdapterConfig
    modules: dict[str, _Module]  # model path -> adapter
    include: dict[str, dict[str, torch.Tensor]]  # model path -> state (modules_to_save)

    def adapter_state(self, path: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors (float64), with the set's scaling divided out."""
        m, scale = self.modules[path], self.config.scaling
        return {"down.weight": m.down,
                "down.bias": torch.zeros(m.down.shape[0], dtype=torch.float64),
                "up.weight": m.up * (m.scaling / scale), "up.bias": m.up_bias / scale}


def _includes(spec: LoraSpec, params: dict[str, torch.Tensor], frame: Frame,
              modules: dict[str, nn.Module], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The modules_to_save copies: PEFT wraps every module whose name ends with an entry."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(params):
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(1, len(parts))
                      if any(".".join(parts[:i]).endswith(m) for m in spec.modules_to_save)),
                     None)
        if owner is not None:
            found.setdefault(owner, {})[key[len(owner) + 1:]] = params.pop(key)
    out = {}
    for path, saved in found.items():
        name = frame.module(path)
        saved = {frame.param(f"{path}.{k}")[len(name) + 1:]: t  # type: ignore[index,arg-type]
                 for k, t in saved.items()}
        want = module_state(modules[name])  # type: ignore[index]
        wrong = sorted(k for k in set(want) | set(saved)
                       if k not in saved or k not in want or saved[k].shape != want[k].shape)
        if wrong:
            raise AdapterFileError(
                f"{file} holds modules_to_save '{path}' with keys {sorted(saved)}, but this "
                f"model's module has {sorted(want)} (differing: {wrong[:4]}, shapes included)"
            )
        out[name] = saved  # type: ignore[index]
    return out


def _set_name(path: Path, name: str | None) -> str:
    if name is not None:
        return name
    if not _SET_NAME.fullmatch(path.name):
        raise ValueError(
            f"a PEFT folder loads as a set named after it, and '{path.name}' is not a set name "
            "(letters, digits, '_' or '-'); pass load_adapters(model, path, name=...)"
        )
    return path.name


def _read_keys(path: Path) -> _Keys:
    weights = path / WEIGHTS_FILE
    if not weights.is_file() and (path / "adapter_model.bin").is_file():
        raise AdapterFileError(
            f"{path} holds adapter_model.bin, a pickle, and adapterkit never unpickles adapter "
            "files: re-save it with PEFT's save_pretrained(..., safe_serialization=True) (the "
            "default), which writes adapter_model.safetensors"
        )
    return _split_keys(read_tensors(path), weights)


def _check_modules(model: nn.Module, modules: dict[str, nn.Module], frame: Frame, keys: _Keys,
                   path: Path) -> None:
    """The modules the file names have memory, and its LoRA layers are Linear or Conv1D."""
    named = [*map(frame.module, keys.lora),
             *(frame.param(_plain(k)).rpartition(".")[0] for k in keys.params)]  # type: ignore[union-attr]
    check_not_meta(model, {q: modules[q] for q in named}, f"cannot load {path}")  # type: ignore[index]
    for peft_path in keys.lora:
        if err := kind_error(peft_path, modules[frame.module(peft_path)],  # type: ignore[index]
                             path / WEIGHTS_FILE):
            raise err


def _lora_modules(modules: dict[str, nn.Module], frame: Frame, keys: _Keys, spec: LoraSpec,
                  file: Path) -> dict[str, _Module]:
    """An adapter for every LoRA layer, its own trained bias (bias="lora_only"/"all") folded
    in; the bias keys it uses leave ``keys.params``."""
    found = {}
    for peft_path, parts in keys.lora.items():
        qname: str = frame.module(peft_path)  # type: ignore[assignment]
        saved = keys.params.pop(f"{peft_path}.base_layer.bias", None)
        delta = None if saved is None else _delta(peft_path, modules[qname], saved, file)
        found[qname] = _lora_module(peft_path, modules[qname], parts, spec, delta, file)
    return found


def _bias_modules(modules: dict[str, nn.Module], frame: Frame, keys: _Keys,
                  file: Path) -> dict[str, _Module]:
    """A zero-weight adapter for every other bias the file changes (bias="all")."""
    found = {}
    for key, saved in keys.params.items():
        path = _owner(key)
        qname = frame.param(_plain(key)).rpartition(".")[0]  # type: ignore[union-attr]
        if ".base_layer." in key or path in keys.lora or not key.endswith(".bias"):
            what = ("a LoRA layer's base_layer where the file has no LoRA weights"
                    if ".base_layer." in key else "a LoRA layer's own parameter, which PEFT "
                    "calls base_layer.*" if path in keys.lora else "neither a bias nor in "
                    "modules_to_save; an adapter cannot put it in place without changing the "
                    "base")
            raise AdapterFileError(f"{file} sets '{key}': {what}")
        if (why := _bias_owner_error(path, modules[qname], file)) is not None:
            raise AdapterFileError(why)
        if (delta := _delta(path, modules[qname], saved, file)) is not None:
            found[qname] = _bias_module(modules[qname], delta)
    return found


def plan(model: nn.Module, path: Path, name: str | None = None) -> Plan:
    """Read and check a PEFT LoRA folder against ``model``; change nothing."""
    file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    meta = json.loads(file.read_text())  # folders.folder_format parsed it already
    spec = read_spec(file, meta)
    set_name = _set_name(path, name)
    keys = _read_keys(path)
    modules = dict(candidates(model))
    frame = _frame(model, modules, keys, meta, weights)
    _check_modules(model, modules, frame, keys, path)
    check_targets(spec, model, frame, keys.lora, meta, file)
    include = _includes(spec, keys.params, frame, modules, weights)
    found = _lora_modules(modules, frame, keys, spec, weights)
    found |= _bias_modules(modules, frame, keys, weights)
    if not any(m.lora for m in found.values()):
        raise AdapterFileError(f"{weights} holds no LoRA weights; a PEFT LoRA folder holds "
                               "base_model.model.<module>.lora_A.weight and .lora_B.weight")
    scalings = {m.scaling for m in found.values() if m.lora}
    config = AdapterConfig(
        bottleneck=spec.r, activation="identity", placement="parallel",
        dropout=spec.lora_dropout, scaling=scalings.pop() if len(scalings) == 1 else 1.0,
    )
    order = {q: i for i, (q, _) in enumerate(candidates(model))}
    found = dict(sorted(found.items(), key=lambda item: order[item[0]]))
    return Plan(set_name, config, found, include)


def load_peft(model: nn.Module, path: Path, name: str | None = None) -> nn.Module:
    """Load PEFT LoRA folder ``path`` into ``model`` as one set (see ``load_adapters``)."""
    found = plan(model, path, name)
    modules = dict(candidates(model))
    layouts = {q: m.layout for q, m in found.modules.items()}
    attach(model, lambda qname, _m: qname in layouts, found.config, found.name, layouts=layouts)
    materialize(model, found.name)
    with torch.no_grad():
        for qname, (_, slot) in set_slots(model, found.name).items():
            adapter = slot[found.name]
            for k, t in found.adapter_state(qname).items():
                adapter.state_dict()[k].copy_(t)
            adapter.__dict__[NEEDS_INIT] = False
        for qname, saved in found.include.items():
            for k, t in module_state(modules[qname]).items():
                t.copy_(saved[k])
    if found.include:
        state.set_includes(model, found.name, list(found.include))
    return model


def set_names_of(path: Path, name: str | None) -> Iterable[str]:
    """The set a PEFT folder adds (for ``load_adapters``' check under DDP)."""
    return [_set_name(path, name)]
