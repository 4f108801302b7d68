"""Per-example routing: one forward in which every example of the batch runs its own sets.

``with routed(model, names):`` gives each wrapped module's slot a ``Route``. At a slot, the route
groups the rows of the batch by the tuple of entries they run there (``names[i]`` minus the sets
that do not wrap this module), gathers each group's rows of the hidden state (and of the module's
input, which parallel adapters read), applies that tuple with the slot's own per-tensor code,
and writes the rows back. The base model runs once on the whole batch; each group's adapters run
once on the group's rows, so the cost grows with the number of distinct tuples, not the batch.

Which axis is the batch, at each module:

- a module that declares ``batch_first`` (``nn.MultiheadAttention``, the RNNs), or holds layers
  that do and agree, or sits inside one of torch's transformer layers whose attention does:
  axis 0 if ``batch_first`` else axis 1 (its output must then be batched, 3-D);
- any other module: axis 0, the convention of ``torch.nn`` layers and transformers' models.

A module whose batch axis has ``n = len(names)`` rows runs row ``i`` with ``names[i]``; with
``n = k * len(names)`` rows, row ``j`` runs ``names[j // k]``: each example's rows are
consecutive, as transformers' ``generate()`` lays them out when it expands a batch for beam
search or ``num_return_sequences`` (``repeat_interleave``), and as a ``(batch * seq)``
flattening does. Any other row count is refused: the rows cannot be matched to examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .. import state
from ..lifecycle import Entry, as_entries
from ..outputs import TENSOR_LIKE, find_hidden, first_tensor, get_path, replace_path
from ..slot import AdapterSlot
from ..surgery import check_entries
from ..tree import adapted_modules

# torch's own transformer layers pass (seq, batch, feature) tensors from layer to layer when
# their attention is not batch_first; no attribute on them says so but their attention's.
_TORCH_TRANSFORMERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                       nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)

Group = tuple[tuple[Entry, ...], "torch.Tensor | None"]  # entries, rows (None: every row)


def _declared(module: nn.Module) -> set[bool]:
    return {m.batch_first for m in module.modules()
            if isinstance(getattr(m, "batch_first", None), bool)}


def _layout(modules: dict[str, nn.Module], key: str) -> bool | None:
    """``batch_first`` as the module at ``key`` (or the one holding an FX site) declares it,
    or as the torch transformer layer around it does; None where nothing declares it."""
    parts = key.split(".") if key else []
    paths = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]  # nearest first
    here = next((p for p in paths if p in modules), "")
    declared = _declared(modules[here])
    if not declared:
        around = [p for p in paths if p in modules and len(p) < len(here)
                  and isinstance(modules[p], _TORCH_TRANSFORMERS)]
        declared = _declared(modules[around[0]]) if around else set()
    if len(declared) > 1:
        raise ValueError(
            f"module '{key}' holds layers with batch_first=True and batch_first=False, so "
            "routed() cannot know which axis of its output is the batch; target modules "
            "inside one of them instead"
        )
    return declared.pop() if declared else None


class Route:
    """The per-example entries of one ``routed()`` block, and how to apply them at a slot."""

    def __init__(self, rows: list[tuple[Entry, ...]], layouts: dict[int, bool | None]) -> None:
        self.rows = rows
        self.layouts = layouts  # id(slot) -> batch_first as declared, None: not declared
        self._here: dict[int, tuple[tuple[Entry, ...], ...]] = {}
        self._groups: dict[tuple, list[Group]] = {}

    def run(self, slot: AdapterSlot, output: Any, args: tuple, kwargs: dict) -> Any:
        rows = self._rows_at(slot)
        if not any(rows):
            return output  # no example runs a set that wraps this module
        if isinstance(output, TENSOR_LIKE):
            return self._route(slot, rows, output, args, kwargs)
        if slot.rnn is not None:
            return self._route_rnn(slot, rows, output)
        # Entries may adapt different items of a structured output: route each item apart.
        by_path: dict[Any, set[Entry]] = {}
        for entry in {e for row in rows for e in row}:
            path = find_hidden(output, slot.output_key(slot.entry(entry)), slot.target_name)
            by_path.setdefault(path, set()).add(entry)
        for path, entries in by_path.items():
            mine = tuple(tuple(e for e in row if e in entries) for row in rows)
            if path is None:  # no tensor in the output: the slot's own error
                return slot.apply_entries(next(row for row in mine if row), output, args, kwargs)
            hidden = self._route(slot, mine, get_path(output, path), args, kwargs)
            output = replace_path(output, path, hidden)
        return output

    def _route_rnn(self, slot: AdapterSlot, rows: tuple[tuple[Entry, ...], ...],
                   output: Any) -> Any:
        """An RNN's ``(sequence, h_n)`` or ``(sequence, (h_n, c_n))``: each group's rows of the
        sequence and of the final states go through the slot together (it keeps them in step);
        the states' batch axis is 1 whatever ``batch_first`` says."""
        seq, state = output
        if isinstance(seq, PackedSequence):
            raise ValueError(
                f"module '{slot.target_name}' returned a PackedSequence, whose rows are ordered "
                "by length rather than by example; routed() needs padded sequences there"
            )
        axis = self._axis(slot, seq)
        groups = self._grouped(rows, seq.shape[axis], seq.device)
        if len(groups) == 1 and groups[0][1] is None:
            return slot.apply_entries(groups[0][0], output, (), {})
        lstm = slot.rnn.lstm
        h_n, c_n = state if lstm else (state, None)
        out_seq = torch.empty_like(seq) if all(rows) else seq.clone()
        out_h = h_n.clone()
        for entries, index in groups:
            part = h_n.index_select(1, index)
            part_state = (part, c_n.index_select(1, index)) if lstm else part
            new_seq, new_state = slot.apply_entries(
                entries, (seq.index_select(axis, index), part_state), (), {})
            out_seq.index_copy_(axis, index, new_seq)
            out_h.index_copy_(1, index, new_state[0] if lstm else new_state)
        return out_seq, ((out_h, c_n) if lstm else out_h)

    def _rows_at(self, slot: AdapterSlot) -> tuple[tuple[Entry, ...], ...]:
        rows = self._here.get(id(slot))
        if rows is None:
            rows = tuple(tuple(e for e in row if slot.entry(e) is not None) for row in self.rows)
            self._here[id(slot)] = rows
        return rows

    def _axis(self, slot: AdapterSlot, hidden: torch.Tensor) -> int:
        where = f"module '{slot.target_name}'"
        if isinstance(hidden, torch.fx.Proxy):
            raise TypeError(f"{where} is being traced inside routed(); trace outside the block")
        flag = self.layouts.get(id(slot))
        if flag is not None and hidden.dim() != 3:
            raise ValueError(
                f"{where} is batch_first={flag}, but its output is {hidden.dim()}-D, not a "
                "batch (3-D); routed() cannot know the batch axis of an unbatched call"
            )
        if hidden.dim() < 2:
            raise ValueError(
                f"{where} gave a {hidden.dim()}-D output, which has no batch axis to route on"
            )
        axis = 1 if flag is False else 0
        n, examples = hidden.shape[axis], len(self.rows)
        if n == 0 or n % examples:
            raise ValueError(
                f"{where} saw {n} rows on its batch axis ({axis}), but routed() was given "
                f"{examples} names: the rows must be the examples, or k rows per example in a "
                "row (as generate() expands a batch for beam search); pass one name per example"
            )
        return axis

    def _route(self, slot: AdapterSlot, rows: tuple[tuple[Entry, ...], ...],
               hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        axis = self._axis(slot, hidden)
        n = hidden.shape[axis]
        groups = self._grouped(rows, n, hidden.device)
        if len(groups) == 1 and groups[0][1] is None:  # every row runs the same entries
            return slot.apply_entries(groups[0][0], hidden, args, kwargs)
        x = first_tensor(args, kwargs) if _reads_input(slot, rows) else None
        if x is not None and (x.dim() <= axis or x.shape[axis] != n):
            raise ValueError(
                f"module '{slot.target_name}' outputs {n} rows on axis {axis} but its input "
                f"has shape {tuple(x.shape)}: a parallel adapter there cannot be routed"
            )
        # rows that run no set here keep the module's output; when every row runs a set, each
        # row is written below and nothing needs copying first
        out = torch.empty_like(hidden) if all(rows) else hidden.clone()
        for entries, index in groups:
            part = hidden.index_select(axis, index)
            inputs = () if x is None else (x.index_select(axis, index),)
            out.index_copy_(axis, index, slot.apply_entries(entries, part, inputs, {}))
        return out

    def _grouped(self, rows: tuple[tuple[Entry, ...], ...], n: int,
                 device: torch.device) -> list[Group]:
        cache_key = (rows, n, device)
        groups = self._groups.get(cache_key)
        if groups is not None:
            return groups
        k = n // len(rows)
        by_entries: dict[tuple[Entry, ...], list[int]] = {}
        for i, entries in enumerate(rows):
            if entries:
                by_entries.setdefault(entries, []).extend(range(i * k, i * k + k))
        if len(by_entries) == 1 and all(rows):
            groups = [(next(iter(by_entries)), None)]
        else:
            groups = [(entries, torch.tensor(index, device=device))
                      for entries, index in by_entries.items()]
        self._groups[cache_key] = groups
        return groups


def _reads_input(slot: AdapterSlot, rows: tuple[tuple[Entry, ...], ...]) -> bool:
    """Whether a parallel adapter runs here for some row: only then is the input gathered."""
    for entry in {e for row in rows for e in row}:
        # a fusion or an average runs its sets' adapters; a set name, its own
        for name in getattr(slot.entry(entry), "sets", (entry,)):
            config = getattr(slot._modules.get(name), "config", None)
            if getattr(config, "placement", None) == "parallel":
                return True
    return False


def _check_rows(model: nn.Module, names: Sequence[Any]) -> list[tuple[Entry, ...]]:
    if isinstance(names, (str, torch.Tensor)) or not isinstance(names, Sequence) or not names:
        raise ValueError(
            "routed() takes one entry per example (a set name, a list of set names, or None "
            f"for the base model), got {names!r}"
        )
    rows = []
    checked: dict[tuple, tuple[Entry, ...]] = {}  # a batch has many rows, few distinct ones
    for i, name in enumerate(names):
        try:
            entries = tuple(as_entries(name))
            if entries not in checked:
                checked[entries] = check_entries(model, list(entries),
                                                 once="each set may run once per example")
            rows.append(checked[entries])
        except (TypeError, ValueError) as err:
            raise type(err)(f"example {i}: {err}") from None
    return rows


@contextmanager
def routed(model: nn.Module, names: Sequence[Any]) -> Iterator[nn.Module]:
    """Inside the block, example ``i`` of every batch runs the sets ``names[i]``.

    An entry is a set name, a list of them (stacked in that order), ``average(...)``, or None
    (the base model). Each example's output is what a forward of that example alone computes
    with only those sets active, in eval and in train mode (each set's parameters get
    gradients from its own examples only). The active sets are ignored inside the block and
    unchanged after it. See the module docstring for the batch axis and ``generate()``.

    Example:
        >>> import torch, adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=50, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.0, N=2).eval()
        >>> cfg = adapterkit.AdapterConfig(bottleneck=8, init="normal", init_std=0.1)
        >>> for name in ["a", "b"]:
        ...     _ = adapterkit.inject(model, ["mha_block", "ffn_block"], cfg, name=name)
        >>> x = torch.randint(0, 50, (3, 8))
        >>> with adapterkit.routed(model, ["a", None, ["a", "b"]]):
        ...     y = model(x)
        >>> adapterkit.set_active(model, ["a", "b"])
        >>> torch.allclose(y[2], model(x[2:3])[0], atol=1e-6)
        True
        >>> with adapterkit.disabled(model):
        ...     torch.allclose(y[1], model(x[1:2])[0], atol=1e-6)
        True
    """
    slots = adapted_modules(model)
    if not slots:
        raise ValueError("routed() needs adapter sets; this model has none (inject first)")
    if state.route(model) is not None:
        raise ValueError("the model is already inside routed(); one routing at a time")
    rows = _check_rows(model, names)
    modules = dict(model.named_modules())
    layouts = {id(slot): _layout(modules, key) for key, _, slot in slots}
    state.set_route(model, Route(rows, layouts))
    try:
        yield model
    finally:
        state.set_route(model, None)
