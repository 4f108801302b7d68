"""FX mode, tracing: the model as a ``torch.fx`` graph with its module sites marked.

``trace`` runs ``torch.fx`` with the user's tracer options (``TraceState``) and turns any
tracer failure into ``UntraceableModelError``; every call of a module selected by name comes
out of the graph through a ``module_output`` marker node, which ``adapterkit.fx`` later
replaces by the site's slot. ``last_dims`` propagates fake tensors through a traced graph to
find the width of values that no module owns (with ``probe.fake_run``, as ``inject`` reads
``example_inputs``).
"""

from __future__ import annotations

import re
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..errors import UntraceableModelError
from ..probe import fake_run
from ..select import compile_selector

# Frames of these files are adapterkit's own: an error quotes the model's line, not ours.
_OWN_FILE = re.compile(r"adapterkit/fx/\w+\.py$")


@dataclass
class TraceState:
    """What an FX result remembers: the module it was traced from and the tracer options."""

    base: nn.Module
    concrete_args: dict[str, Any] | None
    leaf_modules: tuple[object, ...]


def module_output(output: Any, x: Any) -> Any:
    """Stands in for a module site's slot between tracing and installing the slot."""
    return output


class SiteTracer(fx.Tracer):
    """A tracer that marks each call of a module in ``sites`` and keeps ``leaves`` opaque."""

    def __init__(self, leaves: Sequence[Callable[[str, nn.Module], bool]], sites: set[str]):
        super().__init__()
        self.proxy_buffer_attributes = True  # a buffer sliced by a traced size must be a node
        self.leaves, self.sites = leaves, sites
        self.called: set[str] = set()
        self.unadaptable: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or any(p(qualname, m) for p in self.leaves)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        qname = self.path_of_module(m)
        if qname not in self.sites:
            return out
        self.called.add(qname)
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if isinstance(out, fx.Proxy):
            return self._mark(qname, out, x)
        values = list(out.values()) if isinstance(out, dict) else out
        if not isinstance(out, (tuple, list, dict)) or not any(
            isinstance(v, fx.Proxy) for v in values
        ):
            self.unadaptable[qname] = type(out).__name__
            return out
        # Hand the model a container again, so that its code can unpack it.
        whole = self._mark(qname, out, x)
        if isinstance(out, dict):
            return type(out)((k, whole[k] if isinstance(v, fx.Proxy) else v)
                             for k, v in out.items())
        items = [whole[i] if isinstance(v, fx.Proxy) else v for i, v in enumerate(out)]
        return type(out)._make(items) if hasattr(out, "_make") else type(out)(items)

    def _mark(self, qname: str, out: Any, x: fx.Proxy | None) -> fx.Proxy:
        proxy = self.create_proxy("call_function", module_output, (out, x), {})
        proxy.node.meta["adapterkit_module"] = qname
        return proxy


def trace(base: nn.Module, sites: set[str], state: TraceState,
          check_mode: bool) -> tuple[fx.Graph, SiteTracer]:
    """The graph of ``base`` with every call of a module in ``sites`` marked, and its tracer.

    With ``check_mode``, warns when the graph differs between train and eval mode.
    """
    leaves = [compile_selector(s) for s in state.leaf_modules]
    tracer = SiteTracer(leaves, sites)
    try:
        graph = tracer.trace(base, state.concrete_args)
    except Exception as err:  # noqa: BLE001 - any tracer failure is reported the same way
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(base).__name__}: {type(err).__name__}: {err}"
            f"{_where(err)}. Use name mode instead (inject without method='fx') if the targets "
            "are modules; or pass concrete_args={...} to fix the inputs that drive Python "
            "control flow; or leaf_modules=[...] to keep the module that fails as one opaque "
            "call. The model was not changed"
        ) from err
    if check_mode and _depends_on_mode(base, tracer, state, graph):
        warnings.warn(
            f"the traced forward of {type(base).__name__} differs between train and eval mode "
            "(a Python branch on self.training): the FX result is fixed to "
            f"{'train' if base.training else 'eval'} mode as traced, whatever .train()/.eval() "
            "say later. Inject again from a model in the other mode to run that mode",
            stacklevel=5,  # trace < plan_sites < inject_fx < inject < the caller
        )
    return graph, tracer


def _where(err: Exception) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and not _OWN_FILE.search(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno}, in {f.name}: {f.line})"


def _depends_on_mode(base: nn.Module, tracer: SiteTracer, state: TraceState,
                     graph: fx.Graph) -> bool:
    flags = [(m, m.training) for m in base.modules()]
    other_mode = not base.training
    for m, _ in flags:
        m.training = other_mode  # set directly: a train() override may do more
    try:
        other = SiteTracer(tracer.leaves, tracer.sites).trace(base, state.concrete_args)
        # the second trace numbers its tensor constants after the first one's
        src = [re.sub(r"_tensor_constant\d+", "_tensor_constant", g.python_code("self").src)
               for g in (graph, other)]
        return src[0] != src[1]
    except Exception:  # noqa: BLE001 - the other mode does not even trace: it differs
        return True
    finally:
        for m, flag in flags:
            m.training = flag


# -- shape propagation -------------------------------------------------------------------------


class _Probe(nn.Module):
    """Runs the graph over the base and notes the last dim of every tensor it computes."""

    def __init__(self, base: nn.Module, graph: fx.Graph) -> None:
        super().__init__()
        self.base, self.graph = base, graph

    def forward(self, *args: Any, **kwargs: Any) -> dict[fx.Node, int | None]:
        widths: dict[fx.Node, int | None] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                if isinstance(result, torch.Tensor):
                    widths[n] = int(result.shape[-1]) if result.dim() else None
                return result

        # keyword inputs fill forward's parameters by name, in the graph's placeholder order
        names = [n.target for n in self.graph.nodes if n.op == "placeholder"][len(args):]
        missing = [n for n in names if n not in kwargs]
        if missing and kwargs:
            raise TypeError(f"example_inputs has no value for {missing}")
        Recorder(self.base, graph=self.graph).run(*args, *(kwargs[n] for n in names if kwargs))
        return widths


def last_dims(base: nn.Module, graph: fx.Graph, example_inputs: object) -> dict:
    """``node -> last dimension`` of every tensor ``graph`` computes on ``example_inputs``
    (as ``inject`` takes them: a tensor, a tuple of positional inputs or a dict of keyword
    inputs). A scalar's entry is None. Runs on fake tensors: the model is not touched."""
    try:
        return fake_run(_Probe(base, graph), example_inputs)
    except Exception as err:  # noqa: BLE001 - reported with the reason
        raise ValueError(
            f"example_inputs do not run through the traced {type(base).__name__} "
            f"({type(err).__name__}: {err}); pass forward's inputs: a tensor, a tuple of "
            "positional inputs or a dict of keyword inputs"
        ) from err
