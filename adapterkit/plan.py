"""A dry run of ``inject``: the modules it would wrap, their width, output kind and adapter cost.

``plan`` runs every check that ``inject`` runs (selection, nesting, never-called children,
``d_model`` inference) and changes nothing. The output kind of each module is read, without
running the model, from its class's ``forward`` return annotation (``-> torch.Tensor``,
``-> tuple[...]``). Where there is none, the kind is ``unknown``; pass ``example=`` inputs to
learn it from one forward pass (see ``plan``).
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .config import AdapterConfig
from .lifecycle import expand_presets
from .report import format_table
from .select import Targets
from .slot import find_hidden
from .surgery import original_class, resolve


@dataclass(frozen=True)
class PlanRow:
    """One module that would be wrapped."""

    module: str  # qualified name
    module_class: str
    d_model: int
    output: str  # "tensor", "tuple", "dict", a class name, or "unknown"
    adapts: str  # which part of the output the adapter changes
    params: int  # parameters of the adapter it would get
    found_by: str  # how the output kind was learnt: "annotation", "run", or "-"


@dataclass(frozen=True)
class Plan:
    """What ``inject(model, targets, config)`` would do; ``str()`` is a table."""

    targets: tuple[object, ...]  # the selectors, after "auto" is expanded
    config: AdapterConfig
    rows: tuple[PlanRow, ...]

    @property
    def modules(self) -> list[str]:
        return [row.module for row in self.rows]

    @property
    def params(self) -> int:
        return sum(row.params for row in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        table = format_table(
            ["module", "class", "d_model", "output", "adapts", "params", "kind from"],
            [(r.module, r.module_class, r.d_model, r.output, r.adapts, f"{r.params:,}",
              r.found_by) for r in self.rows],
        )
        return f"{table}\n{len(self.rows)} adapters, {self.params:,} parameters"


def plan(
    model: nn.Module,
    targets: Targets,
    config: AdapterConfig | None = None,
    *,
    example: Any = None,
) -> Plan:
    """Dry-run ``inject``: the modules it would wrap, each with ``d_model``, output kind and
    adapter parameter count. The model is not changed; errors are those ``inject`` raises.

    ``example``: inputs for one forward pass that learns the output kind of every selected
    module (a tensor: ``model(example)``; a tuple: ``model(*example)``; a dict:
    ``model(**example)``). That pass runs in eval mode under ``torch.no_grad()`` with the
    random state saved and restored, and puts every module's ``training`` flag back after.

    Example:
        >>> import adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=50, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.0, N=2)
        >>> p = adapterkit.plan(model, "auto", adapterkit.AdapterConfig(bottleneck=8))
        >>> p.modules[:2], p.params
        (['decoder_blocks.0.mha_block', 'decoder_blocks.0.ffn_block'], 2208)
        >>> p.rows[0].d_model, p.rows[0].output, p.rows[0].params
        (32, 'tensor', 552)
        >>> str(p).splitlines()[-1]
        '4 adapters, 2,208 parameters'
        >>> adapterkit.adapters(model)  # nothing was injected
        {}
    """
    config = AdapterConfig() if config is None else config
    resolved = resolve(model, expand_presets(model, targets), config)
    chosen = {qname: module for qname, (module, _) in resolved.items()}
    widths = {qname: width for qname, (_, width) in resolved.items()}
    seen = _run(model, chosen, example, config) if example is not None else {}
    rows = []
    for qname, module in chosen.items():
        output, adapts, found_by = seen.get(qname) or _static_kind(module, config)
        rows.append(PlanRow(qname, original_class(module).__name__, widths[qname], output,
                            adapts, _adapter_params(widths[qname], config), found_by))
    listed = tuple(targets) if isinstance(targets, (list, tuple)) else (targets,)
    return Plan(listed, config, tuple(rows))


def _adapter_params(d_model: int, config: AdapterConfig) -> int:
    return sum(p.numel() for p in Adapter(d_model, config, device="meta").parameters())


# -- output kind without running: the forward's return annotation ------------------------------

_TUPLE = re.compile(r"^(typing\.)?(tuple|Tuple)\b")
_TENSOR = re.compile(r"^(torch\.)?Tensor$")


def _annotation_text(cls: type) -> str | None:
    ann = getattr(cls.forward, "__annotations__", {}).get("return")
    if ann is None or isinstance(ann, str):
        return ann
    if isinstance(ann, type) and typing.get_origin(ann) is None:
        return "Tensor" if issubclass(ann, torch.Tensor) else ann.__name__
    return repr(ann)


def _static_kind(module: nn.Module, config: AdapterConfig) -> tuple[str, str, str]:
    text = _annotation_text(original_class(module))
    if text is None and isinstance(module, nn.Sequential) and len(module) > 0:
        return _static_kind(module[-1], config)  # a Sequential returns its last layer's output
    adapts = "first tensor" if config.output_key is None else f"[{config.output_key!r}]"
    if text is None or _is_union(text):
        return "unknown", adapts, "-"
    text = text.strip()
    if _TENSOR.match(text):
        return "tensor", "whole output", "annotation"
    return "tuple" if _TUPLE.match(text) else text.split("[")[0], adapts, "annotation"


def _is_union(text: str) -> bool:
    """``A | B``, ``Union[...]`` or ``Optional[...]`` at the top level: the kind varies."""
    if re.match(r"^(typing\.)?(Union|Optional)\[", text.strip()):
        return True
    depth = 0
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "|" and depth == 0:
            return True
    return False


# -- output kind by running once -----------------------------------------------------------------


def _run(
    model: nn.Module, chosen: dict[str, nn.Module], example: Any, config: AdapterConfig
) -> dict[str, tuple[str, str, str]]:
    seen: dict[str, tuple[str, str, str]] = {}

    def record(qname: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if qname not in seen:
                seen[qname] = (*_describe(qname, output, config), "run")
        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(record(q)) for q, m in chosen.items()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            if isinstance(example, dict):
                model(**example)
            elif isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return seen


def _describe(qname: str, output: Any, config: AdapterConfig) -> tuple[str, str]:
    if isinstance(output, torch.Tensor):
        return "tensor", "whole output"
    kind = type(output).__name__
    key = find_hidden(output, config.output_key, qname)
    return kind, "nothing (no tensor)" if key is None else f"[{key!r}]"
