"""The adapted module tree: the class a wrapped module gets, and finding what is wrapped.

A wrapped module's class is swapped for ``adapted_class(its class)``: a subclass of the same
name whose ``forward`` runs the original ``forward``, then the module's ``AdapterSlot`` (its
child ``SLOT``). ``original_class`` sees through that swap (and torch.distributed's),
``unwrapped`` through the wrappers around a whole model (torch.compile's, DDP), and the walks
below list the slots, the modules selection may choose from, and the set names.
"""

from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from .adapter import Adapter
from .slot import SLOT, AdapterSlot, Composition


class _Adapted:
    """Put in front of a wrapped module's class; ``adapted_class`` adds the ``forward``."""

    _adapterkit_base: type[nn.Module]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The adapted class is made at run time, so pickle (and deepcopy) rebuild it from
        # the base class rather than look it up by name.
        return (_rebuild, (self._adapterkit_base,), self.__getstate__())  # type: ignore[attr-defined]


class _AdaptedSequential(_Adapted):
    """nn.Sequential runs, counts and indexes its children: the slot must not be one of them."""

    def _layers(self) -> list[nn.Module]:
        return [m for key, m in self._modules.items() if key != SLOT]  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._layers())

    def __len__(self) -> int:
        return len(self._layers())

    def __getitem__(self, idx: int | slice) -> nn.Module:
        if isinstance(idx, slice):
            items = [(k, m) for k, m in self._modules.items() if k != SLOT]  # type: ignore[attr-defined]
            return nn.Sequential(OrderedDict(items[idx]))
        return self._layers()[idx]


def _fx_leaf(base: type[nn.Module]) -> bool:
    """Whether torch.fx's default tracer keeps modules of this class as one call_module node."""
    return base.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(
        base, nn.Sequential
    )


@functools.cache
def adapted_class(base: type[nn.Module]) -> type[nn.Module]:
    """The class a wrapped module of class ``base`` gets: same name, adapters after forward.

    Its ``__module__`` decides how torch.fx sees it. A torch.nn layer stays a leaf (one
    ``call_module`` node whose call runs the adapters), since tracing into, say,
    ``nn.MultiheadAttention`` fails; any other class is traced through, adapters included.
    """
    mixin = _AdaptedSequential if issubclass(base, nn.Sequential) else _Adapted
    module = base.__module__ if _fx_leaf(base) else __name__
    base_forward = base.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        slot = self._modules[SLOT]
        if slot.owners:  # type: ignore[union-attr]  # a set's own module may run instead
            return slot.call(self, base_forward, args, kwargs)  # type: ignore[union-attr]
        output = base_forward(self, *args, **kwargs)
        return slot.run(output, args, kwargs)  # type: ignore[union-attr]

    # the original's name, docstring and signature, for code that inspects forward
    functools.update_wrapper(forward, base_forward)
    namespace = {"_adapterkit_base": base, "forward": forward, "__module__": module,
                 "__qualname__": base.__qualname__}
    return type(base.__name__, (mixin, base), namespace)


def _rebuild(base: type[nn.Module]) -> nn.Module:
    cls = adapted_class(base)
    return cls.__new__(cls)


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, _Adapted)


def is_distributed_wrapper(cls: type) -> bool:
    """Whether ``cls`` is a class that torch.distributed swapped in: ``fully_shard`` (FSDP2)
    and ``replicate`` give a module a subclass of its class, ``FSDP<Cls>``, made at run time."""
    bases = cls.__bases__
    return (cls.__module__.startswith("torch.distributed.") and len(bases) > 1
            and cls.__name__.endswith(bases[-1].__name__))


def original_class(module: nn.Module) -> type[nn.Module]:
    """The class the user built: adapterkit's class swap and torch.distributed's seen through."""
    cls = type(module)
    while is_distributed_wrapper(cls):
        cls = cls.__bases__[-1]
    return cls._adapterkit_base if issubclass(cls, _Adapted) else cls  # type: ignore[attr-defined]


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper (never imports torch._dynamo)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    cls = getattr(eval_frame, "OptimizedModule", None)
    return cls is not None and isinstance(module, cls)


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, then the model inside each ``torch.compile`` ``OptimizedModule`` and
    ``DistributedDataParallel`` wrapper in turn (however nested): outermost first."""
    chain = [model]
    while True:
        if isinstance(chain[-1], nn.parallel.DistributedDataParallel):
            chain.append(chain[-1].module)
        elif _is_compiled(chain[-1]):
            chain.append(chain[-1]._orig_mod)
        else:
            return chain


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers: the one a file records.

    >>> import torch
    >>> inner = torch.nn.Linear(2, 2)
    >>> unwrapped(torch.compile(inner)) is inner
    True
    """
    return wrapper_chain(model)[-1]


def slot_of(module: nn.Module) -> AdapterSlot | None:
    return module._modules.get(SLOT) if isinstance(module, _Adapted) else None  # type: ignore[return-value]


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module | None, AdapterSlot]]:
    """Every adapter slot in the model, each once, in model order, as ``(key, owner, slot)``.

    ``owner`` is the wrapped module and ``key`` its qualified name; a slot that sits in a
    graph (FX mode) rather than on a module has no owner, and its key is its
    ``target_name``.
    """
    found = []
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if not isinstance(module, AdapterSlot):
            continue
        parent_path = path[: -len(SLOT) - 1] if path.endswith("." + SLOT) else ""
        owner = modules.get(parent_path) if path.endswith(SLOT) else None
        if owner is not None and slot_of(owner) is module:
            found.append((parent_path, owner, module))
        else:
            found.append((module.target_name, None, module))
    return found


def candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` without descending into adapterkit's slots and adapters."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        out.append((prefix, module))
        for name, child in module._modules.items():
            if child is not None and not isinstance(child, (AdapterSlot, Adapter)):
                walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out


def every_name(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Like ``candidates``, but a module registered under several names comes once per name
    (a shared or tied submodule), so that selection can match any of them."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, ancestors: frozenset[int]) -> None:
        out.append((prefix, module))
        for name, child in module._modules.items():
            if child is not None and not isinstance(child, (AdapterSlot, Adapter)) and (
                id(child) not in ancestors
            ):
                walk(f"{prefix}.{name}" if prefix else name, child, ancestors | {id(child)})

    walk("", model, frozenset({id(model)}))
    return out


def set_names(model: nn.Module) -> list[str]:
    """The injected set names, in the order they were first seen in the model."""
    names: dict[str, None] = {}
    for _, _, slot in adapted_modules(model):
        names.update(dict.fromkeys(slot.keys()))
    return list(names)


def require_sets(model: nn.Module, names: str | Sequence[str], context: str = "") -> None:
    """Refuse set names the model does not hold: one name (a str) or a list of them.

    >>> from torch import nn
    >>> require_sets(nn.Linear(2, 2), "a", "eject: ")
    Traceback (most recent call last):
    ...
    ValueError: eject: no adapter set named 'a'; injected sets: []
    """
    known = set_names(model)
    unknown = [n for n in ([names] if isinstance(names, str) else names) if n not in known]
    if unknown:
        shown = repr(unknown[0]) if isinstance(names, str) else unknown
        raise ValueError(f"{context}no adapter set named {shown}; injected sets: {known}")


def set_slots(model: nn.Module, name: str) -> dict[str, tuple[nn.Module | None, AdapterSlot]]:
    """``{key: (owner, slot)}`` for every slot that holds set ``name``, in model order (keys
    and owners as in ``adapted_modules``)."""
    return {key: (owner, slot) for key, owner, slot in adapted_modules(model) if name in slot}


def composed_sets(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """``{set: the sets it composes}`` for every set whose modules compose others (fusions)."""
    return {name: entry.sets for _, _, slot in adapted_modules(model)
            for name, entry in slot.items() if isinstance(entry, Composition)}


def is_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (never imports transformers)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    cls = getattr(modeling, "PreTrainedModel", None)
    return cls is not None and isinstance(model, cls)
