"""Per-example routing: one forward in which every example of the batch runs its own sets.

``with routed(model, names):`` gives each wrapped module's slot a ``Route``. At a slot, the route
groups the rows of the batch by the tuple of entries they run there (``names[i]`` minus the sets
that do not wrap this module), gathers each group's rows of the hidden state (and of the module's
input, which parallel adapters read), applies that tuple with the slot's own per-tensor code,
and writes the rows back. The base model runs once on the whole batch; each group's adapters run
once on the group's rows, so the cost grows with the number of distinct tuples, not the batch.

The batch axis is never guessed from a row count. It is ``batch_dim`` (default 0, the layout of
``torch.nn`` layers and transformers' models) for the model's input (its forward's first tensor,
positional then keyword arguments) and for every module that declares nothing; a module that
declares ``batch_first`` (``nn.MultiheadAttention``, the RNNs), or holds layers that do and
agree, or sits inside one of torch's transformer layers, has it on axis 0 if ``batch_first``
else 1 (its output must then be 3-D); so does a model that is itself such a layer.

The rows are counted at the model's forward, before anything in it runs: one row per name, or
``k`` per name only when the forward is called from transformers' ``generate()``, which expands
each prompt to ``k`` consecutive rows for beam search and ``num_return_sequences`` (row ``j``
runs ``names[j // k]``). Every wrapped module must then see exactly that many rows on its batch
axis (one per name when called outside the model's forward: a submodule called directly, a
recompute under checkpointing); any other count (a ``(batch * seq)`` flattening, the tokens a
mixture of experts' gate sends to one expert) is refused, since those rows cannot be matched to
examples. A count can match by chance (an expert that gets one token per example, a sequence
as long as the batch): hence the docs' advice never to target inside experts, and to pass
``batch_dim=1`` to a sequence-first model.
"""

from __future__ import annotations

import inspect
import sys
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
from ..tree import adapted_modules, original_class

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

    def __init__(self, rows: list[tuple[Entry, ...]], layouts: dict[int, bool | None],
                 batch_dim: int | None = None, own: bool | None = None) -> None:
        self.rows = rows
        self.layouts = layouts  # id(slot) -> batch_first as declared, None: not declared
        self.batch_dim = batch_dim  # where nothing is declared; None: axis 0
        self.own = own  # batch_first as the model itself declares it (_own_layout)
        # rows on the batch axis per forward of the model in progress (a stack: the model may
        # call itself); None where its input told nothing (then one row per name)
        self._batches: list[int | None] = []
        self._here: dict[int, tuple[tuple[Entry, ...], ...]] = {}
        self._groups: dict[tuple, list[Group]] = {}

    # -- the model's forward: how many rows the batch has -------------------------------------

    def enter(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook on the model: read the batch off its input, or refuse the call
        before anything in the model runs."""
        self._batches.append(None)  # popped by leave(), which runs even if this raises
        x = first_tensor(args, kwargs)
        if isinstance(x, torch.Tensor):
            self._batches[-1] = self._batch_of(model, x)

    def leave(self, *_: Any) -> None:
        """A forward hook on the model (``always_call``): the forward is over."""
        self._batches.pop()

    def _batch_of(self, model: nn.Module, x: torch.Tensor) -> int | None:
        names, flag = len(self.rows), self.own
        if flag is not None:  # nn.MultiheadAttention, an RNN, a torch transformer layer
            if x.dim() != 3:
                return None  # an unbatched call: its slots refuse it, naming the layout
            axis = 0 if flag else 1
        else:
            axis = self.batch_dim or 0
        n = x.shape[axis] if x.dim() > axis else None
        if n == names:
            return n
        if n and n % names == 0 and flag is None and _in_generate():
            return n  # generate() expanded each prompt to n // names consecutive rows
        raise ValueError(_batch_error(model, x, axis, names, n, flag))

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

    def call(self, slot: AdapterSlot, module: nn.Module, forward: Any, args: tuple,
             kwargs: dict) -> Any:
        """A module that sets own: each group of rows runs its set's own module (or the
        module itself) on its rows of the inputs; then the adapters, as ``run``."""
        owners = tuple(next((e for e in row if isinstance(e, str) and e in slot.owners), None)
                       for row in self.rows)
        if len(set(owners)) == 1:
            output = self._owned_call(slot, owners[0], module, forward, args, kwargs)
            return self.run(slot, output, args, kwargs)
        x = first_tensor(args, kwargs)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"module '{slot.target_name}' is owned by routed sets but was "
                             "called without a tensor: its rows cannot be split by example")
        axis = self._axis(slot, x)
        n = x.shape[axis]
        outputs = []
        for (owner,), index in self._grouped(tuple((o,) for o in owners), n, x.device):
            def part(value: Any, index: torch.Tensor = index) -> Any:
                batched = (isinstance(value, torch.Tensor) and value.dim() > axis
                           and value.shape[axis] == n)
                return value.index_select(axis, index) if batched else value

            out = self._owned_call(slot, owner, module, forward, tuple(map(part, args)),
                                   {k: part(v) for k, v in kwargs.items()})
            outputs.append((owner, index, out))
        return self.run(slot, _stitch(slot, outputs, axis, n), args, kwargs)

    @staticmethod
    def _owned_call(slot: AdapterSlot, owner: str | None, module: nn.Module, forward: Any,
                    args: tuple, kwargs: dict) -> Any:
        if owner is None:
            return forward(module, *args, **kwargs)
        return slot[owner].module(*args, **kwargs)

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
        axis = (0 if flag else 1) if flag is not None else self.batch_dim or 0
        n = hidden.shape[axis] if hidden.dim() > axis else None
        batch = self._batches[-1] if self._batches else None
        if n != (batch or len(self.rows)):
            raise ValueError(self._rows_error(where, hidden, axis, n, batch, flag))
        return axis

    def _rows_error(self, where: str, hidden: torch.Tensor, axis: int, n: int | None,
                    batch: int | None, flag: bool | None) -> str:
        names = len(self.rows)
        seen = (f"saw {n} rows on its batch axis ({axis})" if n is not None else
                f"has no batch axis {axis} (its output has shape {tuple(hidden.shape)})")
        expected = (f"the batch has {batch} ({batch // names} per name, as generate() expanded "
                    "it)" if batch and batch != names else f"routed() was given {names} names")
        fix = "" if flag is not None else (
            "; or, if its batch is on another axis, pass routed(..., batch_dim=that axis)")
        return (
            f"{where} {seen}, but {expected}: its rows cannot be matched to examples. A module "
            "that sees a (batch * seq) flattening, or a data-dependent subset of the rows (an "
            "expert of a mixture of experts, fed the tokens its gate picks), cannot be routed: "
            "target a module that sees whole examples (the mixture-of-experts block, not its "
            f"experts){fix}"
        )

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


def _own_layout(model: nn.Module) -> bool | None:
    """``batch_first`` as the model itself declares it (one of torch's layers that do), or
    None: the layers inside a model of one's own do not say how its input is laid out."""
    own = getattr(model, "batch_first", None)
    if isinstance(own, bool):
        return own
    declared = _declared(model) if isinstance(model, _TORCH_TRANSFORMERS) else set()
    return declared.pop() if len(declared) == 1 else None


def _in_generate() -> bool:
    """Whether transformers' ``GenerationMixin.generate`` is on the call stack (looked up in
    ``sys.modules``: the engine never imports transformers)."""
    utils = sys.modules.get("transformers.generation.utils")
    generate = getattr(getattr(utils, "GenerationMixin", None), "generate", None)
    code = getattr(inspect.unwrap(generate), "__code__", None) if generate else None
    frame = sys._getframe(1) if code is not None else None
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _batch_error(model: nn.Module, x: torch.Tensor, axis: int, names: int, n: int | None,
                 flag: bool | None) -> str:
    what = f"model {original_class(model).__name__}" + (
        f" (batch_first={flag})" if flag is not None else "")
    seen = f"saw {n} rows on its batch axis ({axis})" if n is not None else (
        f"has no batch axis {axis}")
    others = [d for d in range(x.dim()) if d != axis and x.shape[d] == names]
    if others and flag is None:
        fix = (f"if axis {others[0]} is the batch (a sequence-first input), pass "
               f"routed(model, names, batch_dim={others[0]})")
    elif n and n % names == 0 and flag is None:
        fix = (f"{n // names} rows per name are read as one example's rows only inside "
               "transformers' generate() (beam search, num_return_sequences); elsewhere pass "
               "one name per row")
    else:
        fix = "pass one name per example"
    if flag is None and not others:
        fix += ", or batch_dim= the axis that holds the examples"
    return (f"{what} {seen}, but routed() was given {names} names (its input, the forward's "
            f"first tensor, has shape {tuple(x.shape)}): {fix}")


def _stitch(slot: AdapterSlot, outputs: list[tuple[str | None, torch.Tensor, Any]], axis: int,
            n: int) -> torch.Tensor:
    """One output from each group's rows, in the batch's order; refused when the groups' modules
    give outputs of different shapes (heads with different numbers of labels)."""
    shapes = {owner: (tuple(out.shape[:axis]) + tuple(out.shape[axis + 1:])
                      if isinstance(out, torch.Tensor) and out.dim() > axis else None)
              for owner, _, out in outputs}
    if None in shapes.values() or len(set(shapes.values())) > 1:
        seen = ", ".join(f"{'the base' if o is None else repr(o)}: {s}" for o, s in shapes.items())
        raise ValueError(
            f"module '{slot.target_name}' is owned by the routed sets, and their modules give "
            f"outputs of different shapes or no tensor ({seen}, the batch axis left out), which "
            "one batch cannot hold: route sets whose modules there agree (e.g. heads with the "
            "same number of labels) in one batch, and the others in their own batches"
        )
    first = outputs[0][2]
    out = first.new_empty((*first.shape[:axis], n, *first.shape[axis + 1:]))
    for _, index, part in outputs:
        out.index_copy_(axis, index, part)
    return out


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
def routed(model: nn.Module, names: Sequence[Any],
           batch_dim: int | None = None) -> Iterator[nn.Module]:
    """Inside the block, example ``i`` of every batch runs the sets ``names[i]``.

    An entry is a set name, a list of them (stacked in that order), ``average(...)``, or None
    (the base model). Each example's output is what a forward of that example alone computes
    with only those sets active, in eval and in train mode (each set's parameters get
    gradients from its own examples only). The active sets are ignored inside the block and
    unchanged after it.

    ``batch_dim`` is the batch axis of the model's input and of every wrapped module that
    declares no ``batch_first`` (default 0); pass ``batch_dim=1`` for a sequence-first model,
    whose tensors are ``(seq, batch, ...)``. See the module docstring for the rules and for
    ``generate()``.

    Raises:
        ValueError: names that are not one entry per example, or that name unknown sets; a
            bad ``batch_dim``; nested blocks. At a forward inside the block: an input whose
            batch axis does not hold one row per name (``k`` per name inside ``generate()``),
            refused before the model runs; a wrapped module whose batch axis holds another
            number of rows (its rows cannot be matched to examples). The model is left as it
            was.

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
    own = _own_layout(model)
    _check_batch_dim(model, batch_dim, own)
    modules = dict(model.named_modules())
    layouts = {id(slot): _layout(modules, key) for key, _, slot in slots}
    route = Route(rows, layouts, batch_dim, own)
    state.set_route(model, route)
    hooks = [model.register_forward_pre_hook(route.enter, with_kwargs=True),
             model.register_forward_hook(route.leave, always_call=True)]
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        state.set_route(model, None)


def _check_batch_dim(model: nn.Module, batch_dim: int | None, flag: bool | None) -> None:
    if batch_dim is None:
        return
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise ValueError(f"routed(): batch_dim must be an axis, an int >= 0, got {batch_dim!r}")
    if flag is not None and batch_dim != (0 if flag else 1):
        raise ValueError(
            f"routed(): {original_class(model).__name__} is batch_first={flag}, so its batch is "
            f"axis {0 if flag else 1}, not batch_dim={batch_dim}; batch_dim is for modules that "
            "declare no batch_first: leave it out"
        )
