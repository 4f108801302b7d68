"""The bottleneck adapter module (Houlsby et al. 2019), as the seed writes it, and the checks
run at its forward against training that would change nothing, silently.

Each failure checked here first shows at the forward: adapters left uninitialised by a model
built on the ``meta`` device, adapters inside a reentrant ``torch.utils.checkpoint`` whose
output cannot carry a gradient, and adapter weights that a quantization library replaced. Each
raises an error naming the fix. On the ordinary path (a forward with gradients on, or in eval
mode) the checks cost one attribute look-up and ``torch.is_grad_enabled()``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import NoGradientError, UninitialisedAdapterError

# Set on an Adapter made on the meta device; cleared once its weights are set (reset_adapters,
# load_adapters, or a load_state_dict that holds its keys).
NEEDS_INIT = "_adapterkit_needs_init"

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class Adapter(nn.Module):
    """``h -> h + scaling * dropout(up(act(down(h))))``, with ``up`` zero at init.

    ``down`` and ``up`` mix the features on axis ``feature_dim`` of ``h`` and act per position
    along every other axis: the last axis of a transformer's hidden state, the channel axis
    (``feature_dim=1``) of a conv output, where they are the 1x1 bottleneck of residual
    adapters for CNNs (Rebuffi et al. 2017). A parallel adapter reads the wrapped module's
    input, of width ``d_in`` (default ``d_model``): on a Linear of another output width, it is
    LoRA with a bias. ``bottleneck`` overrides the config's width for this one adapter.

    Example:
        >>> adapter = Adapter(32, AdapterConfig(bottleneck=8))
        >>> h = torch.randn(2, 5, 32)
        >>> bool(torch.equal(adapter.eval()(h), h))  # zero init: the exact identity
        True
        >>> conv_adapter = Adapter(16, AdapterConfig(bottleneck=4), feature_dim=1)
        >>> conv_adapter(torch.randn(2, 16, 7, 5)).shape  # (N, C, H, W): C is mixed
        torch.Size([2, 16, 7, 5])

    With ``config.dtype`` set, the weights are made in that dtype and keep it through
    ``model.to(dtype)`` / ``.half()``; the input is cast to it and the result cast back:

        >>> adapter = Adapter(32, AdapterConfig(dtype="float32"), dtype=torch.bfloat16)
        >>> adapter.down.weight.dtype, adapter(h.bfloat16()).dtype
        (torch.float32, torch.bfloat16)
    """

    def __init__(
        self,
        d_model: int,
        config: AdapterConfig | None = None,
        *,
        feature_dim: int = -1,
        d_in: int | None = None,
        bottleneck: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = config or AdapterConfig()
        if d_in not in (None, d_model) and config.placement != "parallel":
            raise ValueError(
                f"an adapter reads an input of width d_in={d_in} other than its output's "
                f"d_model={d_model} only as a parallel adapter (placement='parallel'); a "
                "sequential adapter reads the output it adds to"
            )
        self.config = config
        self.d_model = d_model
        self.d_in = d_model if d_in is None else d_in
        self.feature_dim = feature_dim
        dtype = config.torch_dtype or dtype
        # a set read from a file whose modules differ in rank (PEFT's rank_pattern) gives
        # each adapter its own width; else the config's
        bottleneck = config.bottleneck_for(d_model) if bottleneck is None else bottleneck
        self.down = nn.Linear(self.d_in, bottleneck, device=device, dtype=dtype)
        self.act = _ACTIVATIONS[config.activation]()
        self.up = nn.Linear(bottleneck, d_model, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = config.scaling
        self.reset_up()
        # Made on meta, the weights hold nothing yet: the first real forward refuses to run
        # until reset_adapters / load_adapters / load_state_dict set them (check_forward, below).
        self.__dict__[NEEDS_INIT] = self.down.weight.is_meta
        # transformers' init_weights() initialises every module without this flag; after
        # inject it would overwrite the adapters (a non-zero up: no longer the identity).
        for module in self.modules():
            module.__dict__["_is_hf_initialized"] = True

    @torch.no_grad()
    def reset_up(self) -> None:
        """Initialise the up-projection as the config says (zero: exact identity)."""
        if self.config.init == "zeros":
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.up.weight, std=self.config.init_std)
        nn.init.zeros_(self.up.bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as at construction: ``down`` as ``nn.Linear`` does, ``up`` as the config
        says. In place, so that an optimizer over these parameters stays valid."""
        self.down.reset_parameters()
        self.reset_up()
        self.__dict__[NEEDS_INIT] = False

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution alone: ``scaling * dropout(up(act(down(x))))``.

        Computed in the adapter's dtype and returned in ``x``'s.
        """
        dim = self.feature_dim
        if not isinstance(x, torch.fx.Proxy) and not (
            -x.dim() <= dim < x.dim() and x.shape[dim] == self.d_in
        ):
            size = (f"d_model={self.d_model}" if self.d_in == self.d_model
                    else f"d_in={self.d_in}")
            raise ValueError(
                f"adapter expects inputs of size {size} on axis {dim}, got "
                f"shape {tuple(x.shape)}; pass AdapterConfig(d_model=..., feature_dim=...) "
                "matching the wrapped module's output"
            )
        if isinstance(x, torch.fx.Proxy):  # being traced: no dtype to look at
            if self.config.dtype is None:
                return self._branch(x)
            return self._branch(x.to(self.config.torch_dtype)).to(x)
        dtype = self.down.weight.dtype
        if x.dtype == dtype or not x.is_floating_point():
            return self._branch(x)
        return self._branch(x.to(dtype)).to(x.dtype)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.feature_dim
        last = dim == -1 or (not isinstance(x, torch.fx.Proxy) and dim == x.dim() - 1)
        if not last:
            x = x.movedim(dim, -1)
        y = self.dropout(self.up(self.act(self.down(x))))
        if self.scaling != 1.0:
            y = y * self.scaling
        return y if last else y.movedim(-1, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # With config.dtype set, model.to(torch.bfloat16) / .half() move the adapter but keep
        # its dtype: casting there and back would round away what float32 weights are for.
        # What fn does is learnt from an empty tensor, since fn may also move or re-allocate.
        want = self.config.torch_dtype
        if want is None:
            return super()._apply(fn, recurse)

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            probe = fn(t.new_empty(0))
            if t.dtype == want and probe.dtype != want and probe.is_floating_point():
                return t.to(device=probe.device)
            return fn(t)

        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        if all(prefix + key in state_dict for key, _ in self.named_parameters()):
            self.__dict__[NEEDS_INIT] = False  # every weight of this adapter is being loaded
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        axis = "" if self.feature_dim == -1 else f", feature_dim={self.feature_dim}"
        dtype = "" if c.dtype is None else f", dtype={c.dtype}"
        return f"placement={c.placement}, scaling={c.scaling}{axis}{dtype}"


# -- checks at the forward -------------------------------------------------------------------


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


# -- which torch.utils.checkpoint call is running ---------------------------------------------
#
# No public API tells that a checkpoint is running, or which one. The reentrant checkpoint runs
# the function under no_grad inside CheckpointFunction.forward(ctx, ...), and again (the
# recompute) with gradients inside CheckpointFunction.backward(ctx, ...): the same ctx both
# times. The non-reentrant checkpoint runs it under saved-tensor hooks whose pack function holds
# the call's _CheckpointFrame, and recomputes it under other hooks that hold a weak reference to
# that frame. Both are read here, once per adapter call, and only inside a checkpoint.


def _code(owner: object, attr: str) -> object:
    return getattr(getattr(owner, attr, None), "__code__", None)


def _inner_code(init: object, name: str) -> object:
    consts = getattr(getattr(init, "__code__", None), "co_consts", ())
    return next((c for c in consts if getattr(c, "co_name", None) == name), None)


_CP = torch.utils.checkpoint
_REENTRANT_FORWARD = _code(getattr(_CP, "CheckpointFunction", None), "forward")
_REENTRANT_BACKWARD = _code(getattr(_CP, "CheckpointFunction", None), "backward")
_CHECKPOINT_PACK = _inner_code(getattr(getattr(_CP, "_checkpoint_hook", None), "__init__", None),
                               "pack_hook")
_RECOMPUTE_PACK = _inner_code(
    getattr(getattr(_CP, "_recomputation_hook", None), "__init__", None), "pack_hook")
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_graph_task = getattr(torch._C, "_current_graph_task_id", None)


def _frame_of(code: object) -> Any:
    """The innermost Python frame running ``code``, or None."""
    frame = sys._getframe(2)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return frame
        frame = frame.f_back
    return None


def _cell(fn: Any, name: str) -> Any:
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def checkpoint_scope() -> tuple[str, Any] | None:
    """``("forward", key)`` while a ``torch.utils.checkpoint`` call runs its function the first
    time, ``("recompute", key)`` while it recomputes it for backward, else None. ``key`` is an
    object of that one checkpoint call (the reentrant checkpoint's autograd ctx, the
    non-reentrant one's frame), the same in both, that attributes can be set on."""
    hooks = _top_hooks(False) if _top_hooks is not None else None
    if hooks is not None:  # non-reentrant: the top saved-tensor hooks are the checkpoint's
        pack = inspect.unwrap(hooks[0])
        code = getattr(pack, "__code__", None)
        if code is not None and code is _CHECKPOINT_PACK:
            return "forward", _cell(pack, "frame")
        if code is not None and code is _RECOMPUTE_PACK:
            return "recompute", _cell(pack, "target_frame_ref")()
        return None
    if not torch.is_grad_enabled():  # reentrant, first run: no_grad
        frame = _frame_of(_REENTRANT_FORWARD)
        return None if frame is None else ("forward", frame.f_locals["ctx"])
    if _graph_task is not None and _graph_task() != -1:  # inside backward: a recompute?
        frame = _frame_of(_REENTRANT_BACKWARD)
        return None if frame is None else ("recompute", frame.f_locals["ctx"])
    return None


def _checkpoint_inputs() -> tuple | None:
    """The inputs of the reentrant ``torch.utils.checkpoint`` being run, if any: the ``args``
    of ``CheckpointFunction.forward(ctx, run_function, preserve_rng_state, *args)``."""
    frame = _frame_of(_REENTRANT_FORWARD)
    return None if frame is None else tuple(frame.f_locals.get("args", ()))


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
