"""An adapter set written as PEFT's LoRA folder (``save_adapters(..., format="peft")``).

An identity-activation adapter's branch is affine: ``branch(v) = S (U (D v + d) + u)``, with
``D, d`` its down-projection, ``U, u`` its up-projection and ``S`` the set's scaling. On a
layer ``y = W x + b`` (transformers' ``Conv1D`` stores ``W`` transposed):

- parallel, ``y + branch(x) = y + S (U D x + U d + u)``: LoRA with ``A = D``, ``B = U``,
  scaling ``S`` and ``lora_B.bias = U d + u`` (PEFT scales ``B``'s bias with ``B``);
- sequential, ``y + branch(y) = y + S (U D W x + U (D b + d) + u)``: LoRA with ``A = D W``,
  ``B = U``, ``lora_B.bias = U (D b + d) + u``.

PEFT's scaling is ``alpha / r`` per module, so ``lora_alpha = S r`` (``rank_pattern`` and
``alpha_pattern`` where an adapter's width differs from the most common one). Every adapter on
a Linear or Conv1D is a LoRA module (one that only adds a constant too: zero ``A`` or ``B`` and
a ``lora_B.bias``). An adapter whose branch is a constant on a LayerNorm (a bias difference, as
a PEFT folder with ``bias="all"`` loads) is written as the LayerNorm's new bias
(``bias="all"``).
The set's included modules are written as ``modules_to_save``. Products are formed in
float64 and rounded once to the adapter's dtype. Every check runs before anything is written.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import state
from ..adapter import Adapter
from ..layout import linear_like
from ..tree import candidates, original_class, require_sets, set_slots
from .adapterfile import write_atomically, write_on_rank_zero
from .checkpoint import check_norms, gathered
from .includes import included_modules, module_state, resolve_include
from .peft import PREFIX
from .peft_config import PEFT_TYPE, LoraSpec


@dataclass
class _Lora:
    a: torch.Tensor  # (r, in), float64
    b: torch.Tensor  # (out, r)
    bias: torch.Tensor  # (out,), PEFT's lora_B.bias


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(
        f"save_adapters(format='peft'): set '{name}' cannot be written as PEFT LoRA exactly: "
        f"{why}. Nothing was written; save it in adapterkit's format (the default) instead"
    )


def _weight(module: nn.Module) -> torch.Tensor:
    """``W`` of ``y = W x + b`` (out, in), float64, for a Linear or a Conv1D."""
    w = gathered(module.weight).double()
    return w if isinstance(module, nn.Linear) else w.T


def _own_bias(module: nn.Module, width: int) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.shape != (width,):
        return None
    return gathered(bias).double()


def _constant(adapter: Adapter) -> bool:
    """Whether the adapter's branch adds the same vector whatever its input."""
    return not (adapter.up.weight.detach().double() @ adapter.down.weight.detach().double()).any()


def _check_adapter(name: str, qname: str, module: nn.Module | None, adapter: Any) -> None:
    if not isinstance(adapter, Adapter):
        raise _refuse(name, "it is a fusion, whose attention over sets no LoRA computes")
    config = adapter.config
    if config.activation != "identity":
        raise _refuse(name, f"its activation is '{config.activation}', and LoRA's branch "
                            "B A x is linear; only activation='identity' sets are LoRA")
    if module is None:
        raise _refuse(name, f"'{qname}' is an FX-mode site, not a module PEFT can target")
    if adapter.feature_dim != -1:
        raise _refuse(name, f"its adapter on '{qname}' mixes axis {adapter.feature_dim} (a "
                            "channels-first output), and LoRA maps a layer's last axis")
    if any(p.is_meta or not p.is_floating_point() for p in adapter.parameters()):
        raise _refuse(name, f"its adapter on '{qname}' has no real floating-point weights "
                            "(meta or quantized)")


def _lora(module: nn.Module, adapter: Adapter) -> _Lora:
    d, db = gathered(adapter.down.weight).double(), gathered(adapter.down.bias).double()
    u, ub = gathered(adapter.up.weight).double(), gathered(adapter.up.bias).double()
    if adapter.config.placement == "parallel":
        return _Lora(d, u, u @ db + ub)
    w = _weight(module)
    b = _own_bias(module, w.shape[0])
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b
    return _Lora(d @ w, u, u @ (d @ b + db) + ub)


def _new_bias(module: nn.Module, adapter: Adapter) -> torch.Tensor | None:
    """A LayerNorm's bias with a constant branch folded in (None: not a LayerNorm with a
    bias of the output's width)."""
    if not isinstance(module, nn.LayerNorm):
        return None
    own = _own_bias(module, adapter.d_model)
    if own is None:
        return None
    u, ub = gathered(adapter.up.weight).double(), gathered(adapter.up.bias).double()
    return own + adapter.scaling * (u @ gathered(adapter.down.bias).double() + ub)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _anchored(path: str) -> str:
    return "^" + re.escape(path)


def _spec(targets: dict[str, int], scaling: float) -> dict[str, Any]:
    """rank/alpha options and target_modules that select exactly ``targets`` (path -> rank)."""
    r0 = Counter(targets.values()).most_common(1)[0][0]
    others = {p: r for p, r in targets.items() if r != r0}
    return {
        "r": r0, "lora_alpha": _number(scaling * r0),
        "rank_pattern": {_anchored(p): r for p, r in others.items()},
        "alpha_pattern": {_anchored(p): _number(scaling * r) for p, r in others.items()},
        "target_modules": list(targets),
    }


def _as_spec(fields: dict[str, Any], include: list[str]) -> LoraSpec:
    target_modules = fields["target_modules"]
    return LoraSpec(
        r=fields["r"], lora_alpha=fields["lora_alpha"],
        target_modules=target_modules if isinstance(target_modules, str)
        else tuple(target_modules),
        rank_pattern=tuple(fields["rank_pattern"].items()),
        alpha_pattern=tuple(fields["alpha_pattern"].items()),
        modules_to_save=tuple(include),
    )


def _check_selection(model: nn.Module, name: str, fields: dict[str, Any],
                     targets: dict[str, int], scaling: float, include: list[str]) -> None:
    """PEFT's own rules, run on this model's names, select exactly the targets with their
    ranks and scaling; else fall back to a regex of the names."""
    names = [q for q, _ in candidates(model) if q]
    for attempt in ("list", "regex"):
        spec = _as_spec(fields, include)
        chosen = [q for q in names if spec.targets(q)]
        if chosen == list(targets) and all(
                spec.rank(q) == r and abs(spec.scaling(q) - scaling) <= 1e-12 * abs(scaling)
                for q, r in targets.items()):
            return
        if attempt == "list":
            fields["target_modules"] = "|".join(re.escape(q) for q in targets)
    inside = [q for q in targets if spec.in_modules_to_save(q)]
    why = (f"its adapters on {inside[:3]} sit inside included modules, which PEFT copies "
           "whole (modules_to_save) and never puts LoRA in" if inside else
           f"PEFT's matching rules select {chosen[:4]} for targets {list(targets)[:4]}")
    raise _refuse(name, why)


def collect_peft(model: nn.Module, name: str, include: Sequence[str] | None = None
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` and tensors of set ``name`` as a PEFT LoRA folder."""
    require_sets(model, name, "save_adapters: ")
    if state.graph_base(model) is not None:
        raise _refuse(name, "the model was injected with method='fx', whose sites are not "
                            "modules PEFT can target")
    included = included_modules(model, resolve_include(model, name, include))
    check_norms(model, included)
    loras: dict[str, _Lora] = {}
    biases: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for qname, (module, slot) in set_slots(model, name).items():
        adapter = slot[name]
        _check_adapter(name, qname, module, adapter)
        dtypes[qname] = adapter.down.weight.dtype
        if linear_like(module):
            loras[qname] = _lora(module, adapter)
        elif _constant(adapter) and (bias := _new_bias(module, adapter)) is not None:
            biases[qname] = bias
        else:
            raise _refuse(name, f"'{qname}' is a {original_class(module).__name__}, not a "
                                "Linear (nor transformers' Conv1D): PEFT's LoRA there is not "
                                "an adapter's branch")
    if not loras:
        raise _refuse(name, "none of its adapters is on a Linear or Conv1D layer, and a PEFT "
                            "LoRA folder needs at least one")
    overlap = [q for q in [*loras, *biases] for m in included
               if q == m or q.startswith(m + ".")]
    if overlap:
        raise _refuse(name, f"its adapters on {overlap[:3]} sit inside included modules, "
                            "which PEFT copies whole (modules_to_save) and never adapts")
    scaling = next(iter(set_slots(model, name).values()))[1][name].scaling
    ranks = {q: lo.a.shape[0] for q, lo in loras.items()}
    fields = _spec(ranks, scaling)
    _check_selection(model, name, fields, ranks, scaling, list(included))
    lora_bias = any(lo.bias.any() for lo in loras.values())
    conv1d = [q for q in loras if not isinstance(dict(candidates(model))[q], nn.Linear)]
    meta = {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        **fields,
        "lora_dropout": next(iter(set_slots(model, name).values()))[1][name].config.dropout,
        "bias": "all" if biases else "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "fan_in_fan_out": len(conv1d) == len(loras),  # GPT-2's Conv1D layers (PEFT's flag)
        "modules_to_save": list(included) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "auto_mapping": {"base_model_class": original_class(model).__name__,
                         "parent_library": original_class(model).__module__},
    }
    tensors: dict[str, torch.Tensor] = {}
    for qname, lo in loras.items():
        dtype = dtypes[qname]
        tensors[f"{PREFIX}{qname}.lora_A.weight"] = lo.a.to(dtype).contiguous()
        tensors[f"{PREFIX}{qname}.lora_B.weight"] = lo.b.to(dtype).contiguous()
        if lora_bias:
            tensors[f"{PREFIX}{qname}.lora_B.bias"] = lo.bias.to(dtype).contiguous()
    for qname, bias in biases.items():
        tensors[f"{PREFIX}{qname}.bias"] = bias.to(dtypes[qname]).contiguous()
    for mname, module in included.items():
        for k, t in module_state(module).items():
            tensors[f"{PREFIX}{mname}.{k}"] = gathered(t)
    return meta, tensors


def save_peft(model: nn.Module, path: Path, name: str, include: Sequence[str] | None) -> Path:
    """Write set ``name`` to ``path`` as PEFT's LoRA folder, atomically (see
    ``save_adapters``); under ``torch.distributed``, rank 0 writes."""
    meta, tensors = collect_peft(model, name, include)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return write_on_rank_zero(path, meta, tensors)
    return write_atomically(path, meta, tensors)
