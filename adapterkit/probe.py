"""``example_inputs``: one run of the model that records what every target really returns.

The run uses fake tensors (``torch._subclasses.FakeTensorMode``): shapes and dtypes flow
through the model, nothing is computed, no random number is drawn, and in-place updates
(BatchNorm statistics) land on fakes, never on the model. A model on the ``meta`` device gets
its example inputs moved to ``meta``. Where fake tensors cannot run the model (an operation
whose output shape depends on data), the run is real, under ``torch.no_grad()``, on copies
of the buffers and with the random state restored afterwards.

From each target's recorded calls, ``observed_layout`` takes the width on the feature axis
and checks everything a first forward would hit: the output holds a tensor where
``output_key`` points, the axis exists and has the width that the module's structure says,
a parallel adapter's input has the output's shape, and the target was called at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .layout import (
    LAST,
    Found,
    Layout,
    LayoutError,
    axis_error,
    parallel_layout,
    read_layout,
)
from .outputs import find_hidden, first_tensor, get_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """One call of a target during the run: its first tensor input and its output."""

    x: torch.Tensor | None
    output: Any


def _call_model(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _map_tensors(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


@contextmanager
def _recording(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[Call]]]:
    calls: dict[str, list[Call]] = {q: [] for q in modules}
    by_id = {id(m): q for q, m in modules.items()}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls[by_id[id(module)]].append(Call(first_tensor(args, kwargs), output))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules.values()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def fake_run(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` called on ``example_inputs`` (a tensor: ``model(x)``; a tuple or list:
    ``model(*x)``; a dict: ``model(**x)``) with every tensor fake: nothing is computed, no
    random number is drawn, and in-place state updates (BatchNorm statistics) land on the
    fakes, never on the model. Inputs go to ``meta`` when the model is there. Returns the
    (fake) output."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    on_meta = any(p.is_meta for p in model.parameters())
    inputs = _map_tensors(example_inputs, lambda t: t.to("meta")) if on_meta else example_inputs
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = {k: mode.from_tensor(t) for k, t in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False))}
        inputs = _map_tensors(inputs, mode.from_tensor)
        return torch.func.functional_call(model, state, _as_args(inputs), _as_kwargs(inputs))


def _real_run(model: nn.Module, example_inputs: Any) -> None:
    buffers = {k: t.clone() for k, t in model.named_buffers(remove_duplicate=False)}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.func.functional_call(model, buffers, _as_args(example_inputs),
                                   _as_kwargs(example_inputs), strict=False)


def _as_args(inputs: Any) -> tuple:
    if isinstance(inputs, dict):
        return ()
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _as_kwargs(inputs: Any) -> dict:
    return dict(inputs) if isinstance(inputs, dict) else {}


def observe(model: nn.Module, modules: dict[str, nn.Module],
            example_inputs: Any) -> dict[str, list[Call]]:
    """Run ``model`` once on ``example_inputs`` (a tensor: ``model(x)``; a tuple or list:
    ``model(*x)``; a dict: ``model(**x)``) and return every call of each of ``modules``."""
    with _recording(modules) as calls, torch.random.fork_rng(devices=[]):
        try:
            fake_run(model, example_inputs)
            return calls
        except Exception as err:  # noqa: BLE001 - retried for real, reported if that fails
            log.debug("fake-tensor run failed (%s); running for real", err)
    with _recording(modules) as calls:
        try:
            _real_run(model, example_inputs)
        except Exception as err:
            raise ValueError(
                f"example_inputs do not run through the {type(model).__name__} "
                f"({type(err).__name__}: {err}); pass forward's inputs: a tensor, a tuple of "
                "positional inputs or a dict of keyword inputs. The model was not changed"
            ) from err
        return calls


def observed_layout(name: str, module: nn.Module, calls: list[Call], config: AdapterConfig,
                    model: nn.Module | None = None) -> Layout:
    """The layout of ``module``'s adapter, read off its calls on example inputs; an error for
    anything that a forward would hit."""
    if not calls:
        raise ValueError(
            f"module '{name}' was not called when the model ran on example_inputs, so an "
            "adapter there would never reach the output; choose a target that the forward "
            "calls, or pass example_inputs that exercise it"
        )
    found = read_layout(module, model)
    layouts = {_one_call(name, module, call, config, found) for call in calls}
    if len(layouts) > 1:
        raise ValueError(
            f"module '{name}' is called {len(calls)} times with outputs of different widths "
            f"{sorted(layout.d_model for layout in layouts)}; one adapter cannot serve them "
            "all, so target the modules it calls instead"
        )
    return layouts.pop()


def _one_call(name: str, module: nn.Module, call: Call, config: AdapterConfig,
              found: Found) -> Layout:
    path = find_hidden(call.output, config.output_key, name)
    if path is None:
        raise ValueError(
            f"module '{name}' returned {type(call.output).__name__} with no tensor in it on "
            "example_inputs, so an adapter there would do nothing; target a module that "
            "returns its hidden state"
        )
    hidden = get_path(call.output, path)
    rank = hidden.dim()
    axis = config.feature_dim if config.feature_dim is not None else found.axis
    if axis is None and rank <= 2:
        axis = LAST  # (N, features) or (features,): no other axis could carry them
    if axis is None:
        raise axis_error(name, module, found.why)
    if not -rank <= axis < rank:
        raise LayoutError(
            f"module '{name}' returned a hidden state of shape {tuple(hidden.shape)} on "
            f"example_inputs, which has no axis {axis}; pass AdapterConfig(feature_dim=...) "
            "naming the axis that carries its features"
        )
    width = int(hidden.shape[axis])
    if config.d_model is not None and config.d_model != width:
        raise LayoutError(
            f"AdapterConfig(d_model={config.d_model}) does not match module '{name}', whose "
            f"output has size {width} on axis {axis} (shape {tuple(hidden.shape)}) on "
            "example_inputs; leave d_model unset to take the real width"
        )
    if (config.feature_dim is None and found.width is not None and found.width != width
            and any(s == found.width for s in hidden.shape)):
        raise axis_error(name, module, (
            f"its layers give width {found.width}, but its output on example_inputs has shape "
            f"{tuple(hidden.shape)}, with size {width} on axis {axis} ({_axis_name(axis)}) and "
            f"{found.width} on another axis"))
    layout = Layout(width, axis)
    if config.placement == "parallel":
        layout = parallel_layout(module, layout)
        _check_parallel(name, call, hidden, layout)
    return layout


def _axis_name(axis: int) -> str:
    return "the last" if axis == LAST else "the channel axis by its layers"


def _check_parallel(name: str, call: Call, hidden: torch.Tensor, layout: Layout) -> None:
    # a Linear-like layer's input may differ from its output on the last axis (parallel_layout)
    want = (*hidden.shape[:-1], layout.d_in) if layout.d_in is not None else hidden.shape
    if call.x is None or tuple(call.x.shape) != tuple(want):
        got = "no tensor input" if call.x is None else f"input of shape {tuple(call.x.shape)}"
        raise ValueError(
            f"module '{name}' takes {got} and returns shape {tuple(hidden.shape)} on "
            "example_inputs: a parallel adapter adds a branch of the input to the output, "
            "which needs the two shapes equal; use placement='sequential' there"
        )
