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

Tracing is in ``trace.py``, finding and choosing sites in ``sites.py``; this module builds the
``GraphModule`` from their plan and holds the verbs.

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
import re
from typing import Any

import torch
from torch import fx, nn

from .. import state
from ..adapter import Adapter
from ..config import AdapterConfig
from ..select import as_selector_list, compile_selector
from ..slot import AdapterSlot, RNNState
from ..surgery import check_set_name, detach, factory_kwargs, install_set
from ..tree import adapted_modules, require_sets, set_names
from .sites import SitePlan, Sites, plan_sites
from .trace import TraceState

logger = logging.getLogger(__name__)

CONTAINER = "adapterkit_fx"  # GraphSlots live at adapterkit_fx.<key with '.' -> '_'>


class GraphSlot(AdapterSlot):
    """An ``AdapterSlot`` that is a graph node of its own: ``slot(output, x)``.

    ``x`` is what a parallel adapter reads: the module's first tensor argument at a module
    site, the call's first tensor argument at a call site, the skip value at a residual site.
    """

    def __init__(self, target_name: str, kind: str, rnn: RNNState | None = None) -> None:
        super().__init__(target_name, rnn)
        self.kind = kind  # "module", "call" or "residual": how a re-trace finds the site again

    def forward(self, output: Any, x: torch.Tensor | None = None) -> Any:
        return self.run(output, () if x is None else (x,), {})


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


def _install(gm: fx.GraphModule, sites: Sites, slots: dict[str, GraphSlot]) -> None:
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


def _state_of(model: nn.Module, concrete_args: object, leaf_modules: object) -> TraceState:
    traced = state.graph_base(model)
    held = set_names(model if traced is None else traced.base)  # the base holds no FX slot
    if held:
        raise ValueError(
            f"the model holds name-mode adapter sets {held}, which a trace would bake in; "
            "eject them first, or inject every set with method='fx'"
        )
    if traced is not None:
        if concrete_args is not None or leaf_modules:
            raise TypeError(
                "tracer options (concrete_args, leaf_modules) were fixed when this GraphModule "
                "was made; inject the new set without them (example_inputs is allowed)"
            )
        return traced
    if hasattr(model, CONTAINER):
        raise ValueError(f"the model already has an attribute '{CONTAINER}', which FX mode "
                         "needs for its adapters; rename that attribute")
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise TypeError(f"concrete_args must be a dict of argument name -> value, got "
                        f"{type(concrete_args).__name__}")
    leaves = tuple(as_selector_list(leaf_modules)) if leaf_modules else ()
    for sel in leaves:
        compile_selector(sel)
    return TraceState(model, concrete_args, leaves)


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
    traced = _state_of(model, concrete_args, leaf_modules)
    check_set_name(model, name)
    base = traced.base
    prior = {key: slot for key, _, slot in adapted_modules(model)} if model is not base else {}
    # torch.fx parks the tensor constants it meets as attributes of the traced module: they
    # stay there while the graph is analysed and built, and leave it afterwards, error or not.
    before = set(base.__dict__)
    try:
        plan = plan_sites(base, traced, prior, targets, config, example_inputs)
        constants = {k: base.__dict__[k] for k in set(base.__dict__) - before}
        gm = _build(model, traced, prior, plan, constants, config, name)
    finally:
        for key in set(base.__dict__) - before:
            del base.__dict__[key]
    logger.debug("FX set %r on %d site(s): %s", name, len(plan.chosen), list(plan.chosen))
    return gm


def _build(model: nn.Module, traced: TraceState, prior: dict[str, AdapterSlot], plan: SitePlan,
           constants: dict[str, Any], config: AdapterConfig, name: str) -> fx.GraphModule:
    base = traced.base
    slots = dict(prior)
    placed = {}
    for key, kind in plan.chosen.items():
        owner = base.get_submodule(key) if kind == "module" else base
        slot = slots.setdefault(key, GraphSlot(key, kind, RNNState.of(owner)))
        layout = plan.widths[key]
        placed[key] = (slot, Adapter(layout.d_model, config, feature_dim=layout.feature_dim,
                                     **factory_kwargs(owner, base)).train(base.training))
    if prior:
        gm: fx.GraphModule = model  # type: ignore[assignment]
        gm.graph = plan.graph
    else:
        gm = fx.GraphModule(base, plan.graph, class_name=type(base).__name__)
        _share_state(base, gm)
        state.set_graph_base(gm, traced)
    _keep_constants(gm, base, plan.graph, constants)
    _install(gm, plan.sites, slots)  # type: ignore[arg-type]
    install_set(gm, name, placed, activate=True)  # type: ignore[arg-type]
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
    if name is not None:
        require_sets(model, name)
    # the engine's detach also restores modules that a name-mode set wrapped in the graph
    detach(model, set_names(model) if name is None else [name])
    _remove_empty_slots(model)  # type: ignore[arg-type]
    if adapted_modules(model):
        return model
    base = state.drop_graph_base(model).base  # type: ignore[arg-type]
    _sync_back(model, base)  # type: ignore[arg-type]
    if base.training != model.training:
        base.train(model.training)
    return base
