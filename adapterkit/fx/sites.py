"""FX mode, sites: the places in a traced graph that can carry an adapter, and which to adapt.

``Sites.find`` lists a trace's module sites (the ``module_output`` markers), call sites (every
function and method call) and residual sites (``add(skip, branch)`` where ``skip`` flows into
``branch`` through a learned weight), each under a key that is stable across traces.
``plan_sites`` traces the base, turns the user's selectors (the name grammar, ``calls(...)``,
``"residual"``) into the sites of a new set, gives each its adapter width and checks it all,
before ``adapterkit.fx`` changes anything.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..config import AdapterConfig
from ..layout import LAST, Layout, infer_layout
from ..select import as_selector_list, compile_selector, select_modules
from ..slot import AdapterSlot
from ..tree import candidates
from .trace import SiteTracer, TraceState, last_dims, module_output, trace

RESIDUAL = "residual"
_ADDS = (operator.add, torch.add)
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension", "get_device"})
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})


@dataclass(frozen=True)
class Calls:
    """Selects call sites of one function (or, for a str, one tensor method) in a graph."""

    target: Callable[..., Any] | str

    def matches(self, node: fx.Node) -> bool:
        if isinstance(self.target, str):
            return node.op == "call_method" and node.target == self.target
        return node.op == "call_function" and node.target is self.target

    def __call__(self, name: str, module: nn.Module) -> bool:
        raise TypeError(
            f"{self} selects function call sites, which exist only in a traced graph; "
            "pass method='fx' to inject"
        )

    def __str__(self) -> str:
        t = self.target
        return f"calls({t!r})" if isinstance(t, str) else f"calls({getattr(t, '__name__', t)})"


def calls(fn: Callable[..., Any] | str) -> Calls:
    """Select every call of ``fn`` in the traced graph (FX mode); a str names a tensor method.

    Example:
        >>> import operator, torch.nn.functional as F
        >>> calls(F.linear)
        Calls(target=<built-in function linear>)
        >>> calls("transpose") == calls(torch.Tensor.transpose) == Calls("transpose")
        True
    """
    if isinstance(fn, type) and issubclass(fn, nn.Module):
        raise TypeError(
            f"calls() takes a function or a method name; {fn.__name__} is a module class: "
            f"select its call sites with the class itself, targets=[{fn.__name__}]"
        )
    if isinstance(fn, str) and fn:
        return Calls(fn)
    if not isinstance(fn, str) and callable(fn):
        name = getattr(fn, "__name__", "")
        # torch.Tensor.transpose is traced as the method call x.transpose(...)
        return Calls(name if getattr(torch.Tensor, name, None) is fn else fn)
    raise TypeError(f"calls() takes a function or a non-empty method name, got {fn!r}")


# -- finding sites ---------------------------------------------------------------------------


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def _keyed(nodes: Sequence[fx.Node], base_name: Callable[[fx.Node], str]) -> dict[str, fx.Node]:
    """Key nodes ``<scope>.<name>[_i]``, counting per scope and name, in graph order."""
    counts: Counter[tuple[str, str]] = Counter()
    keyed = {}
    for n in nodes:
        scope, name = _scope(n), base_name(n)
        i = counts[scope, name]
        counts[scope, name] += 1
        local = f"{name}_{i}" if i else name
        keyed[f"{scope}.{local}" if scope else local] = n
    return keyed


def _is_shape_read(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    return n.op == "call_function" and n.target is getattr and n.args[1] in _SHAPE_ATTRS


def _data_inputs(n: fx.Node) -> list[fx.Node]:
    if _is_shape_read(n):  # a size or dtype carries no data: no residual flows through it
        return []
    if n.target is module_output:
        found: list[fx.Node] = []
        fx.node.map_arg(n.args[0], found.append)
        return found
    return n.all_input_nodes


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_weight(n: fx.Node, base: nn.Module) -> bool:
    if n.op == "call_module":
        return next(base.get_submodule(n.target).parameters(), None) is not None
    return any(i.op == "get_attr" and isinstance(_fetch(base, i.target), nn.Parameter)
               for i in n.all_input_nodes)


def _residuals(graph: fx.Graph, base: nn.Module) -> dict[str, tuple[fx.Node, fx.Node, fx.Node]]:
    """``key -> (add, skip, branch)`` for every residual add, in graph order.

    Ancestor and descendant sets are bit masks over node positions, so the whole search is
    two passes over the graph.
    """
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    inputs = {n: _data_inputs(n) for n in nodes}
    anc: dict[fx.Node, int] = {}
    weighted = 0
    for n in nodes:
        anc[n] = 1 << pos[n]
        for i in inputs[n]:
            anc[n] |= anc[i]
        if n.op.startswith("call_") and _has_weight(n, base):
            weighted |= 1 << pos[n]
    desc = {n: 1 << pos[n] for n in nodes}
    for n in reversed(nodes):
        for i in inputs[n]:
            desc[i] |= desc[n]
    adds = []
    for n in nodes:
        is_add = (n.op == "call_function" and n.target in _ADDS) or (
            n.op == "call_method" and n.target == "add")
        a, b = (n.args + (None, None))[:2]
        if not (is_add and isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            continue
        for skip, branch in ((a, b), (b, a)):
            between = anc[branch] & desc[skip] & ~(1 << pos[skip])
            if anc[branch] >> pos[skip] & 1 and between & weighted:
                adds.append((n, skip, branch))
    by_add = {add: (add, skip, branch) for add, skip, branch in adds}
    return {key: by_add[n] for key, n in _keyed(list(by_add), lambda _: RESIDUAL).items()}


@dataclass
class Sites:
    """Everything in one trace that can carry an adapter, by key."""

    modules: dict[str, list[fx.Node]] = field(default_factory=dict)  # key -> marker nodes
    calls: dict[str, fx.Node] = field(default_factory=dict)
    residuals: dict[str, tuple[fx.Node, fx.Node, fx.Node]] = field(default_factory=dict)

    @classmethod
    def find(cls, graph: fx.Graph, base: nn.Module, want_residuals: bool) -> Sites:
        sites = cls()
        ops = []
        for n in graph.nodes:
            if n.target is module_output:
                sites.modules.setdefault(n.meta["adapterkit_module"], []).append(n)
            elif n.op in ("call_function", "call_method"):
                ops.append(n)
        sites.calls = _keyed(ops, lambda n: re.sub(r"_\d+$", "", n.name))
        sites.residuals = _residuals(graph, base) if want_residuals else {}
        return sites

    def kind(self, key: str) -> str | None:
        for kind, table in (("module", self.modules), ("call", self.calls),
                            (RESIDUAL, self.residuals)):
            if key in table:
                return kind
        return None

    def output(self, key: str) -> fx.Node:
        """The node whose value the adapter at ``key`` receives."""
        if key in self.modules:
            return self.modules[key][0]
        return self.calls[key] if key in self.calls else self.residuals[key][2]


# -- selection -------------------------------------------------------------------------------


def _split_targets(targets: object) -> tuple[list[object], list[Calls], bool]:
    """``targets`` as (name-grammar selectors, ``calls(...)`` selectors, whether "residual")."""
    items = [targets] if isinstance(targets, Calls) else as_selector_list(targets)
    calls_ = [t for t in items if isinstance(t, Calls)]
    names = [t for t in items if not isinstance(t, Calls) and t != RESIDUAL]
    for sel in names:
        compile_selector(sel)  # a bad selector fails here, before any tracing
    return names, calls_, RESIDUAL in items


def _select_modules(base: nn.Module, names: list[object]) -> dict[str, nn.Module]:
    """The modules the name-grammar selectors ``names`` select, selector by selector."""
    named = [(n, m) for n, m in candidates(base) if n]
    chosen: dict[str, nn.Module] = {}
    # Not select_modules(named, names): it refuses an empty list (targets of only calls(...)
    # or "residual") and sorts the union in model order, and adapters are created, their
    # weights drawn, in the order of this dict.
    for sel in names:
        chosen |= select_modules(named, [sel])  # raises, naming the closest modules
    return chosen


def _choose(base: nn.Module, sites: Sites, tracer: SiteTracer,
           module_names: dict[str, nn.Module], calls_: list[Calls],
           residual: bool) -> dict[str, str]:
    """``key -> kind`` of the sites the new set adapts; an error for a selector without one."""
    uncalled = [q for q in module_names if q not in tracer.called]
    if uncalled:
        raise ValueError(
            f"module(s) {uncalled[:5]} are selected but never called in the traced forward "
            "(a parent reads their weights directly, or they sit inside a leaf module); "
            "select the module that is called, or a function with calls(...)"
        )
    if tracer.unadaptable:
        q, kind = next(iter(tracer.unadaptable.items()))
        raise ValueError(
            f"module '{q}' returns {kind} while traced, which holds no traced tensor; FX mode "
            "adapts a module that returns a tensor or a tuple/list/dict with one"
        )
    chosen = {q: "module" for q in module_names}
    for sel in calls_:
        hits = {k: "call" for k, n in sites.calls.items() if sel.matches(n)}
        if not hits:
            present = sorted({f"{'.' if n.op == 'call_method' else ''}{_op_name(n)}"
                              for n in sites.calls.values()})
            raise ValueError(f"{sel} selects nothing: the traced graph has no such call; "
                             f"calls present: {', '.join(present[:20])}")
        chosen |= hits
    if residual:
        if not sites.residuals:
            raise ValueError(
                f"'residual' selects nothing: the traced {type(base).__name__} has no add(skip, "
                "branch) where skip flows into branch through a learned weight; select modules "
                "by name or calls(...) instead"
            )
        chosen |= dict.fromkeys(sites.residuals, RESIDUAL)
    return chosen


def _op_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


# -- widths ----------------------------------------------------------------------------------


def _widths(base: nn.Module, graph: fx.Graph, sites: Sites, chosen: dict[str, str],
            config: AdapterConfig, example_inputs: object) -> dict[str, Layout]:
    """The adapter layout of each chosen site: ``config``'s, else the module's, else the last
    dimension its value has on ``example_inputs``."""
    axis = LAST if config.feature_dim is None else config.feature_dim
    if config.d_model is not None and (config.feature_dim is not None or not any(
            kind == "module" for kind in chosen.values())):
        return dict.fromkeys(chosen, Layout(config.d_model, axis))
    layouts: dict[str, Layout] = {}
    for key, kind in chosen.items():
        if kind == "module":
            layouts[key] = infer_layout(base.get_submodule(key), config, key, base)
        elif config.d_model is not None:
            layouts[key] = Layout(config.d_model, axis)
    need = [k for k in chosen if k not in layouts]
    if need and (example_inputs is None or axis != LAST):
        raise ValueError(
            f"cannot infer d_model for graph site(s) {need[:3]}: a traced call has no module to "
            "read a width from; pass AdapterConfig(d_model=<width of the value there>), or "
            "example_inputs=(...) to inject so that shapes are propagated through the graph"
        )
    if need:
        dims = last_dims(base, graph, example_inputs)
        for key in need:
            width = dims.get(sites.output(key))
            if width is None:
                raise ValueError(f"graph site '{key}' does not output a tensor with a last "
                                 "dimension on example_inputs; select a site that does")
            layouts[key] = Layout(width)
    return layouts


# -- the plan --------------------------------------------------------------------------------


@dataclass
class SitePlan:
    """Where a new set goes: the fresh trace, its sites, the chosen ones and their widths."""

    graph: fx.Graph
    sites: Sites
    chosen: dict[str, str]  # key -> kind of the sites the new set adapts
    widths: dict[str, Layout]


def plan_sites(base: nn.Module, state: TraceState, prior: dict[str, AdapterSlot],
               targets: object, config: AdapterConfig, example_inputs: object) -> SitePlan:
    """Trace, find and check every site: everything that can fail, before any change.

    ``prior`` holds the slots of the sets already injected, which a fresh trace must find again.
    """
    names, calls_, residual = _split_targets(targets)
    module_names = _select_modules(base, names)
    wanted = set(module_names) | {k for k, s in prior.items() if s.kind == "module"}
    graph, tracer = trace(base, wanted, state, check_mode=not prior)
    sites = Sites.find(graph, base, residual or any(s.kind == RESIDUAL for s in prior.values()))
    chosen = _choose(base, sites, tracer, module_names, calls_, residual)
    lost = [k for k, s in prior.items() if sites.kind(k) != s.kind]
    if lost:
        raise ValueError(f"sites {lost[:3]} of the sets already injected are not in a fresh "
                         "trace of the base: the base changed since; inject from it anew")
    clash = [k for k, kind in chosen.items() if sites.kind(k) != kind]
    if clash:
        raise ValueError(f"site key(s) {clash[:3]} name two different sites; select one of them")
    widths = _widths(base, graph, sites, chosen, config, example_inputs)
    return SitePlan(graph, sites, chosen, widths)
