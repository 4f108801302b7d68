"""FX mode: adapters as a ``torch.fx`` graph rewrite, for models without a module to wrap.

``inject(model, targets, method="fx")`` traces the model and returns a ``GraphModule`` in which
each selected site's value passes through a ``GraphSlot`` (an ``AdapterSlot`` that is its own
``call_module`` node). Three kinds of site can be selected:

==============================  ==============================================================
selector                        sites
==============================  ==============================================================
``"mha_block"``, globs, ...     every call of a module the name grammar selects (select.py);
                                key: the module's qualified name
``calls(F.linear)``             every call of that function; ``calls("transpose")``: of that
                                method; key: ``<module scope>.<op>[_i]``, e.g.
                                ``decoder_blocks.0.linear_1``
``"residual"``                  every residual branch: for ``add(skip, branch)`` where ``skip``
                                flows into ``branch`` through a learned weight, the adapter goes
                                on ``branch``; key: ``<module scope>.residual[_i]``
==============================  ==============================================================

Keys are local to the module scope the op runs in and count only its own kind, so they are the
same on every trace of the same model. The ``GraphModule`` holds the base's own parameters (no
copy); the model passed in is never changed. See ``docs/fx.md``.

>>> import torch, adapterkit
>>> import torch.nn.functional as F
>>> class Block(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.w1 = torch.nn.Parameter(torch.randn(16, 8))
...         self.w2 = torch.nn.Parameter(torch.randn(8, 16))
...     def forward(self, x):
...         return x + F.linear(F.gelu(F.linear(x, self.w1)), self.w2)
>>> model, x = Block(), torch.randn(2, 8)
>>> gm = adapterkit.inject(model, "residual", adapterkit.AdapterConfig(d_model=8), method="fx")
>>> list(adapterkit.adapters(gm)), bool(torch.equal(gm(x), model(x)))
(['residual'], True)
>>> adapterkit.eject(gm) is model
True
"""

from __future__ import annotations

import logging
import operator
import re
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .adapter import Adapter
from .config import AdapterConfig
from .select import as_selector_list, compile_selector, select_modules
from .slot import AdapterSlot
from .surgery import (
    _check_set_name,
    _factory_kwargs,
    adapted_modules,
    candidates,
    current_active,
    infer_d_model,
    set_names,
    store_active,
)

logger = logging.getLogger(__name__)

STATE = "_adapterkit_fx_base"  # lifecycle.eject dispatches on this attribute
CONTAINER = "adapterkit_fx"  # GraphSlots live at adapterkit_fx.<key with '.' -> '_'>
RESIDUAL = "residual"
_ADDS = (operator.add, torch.add)
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension", "get_device"})
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
# GraphModule.__deepcopy__ sets the attributes named here on the copy
_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY",
                     "_user_preserved_attributes")


class UntraceableModelError(ValueError):
    """``torch.fx`` could not trace the model; the message quotes the tracer's reason."""


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


class GraphSlot(AdapterSlot):
    """An ``AdapterSlot`` that is a graph node of its own: ``slot(output, x)``.

    ``x`` is what a parallel adapter reads: the module's first tensor argument at a module
    site, the call's first tensor argument at a call site, the skip value at a residual site.
    """

    def __init__(self, target_name: str, kind: str) -> None:
        super().__init__(target_name)
        self.kind = kind  # "module", "call" or "residual": how a re-trace finds the site again

    def forward(self, output: Any, x: torch.Tensor | None = None) -> Any:
        return self.run(output, () if x is None else (x,), {})


@dataclass
class _State:
    """What an FX result remembers: the module it was traced from and the tracer options."""

    base: nn.Module
    concrete_args: dict[str, Any] | None
    leaf_modules: tuple[object, ...]


def _module_output(output: Any, x: Any) -> Any:
    """Stands in for a module site's slot between tracing and installing the slot."""
    return output


# -- tracing --------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
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
        proxy = self.create_proxy("call_function", _module_output, (out, x), {})
        proxy.node.meta["adapterkit_module"] = qname
        return proxy


def _trace(base: nn.Module, sites: set[str], state: _State, check_mode: bool) -> tuple:
    leaves = [compile_selector(s) for s in state.leaf_modules]
    tracer = _Tracer(leaves, sites)
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
            stacklevel=5,  # _trace < _plan < inject_fx < inject < the caller
        )
    return graph, tracer


def _where(err: Exception) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and not f.filename.endswith("adapterkit/fx.py")]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno}, in {f.name}: {f.line})"


def _depends_on_mode(base: nn.Module, tracer: _Tracer, state: _State, graph: fx.Graph) -> bool:
    flags = [(m, m.training) for m in base.modules()]
    other_mode = not base.training
    for m, _ in flags:
        m.training = other_mode  # set directly: a train() override may do more
    try:
        other = _Tracer(tracer.leaves, tracer.sites).trace(base, state.concrete_args)
        # the second trace numbers its tensor constants after the first one's
        src = [re.sub(r"_tensor_constant\d+", "_tensor_constant", g.python_code("self").src)
               for g in (graph, other)]
        return src[0] != src[1]
    except Exception:  # noqa: BLE001 - the other mode does not even trace: it differs
        return True
    finally:
        for m, flag in flags:
            m.training = flag


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
    if n.target is _module_output:
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
class _Sites:
    """Everything in one trace that can carry an adapter, by key."""

    modules: dict[str, list[fx.Node]] = field(default_factory=dict)  # key -> marker nodes
    calls: dict[str, fx.Node] = field(default_factory=dict)
    residuals: dict[str, tuple[fx.Node, fx.Node, fx.Node]] = field(default_factory=dict)

    @classmethod
    def find(cls, graph: fx.Graph, base: nn.Module, want_residuals: bool) -> _Sites:
        sites = cls()
        ops = []
        for n in graph.nodes:
            if n.target is _module_output:
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
    items = [targets] if isinstance(targets, Calls) else as_selector_list(targets)
    calls_ = [t for t in items if isinstance(t, Calls)]
    names = [t for t in items if not isinstance(t, Calls) and t != RESIDUAL]
    for sel in names:
        compile_selector(sel)  # a bad selector fails here, before any tracing
    return names, calls_, RESIDUAL in items


def _choose(base: nn.Module, sites: _Sites, tracer: _Tracer, module_names: dict[str, nn.Module],
            calls_: list[Calls], residual: bool) -> dict[str, str]:
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


def _select_modules(base: nn.Module, names: list[object]) -> dict[str, nn.Module]:
    named = [(n, m) for n, m in candidates(base) if n]
    chosen: dict[str, nn.Module] = {}
    for sel in names:
        chosen |= select_modules(named, [sel])  # raises, naming the closest modules
    return chosen


# -- widths ----------------------------------------------------------------------------------


def _widths(base: nn.Module, graph: fx.Graph, sites: _Sites, chosen: dict[str, str],
            config: AdapterConfig, example_inputs: object) -> dict[str, int]:
    if config.d_model is not None:
        return dict.fromkeys(chosen, config.d_model)
    widths: dict[str, int] = {}
    for key, kind in chosen.items():
        if kind == "module":
            try:
                widths[key] = infer_d_model(base.get_submodule(key), config, key)
            except ValueError:
                pass
    need = [k for k in chosen if k not in widths]
    if need and example_inputs is None:
        raise ValueError(
            f"cannot infer d_model for graph site(s) {need[:3]}: a traced call has no module to "
            "read a width from; pass AdapterConfig(d_model=<width of the value there>), or "
            "example_inputs=(...) to inject so that shapes are propagated through the graph"
        )
    if need:
        shapes = _shapes(base, graph, example_inputs)
        for key in need:
            width = shapes.get(sites.output(key))
            if width is None:
                raise ValueError(f"graph site '{key}' does not output a tensor with a last "
                                 "dimension on example_inputs; select a site that does")
            widths[key] = width
    return widths


class _Probe(nn.Module):
    """Runs the graph over the base (its tensors swapped for fakes) and notes last dims."""

    def __init__(self, base: nn.Module, graph: fx.Graph) -> None:
        super().__init__()
        self.base, self.graph = base, graph

    def forward(self, *args: Any) -> dict[fx.Node, int | None]:
        widths: dict[fx.Node, int | None] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                if isinstance(result, torch.Tensor):
                    widths[n] = int(result.shape[-1]) if result.dim() else None
                return result

        Recorder(self.base, graph=self.graph).run(*args)
        return widths


def _shapes(base: nn.Module, graph: fx.Graph, example_inputs: object) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tensor or a tuple of forward's positional "
                        f"inputs, got {type(example_inputs).__name__}")
    probe = _Probe(base, graph)
    try:
        # Fake tensors: no compute, no RNG draw, and a module's in-place state updates
        # (BatchNorm statistics) land on the fakes, never on the model.
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            state = {k: mode.from_tensor(t) for k, t in (
                *probe.named_parameters(remove_duplicate=False),
                *probe.named_buffers(remove_duplicate=False))}
            args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                         for a in example_inputs)
            return torch.func.functional_call(probe, state, args)
    except Exception as err:  # noqa: BLE001 - reported with the reason
        raise ValueError(
            f"example_inputs do not run through the traced {type(base).__name__} "
            f"({type(err).__name__}: {err}); pass forward's positional inputs as a tuple"
        ) from err


# -- installing -------------------------------------------------------------------------------


def _share_state(base: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` every parameter and buffer of ``base`` at its own key, the same tensors.

    ``GraphModule`` copies only what the graph uses, and registers every buffer as
    persistent: a base checkpoint would then not load into it.
    """
    tensors = [*base.named_parameters(remove_duplicate=False),
               *base.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        owner_path, _, leaf = name.rpartition(".")
        owner = base.get_submodule(owner_path)
        target: nn.Module = gm
        for part in owner_path.split(".") if owner_path else []:
            if part not in target._modules:
                target.add_module(part, nn.Module())
            target = target._modules[part]  # type: ignore[assignment]
        if target is owner:
            continue  # a module the graph calls: shared as a whole
        if isinstance(t, nn.Parameter):
            target.register_parameter(leaf, t)
        else:
            persistent = leaf not in owner._non_persistent_buffers_set
            target.register_buffer(leaf, t, persistent=persistent)


def _sync_back(gm: fx.GraphModule, base: nn.Module) -> None:
    """Hand tensors that ``gm`` replaced (``.to(device)`` moves buffers) back to ``base``."""
    for name, t in [*gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False)]:
        owner_path, _, leaf = name.rpartition(".")
        try:
            owner = base.get_submodule(owner_path)
        except AttributeError:
            continue  # adapterkit's own
        if getattr(owner, leaf, None) is not t and (
                leaf in owner._parameters or leaf in owner._buffers):
            setattr(owner, leaf, t)


def _slot_path(key: str, taken: set[str]) -> str:
    name = re.sub(r"\W", "_", key) or "root"
    stem, i = name, 1
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    taken.add(name)
    return f"{CONTAINER}.{name}"


def _install(gm: fx.GraphModule, sites: _Sites, slots: dict[str, GraphSlot]) -> None:
    container = gm._modules.get(CONTAINER)
    if container is None:
        container = nn.Module()
        gm.add_module(CONTAINER, container)
    paths = {slot.target_name: f"{CONTAINER}.{n}" for n, slot in container.named_children()}
    taken = set(container._modules)
    for key, slot in slots.items():
        if key not in paths:
            paths[key] = _slot_path(key, taken)
            container.add_module(paths[key].split(".", 1)[1], slot)
    graph = gm.graph
    # Residual slots first: a call slot on the same node then sits before them.
    for key, (add, skip, branch) in sites.residuals.items():
        if key in slots:
            with graph.inserting_before(add):
                node = graph.call_module(paths[key], (branch, skip))
            add.replace_input_with(branch, node)
    for key, n in sites.calls.items():
        if key in slots:
            with graph.inserting_after(n):
                node = graph.call_module(paths[key], (n, next(iter(n.all_input_nodes), None)))
            n.replace_all_uses_with(node, delete_user_cb=lambda user, s=node: user is not s)
    for key, markers in sites.modules.items():  # every traced module site has a slot
        for marker in markers:
            with graph.inserting_before(marker):
                node = graph.call_module(paths[key], marker.args)
            marker.replace_all_uses_with(node)
            graph.erase_node(marker)
    # Slots in graph order, so that adapters() and state_dict() list them as the model runs.
    order = {n.target: i for i, n in reversed(list(enumerate(graph.nodes)))
             if n.op == "call_module"}
    container._modules = dict(sorted(container._modules.items(),
                                     key=lambda kv: order[f"{CONTAINER}.{kv[0]}"]))
    graph.lint()
    gm.recompile()


def _remove_empty_slots(gm: fx.GraphModule) -> None:
    empty = {p for p, m in gm.named_modules() if isinstance(m, GraphSlot) and len(m) == 0}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in empty:
            continue
        out = node.args[0]
        if isinstance(out, fx.Node):
            node.replace_all_uses_with(out)
        else:  # a container output: the model read it through getitem nodes
            for user in list(node.users):
                user.replace_all_uses_with(out[user.args[1]])  # type: ignore[index]
                graph.erase_node(user)
        graph.erase_node(node)
    for path in empty:
        gm.delete_submodule(path)
    if CONTAINER in gm._modules and not gm._modules[CONTAINER]._modules:  # type: ignore[union-attr]
        del gm._modules[CONTAINER]
    graph.lint()
    gm.recompile()


# -- the verbs -------------------------------------------------------------------------------


def _state_of(model: nn.Module, concrete_args: object, leaf_modules: object) -> _State:
    state = getattr(model, STATE, None)
    held = set_names(model if state is None else state.base)  # the base holds no FX slot
    if held:
        raise ValueError(
            f"the model holds name-mode adapter sets {held}, which a trace would bake in; "
            "eject them first, or inject every set with method='fx'"
        )
    if state is not None:
        if concrete_args is not None or leaf_modules:
            raise TypeError(
                "tracer options (concrete_args, leaf_modules) were fixed when this GraphModule "
                "was made; inject the new set without them (example_inputs is allowed)"
            )
        return state
    if hasattr(model, CONTAINER):
        raise ValueError(f"the model already has an attribute '{CONTAINER}', which FX mode "
                         "needs for its adapters; rename that attribute")
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise TypeError(f"concrete_args must be a dict of argument name -> value, got "
                        f"{type(concrete_args).__name__}")
    leaves = tuple(as_selector_list(leaf_modules)) if leaf_modules else ()
    for sel in leaves:
        compile_selector(sel)
    return _State(model, concrete_args, leaves)


def inject_fx(
    model: nn.Module,
    targets: object,
    config: AdapterConfig,
    *,
    name: str = "default",
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: object = (),
    example_inputs: object = None,
    **unknown: object,
) -> fx.GraphModule:
    """Trace ``model`` and put set ``name``'s adapters at every site ``targets`` selects.

    Called by ``adapterkit.inject(..., method="fx")``. Returns a new ``GraphModule`` that
    shares ``model``'s parameters; ``model`` itself is not changed. Given an FX result, adds
    the set to it in place (re-tracing the same base with the same tracer options).

    Options: ``concrete_args`` (``torch.fx`` concrete arguments), ``leaf_modules`` (selectors
    of modules kept as one opaque call), ``example_inputs`` (forward's positional inputs, for
    the width of call and residual sites when ``config.d_model`` is not set).

    Example:
        >>> import torch, adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=50, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.0, N=2).eval()
        >>> x = torch.randint(0, 50, (2, 8))
        >>> gm = adapterkit.inject(model, "residual", method="fx", example_inputs=(x,))
        >>> sorted(adapterkit.adapters(gm))[:2]
        ['decoder_blocks.0.residual', 'decoder_blocks.0.residual_1']
        >>> bool(torch.equal(gm(x), model(x)))
        True
    """
    if unknown:
        raise TypeError(f"unknown FX option(s) {sorted(unknown)}; method='fx' takes "
                        "concrete_args, leaf_modules and example_inputs")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    state = _state_of(model, concrete_args, leaf_modules)
    _check_set_name(model, name)
    base = state.base
    prior = {key: slot for key, _, slot in adapted_modules(model)} if model is not base else {}
    active = [*current_active(model), name] if prior else [name]
    # torch.fx parks the tensor constants it meets as attributes of the traced module: they
    # stay there while the graph is analysed and built, and leave it afterwards, error or not.
    before = set(base.__dict__)
    try:
        plan = _plan(base, state, prior, targets, config, example_inputs)
        constants = {k: base.__dict__[k] for k in set(base.__dict__) - before}
        gm = _build(model, state, prior, plan, constants, config, name)
    finally:
        for key in set(base.__dict__) - before:
            del base.__dict__[key]
    store_active(gm, active)
    logger.debug("FX set %r on %d site(s): %s", name, len(plan.chosen), list(plan.chosen))
    return gm


@dataclass
class _Plan:
    graph: fx.Graph
    sites: _Sites
    chosen: dict[str, str]  # key -> kind of the sites the new set adapts
    widths: dict[str, int]


def _plan(base: nn.Module, state: _State, prior: dict[str, AdapterSlot], targets: object,
          config: AdapterConfig, example_inputs: object) -> _Plan:
    """Trace, find and check every site: everything that can fail, before any change."""
    names, calls_, residual = _split_targets(targets)
    module_names = _select_modules(base, names)
    wanted = set(module_names) | {k for k, s in prior.items() if s.kind == "module"}
    graph, tracer = _trace(base, wanted, state, check_mode=not prior)
    sites = _Sites.find(graph, base, residual or any(s.kind == RESIDUAL for s in prior.values()))
    chosen = _choose(base, sites, tracer, module_names, calls_, residual)
    lost = [k for k, s in prior.items() if sites.kind(k) != s.kind]
    if lost:
        raise ValueError(f"sites {lost[:3]} of the sets already injected are not in a fresh "
                         "trace of the base: the base changed since; inject from it anew")
    clash = [k for k, kind in chosen.items() if sites.kind(k) != kind]
    if clash:
        raise ValueError(f"site key(s) {clash[:3]} name two different sites; select one of them")
    return _Plan(graph, sites, chosen, _widths(base, graph, sites, chosen, config,
                                               example_inputs))


def _build(model: nn.Module, state: _State, prior: dict[str, AdapterSlot], plan: _Plan,
           constants: dict[str, Any], config: AdapterConfig, name: str) -> fx.GraphModule:
    base = state.base
    slots = dict(prior)
    for key, kind in plan.chosen.items():
        slot = slots.setdefault(key, GraphSlot(key, kind))
        owner = base.get_submodule(key) if kind == "module" else base
        slot[name] = Adapter(plan.widths[key], config, **_factory_kwargs(owner, base)).train(
            base.training)
    if prior:
        gm: fx.GraphModule = model  # type: ignore[assignment]
        gm.graph = plan.graph
    else:
        gm = fx.GraphModule(base, plan.graph, class_name=type(base).__name__)
        _share_state(base, gm)
        gm.meta[_PRESERVED] = {STATE: state}  # kept by deepcopy
        setattr(gm, STATE, state)
    _keep_constants(gm, base, plan.graph, constants)
    _install(gm, plan.sites, slots)  # type: ignore[arg-type]
    return gm


def _keep_constants(gm: fx.GraphModule, base: nn.Module, graph: fx.Graph,
                    constants: dict[str, Any]) -> None:
    """Hold the graph's constants (plain tensor attributes, torch.fx's ``_tensor_constant``s)
    as non-persistent buffers: ``GraphModule`` would put them in the ``state_dict``."""
    for n in graph.nodes:
        if n.op != "get_attr":
            continue
        owner_path, _, leaf = n.target.rpartition(".")
        if n.target in constants:
            owner, value = base, constants[n.target]
        else:
            owner = base.get_submodule(owner_path)
            if leaf in owner._parameters or leaf in owner._buffers:
                continue  # a weight or a buffer: _share_state placed it
            value = getattr(owner, leaf)
        target = gm.get_submodule(owner_path)
        if target is owner:
            continue
        if isinstance(value, torch.Tensor):
            target.register_buffer(leaf, value, persistent=False)
        else:
            setattr(target, leaf, value)


def eject_fx(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove set ``name`` (or every set) from an FX result.

    With sets left, the result is changed in place and returned. With none left, its slots
    are taken out of the graph and the module the result was traced from is returned: the
    original object, holding the (shared, possibly trained) base parameters.

    Example:
        >>> import torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> gm = adapterkit.inject(model, ["0"], name="a", method="fx")
        >>> gm = adapterkit.inject(gm, ["0"], name="b", method="fx")
        >>> adapterkit.eject(gm, "a") is gm, adapterkit.active(gm)
        (True, ['b'])
        >>> adapterkit.eject(gm) is model, len(adapterkit.adapters(gm))
        (True, 0)
    """
    known = set_names(model)
    if name is not None and name not in known:
        raise ValueError(f"no adapter set named {name!r}; injected sets: {known}")
    drop = set(known) if name is None else {name}
    keep = [n for n in current_active(model) if n not in drop]
    for _, _, slot in adapted_modules(model):
        for set_name in drop & set(slot.keys()):
            del slot[set_name]
    _remove_empty_slots(model)  # type: ignore[arg-type]
    if adapted_modules(model):
        store_active(model, keep)
        return model
    state: _State = model.__dict__.pop(STATE)
    model.meta.pop(_PRESERVED, None)  # type: ignore[union-attr]
    base = state.base
    _sync_back(model, base)  # type: ignore[arg-type]
    if base.training != model.training:
        base.train(model.training)
    return base
