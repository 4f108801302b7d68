"""Checks at an adapter's forward against training that would change nothing, silently.

Each failure here first shows at the forward: adapters left uninitialised by a model built on
the ``meta`` device, adapters inside a reentrant ``torch.utils.checkpoint`` whose output
cannot carry a gradient, and adapter weights that a quantization library replaced. Each raises
an error naming the fix. On the ordinary path (a forward with gradients on, or in eval mode)
the checks cost one attribute look-up and ``torch.is_grad_enabled()``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

# Set on an Adapter made on the meta device; cleared once its weights are set (reset_adapters,
# load_adapters, or a load_state_dict that holds its keys).
NEEDS_INIT = "_adapterkit_needs_init"


class UninitialisedAdapterError(RuntimeError):
    """An adapter made on the ``meta`` device whose weights were never set."""


class NoGradientError(RuntimeError):
    """A trainable adapter that this forward could never give a gradient."""


def check_forward(target: str, name: str, adapter: nn.Module, x: torch.Tensor) -> None:
    """Raise if ``adapter`` (of set ``name`` on module ``target``) cannot do its job on ``x``."""
    if adapter.__dict__.get(NEEDS_INIT):
        _check_initialised(where(target, name), adapter, x)
    if adapter.training and not torch.compiler.is_compiling():
        if not torch.is_grad_enabled():
            _check_reentrant_checkpoint(target, name, adapter)
        _check_not_quantized(target, name, adapter)


def where(target: str, name: str) -> str:
    return f"of set '{name}' on '{target}'"


def _check_initialised(where: str, adapter: nn.Module, x: torch.Tensor) -> None:
    if x.is_meta:
        return  # a shape-only pass on meta tensors: nothing is computed
    state = ("are still on the meta device" if any(p.is_meta for p in adapter.parameters())
             else "hold uninitialised memory (made on the meta device, then to_empty)")
    raise UninitialisedAdapterError(
        f"the adapter {where} was made on the meta device and its weights {state}; after "
        "loading the base weights, call adapterkit.reset_adapters(model) (the identity at "
        "init) or adapterkit.load_adapters(model, path) (trained adapters)"
    )


def _trainable(adapter: nn.Module) -> bool:
    return any(p.requires_grad for p in adapter.parameters())


def _checkpoint_inputs() -> tuple | None:
    """The inputs of the reentrant ``torch.utils.checkpoint`` being run, if any.

    Its first forward runs the wrapped function under ``no_grad`` inside
    ``CheckpointFunction.forward(ctx, run_function, preserve_rng_state, *args)``; that frame's
    ``args`` are the checkpoint's inputs. No public API tells that a checkpoint is running.
    """
    target = getattr(getattr(torch.utils.checkpoint, "CheckpointFunction", None), "forward", None)
    code = getattr(target, "__code__", None)
    frame = sys._getframe(2)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return tuple(frame.f_locals.get("args", ()))
        frame = frame.f_back
    return None


def _check_reentrant_checkpoint(target: str, name: str, adapter: nn.Module) -> None:
    if not _trainable(adapter):
        return
    inputs = _checkpoint_inputs()
    if inputs is None:
        return  # an ordinary no_grad forward in train mode
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return  # the backward pass reruns this function with gradients on
    raise NoGradientError(
        f"the trainable adapter {where(target, name)} runs inside "
        "torch.utils.checkpoint(use_reentrant=True) whose inputs do not require grad (e.g. "
        "they come from a frozen embedding), so its output carries no gradient and the "
        "adapter would never learn. Use use_reentrant=False, or make the checkpoint's input "
        "require grad: for a transformers model, adapterkit.freeze(model, ...) does this; "
        "otherwise a forward hook on the embedding that returns output.requires_grad_(). "
        "(For a forward without gradients, call model.eval() first, or skip the checkpoint "
        "when torch.is_grad_enabled() is False, as transformers' layers do.)"
    )


def is_quantized(t: torch.Tensor) -> bool:
    """Whether ``t`` is a weight a quantization library replaced (torchao, integer storage)."""
    return not t.is_floating_point() or type(t).__module__.startswith(
        ("torchao.quantization", "torchao.dtypes", "torchao.prototype")
    )


def quantized_weights(adapter: nn.Module) -> list[str]:
    """The names of ``adapter``'s parameters that are quantized."""
    return [name for name, p in adapter.named_parameters() if is_quantized(p)]


def quantized_message(where: str, names: list[str], what: str) -> str:
    return (
        f"the adapter {where} has quantized weights ({', '.join(names)}), {what}: a quantized "
        "weight gets no gradient. Quantize the base before inject, or keep adapters out: "
        "quantize_(model, config, filter_fn=adapterkit.integrations.torchao.base_linears(model))"
    )


def _check_not_quantized(target: str, name: str, adapter: nn.Module) -> None:
    # Runs at every training forward: read the weights from the dicts, since each attribute
    # look-up through nn.Module.__getattr__ costs about a microsecond.
    modules = adapter._modules
    down = modules["down"]._parameters["weight"]  # type: ignore[index,union-attr]
    up = modules["up"]._parameters["weight"]  # type: ignore[index,union-attr]
    if (type(down) is nn.Parameter and type(up) is nn.Parameter
            and down.is_floating_point() and up.is_floating_point()):
        return  # the ordinary case: plain floating-point parameters
    names = quantized_weights(adapter)
    if names and _trainable(adapter):
        message = quantized_message(where(target, name), names, "yet it is being trained")
        raise NoGradientError(message)
