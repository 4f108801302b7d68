"""Reports, each an object whose ``str()`` is a table: ``summary`` (parameter counts per adapter
set and per top-level module) and ``plan`` (a dry run of ``inject``).

``plan`` runs every check that ``inject`` runs (selection, nesting, never-called children,
width and feature-axis inference, and with ``example_inputs`` every check on the real
outputs) and changes nothing. The output kind of each module is read, without running the
model, from its class's ``forward`` return annotation (``-> torch.Tensor``,
``-> tuple[...]``). Where there is none, the kind is ``unknown``; pass ``example_inputs=`` to
learn it from one run on fake tensors (see ``plan``).
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .layout import Layout, adapter_for
from .lifecycle import expand_presets
from .outputs import as_path, find_hidden
from .select import Targets
from .surgery import resolve
from .tree import adapted_modules, original_class


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "0.00%"


@dataclass(frozen=True)
class Summary:
    """Trainable and total parameter counts; ``str()`` is the table, ending in the seed's lines.

    ``rows`` holds ``(group, trainable, total)``: one per adapter set (``adapters[NAME]``),
    then one per top-level module without the adapters inside it (``decoder_blocks`` counts
    the blocks' own weights). Each parameter is in one row, so the rows add up to
    ``trainable`` and ``total``.
    """

    trainable: int
    total: int
    rows: tuple[tuple[str, int, int], ...] = field(default=())

    def __str__(self) -> str:
        table = format_table(
            ["group", "trainable", "total", "trainable %"],
            [(g, f"{t:,}", f"{n:,}", percent(t, n)) for g, t, n in self.rows],
        )
        note = ("(the module rows leave out the adapters inside them: the rows add up to "
                "the totals)\n" if any(g.startswith("adapters[") for g, _, _ in self.rows)
                else "")
        return (
            f"{table}\n{note}"
            f"Trainable params: {self.trainable} ({percent(self.trainable, self.total)})\n"
            f"Total params: {self.total}"
        )


def _count(params: list[nn.Parameter]) -> tuple[int, int]:
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def summary(model: nn.Module) -> Summary:
    """Count trainable and total parameters, per adapter set and per top-level module.

    A module's row leaves out the adapters inside it, which have their own rows, so every
    parameter is counted once and the rows add up to the totals (a tied parameter counts in
    the first row that holds it).

    Example:
        >>> import adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=64, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.1, N=2)
        >>> _ = adapterkit.inject(model, ["mha_block", "ffn_block"],
        ...                       adapterkit.AdapterConfig(bottleneck=8))
        >>> _ = adapterkit.freeze(model, train=["adapters"])
        >>> s = adapterkit.summary(model)
        >>> s.trainable == 4 * (2 * 32 * 8 + 8 + 32)
        True
        >>> str(s).splitlines()[-2]
        'Trainable params: 2208 (9.21%)'
    """
    by_set: dict[str, list[nn.Parameter]] = {}
    for _, _, slot in adapted_modules(model):
        for set_name, adapter in slot.items():
            by_set.setdefault(set_name, []).extend(adapter.parameters())
    groups = [(f"adapters[{name}]", params) for name, params in by_set.items()]
    groups += [("(root)", list(model.parameters(recurse=False)))]
    groups += [(name, list(child.parameters())) for name, child in model.named_children()]

    rows: list[tuple[str, int, int]] = []
    seen: set[int] = set()  # each parameter counts once, in the first group that holds it
    for group, params in groups:
        unique = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in unique)
        if unique:
            rows.append((group, *_count(unique)))
    trainable, total = _count(list(model.parameters()))
    return Summary(trainable=trainable, total=total, rows=tuple(rows))


# -- plan: a dry run of inject ---------------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    """One module that would be wrapped."""

    module: str  # qualified name
    module_class: str
    d_model: int
    feature_dim: int  # the axis of the output the adapter mixes: -1 last, else channels
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
            ["module", "class", "d_model", "axis", "output", "adapts", "params", "kind from"],
            [(r.module, r.module_class, r.d_model, r.feature_dim, r.output, r.adapts,
              f"{r.params:,}", r.found_by) for r in self.rows],
        )
        return f"{table}\n{len(self.rows)} adapters, {self.params:,} parameters"


def plan(
    model: nn.Module,
    targets: Targets,
    config: AdapterConfig | None = None,
    *,
    example_inputs: Any = None,
) -> Plan:
    """Dry-run ``inject``: the modules it would wrap, each with ``d_model``, feature axis,
    output kind and adapter parameter count. The model is not changed; errors are those
    ``inject`` raises.

    ``example_inputs``: as for ``inject``, inputs for one run on fake tensors that records
    every selected module's real output (a tensor: ``model(x)``; a tuple: ``model(*x)``; a
    dict: ``model(**x)``): widths come from it, mismatches are errors, and the output kind is
    the one seen.

    Example:
        >>> import adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=50, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.0, N=2)
        >>> p = adapterkit.plan(model, "auto", adapterkit.AdapterConfig(bottleneck=8))
        >>> p.modules[:2], p.params
        (['decoder_blocks.0.mha_block', 'decoder_blocks.0.ffn_block'], 2208)
        >>> p.rows[0].d_model, p.rows[0].feature_dim, p.rows[0].output, p.rows[0].params
        (32, -1, 'tensor', 552)
        >>> str(p).splitlines()[-1]
        '4 adapters, 2,208 parameters'
        >>> adapterkit.adapters(model)  # nothing was injected
        {}
    """
    config = AdapterConfig() if config is None else config
    resolved = resolve(model, expand_presets(model, targets), config,
                       example_inputs=example_inputs)
    rows = []
    for qname, (module, layout, calls) in resolved.items():
        output, adapts, found_by = (
            (*_describe(qname, calls[0].output, config), "run") if calls
            else _static_kind(module, config))
        rows.append(PlanRow(qname, original_class(module).__name__, layout.d_model,
                            layout.feature_dim, output, adapts,
                            _adapter_params(layout, config), found_by))
    listed = tuple(targets) if isinstance(targets, (list, tuple)) else (targets,)
    return Plan(listed, config, tuple(rows))


def _adapter_params(layout: Layout, config: AdapterConfig) -> int:
    return sum(p.numel() for p in adapter_for(layout, config, device="meta").parameters())


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
    path = as_path(config.output_key)
    adapts = "first tensor" if path is None else "".join(f"[{k!r}]" for k in path)
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


# -- output kind seen on example inputs ----------------------------------------------------------


def _describe(qname: str, output: Any, config: AdapterConfig) -> tuple[str, str]:
    if isinstance(output, torch.Tensor):
        return "tensor", "whole output"
    kind = type(output).__name__
    path = find_hidden(output, config.output_key, qname)
    return kind, "nothing (no tensor)" if path is None else "".join(f"[{k!r}]" for k in path)
