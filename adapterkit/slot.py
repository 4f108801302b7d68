"""The container that holds a wrapped module's adapters and applies them to its output.

A wrapped module gets one ``AdapterSlot`` child, registered under ``SLOT`` ("adapterkit"), with
one adapter per set. Its parameters therefore appear as
``<module>.adapterkit.<set>.down.weight`` and no base key changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .adapter import Adapter, check_forward, checkpoint_scope
from .outputs import TENSOR_LIKE, find_hidden, first_tensor, get_path, replace_path

if TYPE_CHECKING:
    from .state import ModelState

SLOT = "adapterkit"


@runtime_checkable
class Composition(Protocol):
    """What a composition of sets provides to a slot: an ``average(...)`` entry of the
    active list, or a fusion module held in the slot under its own name.

    ``delta`` returns what the composition adds to ``hidden`` at ``slot``; it gets its sets'
    branches from ``slot.delta``.
    """

    @property
    def sets(self) -> tuple[str, ...]: ...

    def present(self, slot: AdapterSlot) -> bool: ...

    def output_key(self, slot: AdapterSlot) -> Any: ...

    def delta(self, slot: AdapterSlot, hidden: torch.Tensor, args: tuple,
              kwargs: dict) -> torch.Tensor: ...


@dataclass(frozen=True)
class RNNState:
    """How a wrapped ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` lays out its final state ``h_n``,
    so that the last layer's entries follow the adapted output sequence."""

    batch_first: bool
    directions: int
    lstm: bool  # the state is (h_n, c_n)

    @classmethod
    def of(cls, module: nn.Module) -> RNNState | None:
        if not isinstance(module, nn.RNNBase):
            return None
        return cls(module.batch_first, 2 if module.bidirectional else 1,
                   isinstance(module, nn.LSTM))


class Owned(nn.Module):
    """A set's own copy (or replacement) of the module its slot sits on (``adapterkit.own``):
    while the set is active it runs instead of that module, on the same inputs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def extra_repr(self) -> str:
        return "runs instead of the module while its set is active"


class AdapterSlot(nn.ModuleDict):
    """The adapters of one wrapped module, keyed by set name, and the order they run in; and
    the modules sets own there (``Owned``), one of which runs instead of the module."""

    def __init__(self, target_name: str, rnn: RNNState | None = None) -> None:
        super().__init__()
        self.target_name = target_name  # for error messages only
        self.rnn = rnn
        # the sets that own this module: read at every forward, so kept rather than derived
        self.owners: frozenset[str] = frozenset()
        # The model-wide state (state.py), shared by every slot of the model: the active list,
        # whose entries this slot applies where it holds them, in that order, and the route
        # inside adapterkit.routed(). Set by state.join when the slot joins a model.
        self.shared: ModelState | None = None

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(key, module)
        self.owners = frozenset(k for k, m in self._modules.items() if isinstance(m, Owned))

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.owners = frozenset(k for k, m in self._modules.items() if isinstance(m, Owned))

    def plan(self) -> Any:
        """What runs here now: inside adapterkit.routed(), the route (each example its own
        sets); else the active list; in a checkpoint's recompute, what its forward ran."""
        shared = self.shared
        if shared is None:
            return ()  # not part of a model yet
        plan = shared.route if shared.route is not None else shared.active
        if (self.training or torch.is_grad_enabled()) and not torch.compiler.is_compiling():
            plan = _replayed(self, plan)
        return plan

    def run(self, output: Any, args: tuple, kwargs: dict) -> Any:
        plan = self.plan()
        if isinstance(plan, tuple):
            return self.apply_entries(plan, output, args, kwargs)
        return plan.run(self, output, args, kwargs)

    def call(self, module: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        """The wrapped module's call when sets own it: the active owner's module runs instead
        of ``forward`` (the module's own), then the adapters."""
        plan = self.plan()
        if not isinstance(plan, tuple):
            return plan.call(self, module, forward, args, kwargs)
        owner = next((e for e in plan if isinstance(e, str) and e in self.owners), None)
        if owner is None:
            output = forward(module, *args, **kwargs)
        else:
            output = self._modules[owner].module(*args, **kwargs)  # type: ignore[union-attr]
        return self.apply_entries(plan, output, args, kwargs)

    def apply_entries(self, entries: tuple, output: Any, args: tuple, kwargs: dict) -> Any:
        """Apply ``entries`` (set names, or compositions such as ``average(...)``) in order;
        an entry with nothing at this module passes the output through."""
        for entry in entries:
            module = self.entry(entry)
            if module is not None and not isinstance(module, Owned):
                output = self._apply_one(str(entry), module, output, args, kwargs)
        return output

    def entry(self, entry: Any) -> Any:
        """What runs ``entry`` here: its ``Adapter`` or fusion module, a composition that has
        a set here, or None."""
        if isinstance(entry, str):
            return self._modules.get(entry)
        return entry if entry.present(self) else None

    def output_key(self, adapter: Any) -> Any:
        """The ``output_key`` an entry adapts: an adapter's own, a composition's sets'."""
        if isinstance(adapter, Adapter):
            return adapter.config.output_key
        return adapter.output_key(self)

    def _apply_one(
        self, name: str, adapter: Any, output: Any, args: tuple, kwargs: dict
    ) -> Any:
        if self.rnn is not None and not isinstance(output, TENSOR_LIKE):
            return self._apply_rnn(name, adapter, output, args, kwargs)
        path = find_hidden(output, self.output_key(adapter), self.target_name)
        if path is None:
            raise ValueError(
                f"module '{self.target_name}' returned {type(output).__name__} with no tensor "
                f"in it, so the adapter of set '{name}' would do nothing; target a module that "
                "returns its hidden state"
            )
        hidden = get_path(output, path)
        return replace_path(output, path, hidden + self.delta(name, adapter, hidden, args,
                                                              kwargs))

    def delta(self, name: str, adapter: Adapter | Composition, hidden: torch.Tensor,
              args: tuple, kwargs: dict) -> torch.Tensor:
        """What entry ``name`` (run by ``adapter``) adds to ``hidden``: an adapter's branch, of
        the output or of the input; a composition's (fusion, average) mix of its sets'."""
        if not isinstance(adapter, Adapter):
            return adapter.delta(self, hidden, args, kwargs)
        self._check(name, adapter, hidden, "output")
        if not isinstance(hidden, torch.fx.Proxy):
            check_forward(self.target_name, name, adapter, hidden)
        if adapter.config.placement == "sequential":
            return adapter.branch(hidden)
        x = first_tensor(args, kwargs)
        if x is None:
            raise ValueError(
                f"module '{self.target_name}' was called without a tensor argument, so the "
                f"parallel adapter of set '{name}' has no input; use placement='sequential'"
            )
        self._check(name, adapter, x, "input", adapter.d_in)
        if not isinstance(x, torch.fx.Proxy) and _as_output(x, adapter) != hidden.shape:
            raise ValueError(
                f"module '{self.target_name}' takes an input of shape {tuple(x.shape)} and "
                f"returns {tuple(hidden.shape)}: the parallel adapter of set '{name}' adds a "
                "branch of the input to the output, which needs the two shapes equal; use "
                "placement='sequential' there"
            )
        return adapter.branch(x)

    def _apply_rnn(self, name: str, adapter: Any, output: Any, args: tuple,
                   kwargs: dict) -> Any:
        """Adapt an RNN's output sequence, and add the same change to the last layer's final
        state, which is that sequence's last step (the backward direction's first)."""
        seq, state = output
        data = seq.data if isinstance(seq, PackedSequence) else seq
        delta = self.delta(name, adapter, data, args, kwargs)
        if isinstance(seq, PackedSequence):
            new_seq = PackedSequence(data + delta, seq.batch_sizes, seq.sorted_indices,
                                     seq.unsorted_indices)
        else:
            new_seq = data + delta
        h_n = state[0] if self.rnn.lstm else state
        h_n = h_n + _final_state_delta(self.rnn, seq, delta, h_n)
        return new_seq, ((h_n, state[1]) if self.rnn.lstm else h_n)

    def _check(self, name: str, adapter: Adapter, t: torch.Tensor, what: str,
               width: int | None = None) -> None:
        if isinstance(t, torch.fx.Proxy):
            return  # being traced by torch.fx: no shape yet, and no branching on one
        dim, width = adapter.feature_dim, adapter.d_model if width is None else width
        if not -t.dim() <= dim < t.dim() or t.shape[dim] != width:
            size = f"size {t.shape[dim]} on axis {dim}" if -t.dim() <= dim < t.dim() else (
                f"no axis {dim} (shape {tuple(t.shape)})")
            has = f"d_model={width}" if what == "output" else f"an input width of {width}"
            raise ValueError(
                f"module '{self.target_name}' {what}s {size}, but the adapter of set "
                f"'{name}' has {has} there; inject with "
                f"AdapterConfig(d_model=..., feature_dim=...) matching the {what}, pass "
                "example_inputs=... to inject so that they are read off a real output, or "
                "choose a target whose output is the hidden state"
            )

    def extra_repr(self) -> str:
        return f"active={list(self.shared.active) if self.shared else []}"


class _Plans:
    """What each slot ran during one checkpointed forward, for its recomputation.

    Gradient checkpointing runs a block again during backward; by then the active sets or the
    route may have changed (a loss computed after a ``routed()`` block, two forwards with other
    sets before one backward). The recompute must run what the forward ran, or the gradients
    are wrong: each slot's plans are recorded in call order and replayed in the same order,
    counted per backward pass (a graph task), so that every backward replays them all.
    """

    def __init__(self) -> None:
        self.calls: dict[AdapterSlot, list[Any]] = {}
        self.cursor: dict[tuple[AdapterSlot, int], int] = {}

    def replay(self, slot: AdapterSlot) -> Any:
        calls = self.calls.get(slot, [])
        key = (slot, torch._C._current_graph_task_id())
        i = self.cursor.get(key, 0)
        self.cursor[key] = i + 1
        if i >= len(calls):
            raise RuntimeError(
                f"module '{slot.target_name}' ran {i + 1} time(s) while gradient checkpointing "
                f"recomputed its block, but {len(calls)} time(s) in the forward: adapterkit "
                "cannot tell which adapter sets the extra call ran. Keep the block's calls the "
                "same in the forward and the recompute (no branching on state that changes)"
            )
        return calls[i]


_PLANS = "_adapterkit_plans"  # set on a checkpoint call's own object (see checkpoint_scope)


def _replayed(slot: AdapterSlot, plan: Any) -> Any:
    """``plan`` (what runs now) recorded in a checkpointed forward, or, in the recompute of
    that forward, what the slot ran then."""
    scope = checkpoint_scope()
    if scope is None:
        return plan
    phase, key = scope
    plans = getattr(key, _PLANS, None)
    if phase == "forward":
        if plans is None:
            plans = _Plans()
            setattr(key, _PLANS, plans)
        plans.calls.setdefault(slot, []).append(plan)
        return plan
    # a recompute: a slot that did not run in the forward (injected since) runs nothing
    return plans.replay(slot) if plans is not None and slot in plans.calls else ()


def _as_output(x: torch.Tensor, adapter: Adapter) -> torch.Size:
    """The shape of a parallel adapter's branch of input ``x``: ``x``'s, with ``d_model``
    features (a Linear's input and output differ only there)."""
    shape = list(x.shape)
    shape[adapter.feature_dim] = adapter.d_model
    return torch.Size(shape)


def _final_state_delta(rnn: RNNState, seq: Any, delta: torch.Tensor,
                       h_n: torch.Tensor) -> torch.Tensor:
    """``delta`` (the change to the output sequence) at the steps that ``h_n``'s last layer
    holds, laid out as ``h_n``: zero for the earlier layers."""
    if isinstance(seq, PackedSequence):
        padded, lengths = pad_packed_sequence(
            PackedSequence(delta, seq.batch_sizes, seq.sorted_indices, seq.unsorted_indices),
            batch_first=True)
        last = padded[torch.arange(padded.shape[0]), lengths.to(padded.device) - 1]  # (N, D*H)
        first = padded[:, 0]
    else:
        steps = delta if delta.dim() == 2 else delta if rnn.batch_first else delta.transpose(0, 1)
        # (N, L, D*H), or (L, D*H) for an unbatched input
        last, first = steps[..., -1, :], steps[..., 0, :]
    width = h_n.shape[-1]
    ends = [last[..., :width]] + ([first[..., width:]] if rnn.directions == 2 else [])
    zeros = h_n.new_zeros(h_n.shape[0] - rnn.directions, *h_n.shape[1:])
    return torch.cat([zeros, torch.stack(ends)], dim=0)
