"""Where a wrapped module's output carries its features: the width and the axis an adapter mixes.

A transformer's hidden state has its features on the last axis; a conv or norm output
``(N, C, H, W)`` has them on the channel axis. ``infer_layout`` reads both off the module,
without running it:

- a layer adapterkit knows gives its own: ``Linear`` / ``LayerNorm`` / ``Embedding`` /
  ``MultiheadAttention`` / RNNs (last axis; an RNN's width is
  ``directions * (proj_size or hidden_size)``), and ``Conv*`` / ``ConvTranspose*`` /
  ``BatchNorm*`` / ``InstanceNorm*`` / ``GroupNorm`` (the channel axis: counted from the end
  where the layer fixes how many spatial axes follow, as a conv does, which also takes an
  unbatched input; else dim 1);
- a ``Sequential`` returns its last layer's output: the last child with a layout decides,
  after layers that keep the layout (activations, dropout, pooling, padding, ``Identity``);
  any other layer at the end (``Flatten``, a custom module without a width) makes the layout
  unknown;
- any other block is a residual sub-layer as a rule, which gives back what it takes: its
  layers' family decides the axis (all channels-first, or all last-axis), and its width is
  that of the last layer whose width equals the input width of the first one (this passes
  over a mixture of experts' one-output gate), else of the last layer with a width, else the
  model's ``config.hidden_size``. A block that mixes channels-first and last-axis layers (a
  ConvNeXt block permutes between them) has no known axis.

Where the axis is unknown, ``infer_layout`` raises and names the fix: ``AdapterConfig(
feature_dim=...)``. ``inject(..., example_inputs=...)`` then checks the layout against the
real output (see ``probe.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from torch.nn.modules import activation, dropout, padding, pooling
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .adapter import Adapter
from .config import AdapterConfig
from .errors import LayoutError

LAST = -1


@dataclass(frozen=True)
class Layout:
    """The width of a module's output and the axis that carries it; for an adapter that
    differs from its set's config, also its own input width and bottleneck.

    ``d_in``: the width a parallel adapter reads, the wrapped layer's input, where it is not
    ``d_model`` (a parallel adapter on a Linear of another output width: LoRA). ``bottleneck``:
    this adapter's width where it is not the config's (a PEFT file's ``rank_pattern``). None:
    as the config says.
    """

    d_model: int
    feature_dim: int = LAST
    d_in: int | None = None
    bottleneck: int | None = None

    @property
    def channels_first(self) -> bool:
        return self.feature_dim != LAST

    def __repr__(self) -> str:
        own = "".join(f", {k}={getattr(self, k)}" for k in ("d_in", "bottleneck")
                      if getattr(self, k) is not None)
        return f"Layout(d_model={self.d_model}, feature_dim={self.feature_dim}{own})"


def adapter_for(layout: Layout, config: AdapterConfig, **factory: Any) -> Adapter:
    """The adapter of ``config`` that ``layout`` describes (``factory``: device, dtype)."""
    return Adapter(layout.d_model, config, feature_dim=layout.feature_dim, d_in=layout.d_in,
                   bottleneck=layout.bottleneck, **factory)


def layout_of(adapter: Adapter) -> Layout:
    """The layout that gives ``adapter`` back (``adapter_for``): what a file records."""
    bottleneck = adapter.down.out_features
    return Layout(adapter.d_model, adapter.feature_dim,
                  None if adapter.d_in == adapter.d_model else adapter.d_in,
                  None if bottleneck == adapter.config.bottleneck_for(adapter.d_model)
                  else bottleneck)



def _size(value: object) -> int | None:
    """``value`` if it is a positive int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# -- single layers --------------------------------------------------------------------------

_BN_SPATIAL = ((nn.BatchNorm2d, 2), (nn.LazyBatchNorm2d, 2), (nn.BatchNorm3d, 3),
               (nn.LazyBatchNorm3d, 3))


def channel_axis(module: nn.Module) -> int | None:
    """The channel axis of a channels-first layer's output, or None for any other module.

    Example:
        >>> channel_axis(nn.Conv2d(3, 8, 3)), channel_axis(nn.GroupNorm(2, 8))
        (-3, 1)
        >>> channel_axis(nn.Linear(4, 4)) is None
        True
    """
    if isinstance(module, _ConvNd):
        return -(len(module.kernel_size) + 1)  # (N, C, *spatial) or unbatched (C, *spatial)
    if isinstance(module, _InstanceNorm):
        return -module._get_no_batch_dim()
    if isinstance(module, _BatchNorm):
        return next((-(k + 1) for cls, k in _BN_SPATIAL if isinstance(module, cls)), 1)
    if isinstance(module, nn.GroupNorm):
        return 1
    return None


def rnn_width(module: nn.RNNBase) -> int:
    """The last dimension of an RNN's output sequence: every direction's hidden state."""
    per_direction = getattr(module, "proj_size", 0) or module.hidden_size
    return per_direction * (2 if module.bidirectional else 1)


# Attributes that hold a module's output width, on layers and on custom blocks alike.
_WIDTH_ATTRS = ("out_features", "embed_dim", "hidden_size", "d_model", "nf", "embedding_dim",
                "out_channels", "num_features", "num_channels")


def _width(module: nn.Module) -> int | None:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return None
    if isinstance(module, nn.RNNBase):
        return rnn_width(module)
    for attr in _WIDTH_ATTRS:
        if value := _size(getattr(module, attr, None)):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple) and shape and isinstance(shape[-1], int):
        return shape[-1]
    return None


def _is_layer(module: nn.Module) -> bool:
    """A layer with weights of its own whose output layout adapterkit knows by its class."""
    return channel_axis(module) is not None or isinstance(module, (
        nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.EmbeddingBag,
        nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase,
    )) or _size(getattr(module, "nf", None)) is not None  # transformers' GPT-2 Conv1D


def _axis(module: nn.Module) -> int:
    axis = channel_axis(module)
    return LAST if axis is None else axis


# Layers that hand on the layout they get: at the end of a Sequential, look before them.
_KEEPS_LAYOUT = (nn.Identity, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
_KEEPS_LAYOUT_MODULES = (activation.__name__, dropout.__name__, pooling.__name__,
                         padding.__name__)


def _keeps_layout(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return False
    return (isinstance(module, _KEEPS_LAYOUT) or type(module).__module__ in _KEEPS_LAYOUT_MODULES
            or type(module).__module__ == "transformers.activations")


# -- blocks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """What the module's structure says: a width and an axis, each None where unknown, and
    why the axis is unknown."""

    width: int | None
    axis: int | None
    why: str = ""


def _layers(module: nn.Module) -> list[nn.Module]:
    """The known layers inside ``module`` (itself included), in registration order."""
    return [m for m in module.modules() if not isinstance(m, Adapter) and _is_layer(m)]


def _sequential(module: nn.Sequential) -> Found:
    for child in reversed(list(module)):
        found = read_layout(child)
        if found.width is not None or found.why:
            return found
        if not _keeps_layout(child):
            return Found(None, None, f"it is a Sequential whose output comes from a "
                                     f"{type(child).__name__}, whose output adapterkit "
                                     "cannot read a width and axis off")
    return Found(None, None, "it is a Sequential with no layer whose output width "
                             "adapterkit knows")


_CHANNEL_ATTRS = ("out_channels", "num_channels", "num_features")


def _block(module: nn.Module) -> Found:
    layers = _layers(module)
    width = _width(module)
    if not layers and width is not None and any(
            _size(getattr(module, a, None)) == width for a in _CHANNEL_ATTRS):
        return Found(width, None, "its width attribute names channels, but no layer inside "
                                  "says on which axis they are")
    if width is None:
        widths = [w for m in reversed(layers) if (w := _width(m))]
        first_in = _in_width(layers[0]) if layers else None
        width = first_in if first_in in widths else (widths[0] if widths else None)
    axes = {_axis(m) for m in layers}
    if LAST in axes and len(axes) > 1:
        kinds = ", ".join(sorted({type(m).__name__ for m in layers}))
        return Found(width, None, f"it mixes channels-first and last-axis layers ({kinds})")
    return Found(width, _axis(layers[-1]) if layers else LAST)


def linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2): ``y = W x + b`` on the last axis."""
    return isinstance(module, nn.Linear) or (
        _size(getattr(module, "nf", None)) is not None
        and _size(getattr(module, "nx", None)) is not None)


def parallel_layout(module: nn.Module, layout: Layout) -> Layout:
    """``layout`` for a parallel adapter on ``module``: on a Linear-like layer whose input
    width is not its output's, the adapter reads that input (``d_in``), as LoRA does."""
    width = _in_width(module)
    if (layout.d_in is None and linear_like(module) and layout.feature_dim == LAST
            and width is not None and width != layout.d_model):
        return replace(layout, d_in=width)
    return layout


def parallel_mismatch(module: nn.Module, layout: Layout) -> str | None:
    """Why a parallel adapter (``module(x) + branch(x)``) cannot sit on this layer, which
    it can tell by its class: its input is not of the width the adapter reads
    (``parallel_layout``), or not of the output's shape. None: no reason known."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "its input is token indices, not features"
    if not _is_layer(module) or isinstance(module, nn.RNNBase):
        return None
    width = _in_width(module)
    if width is not None and width != (layout.d_in or layout.d_model):
        return f"its input has width {width} and its output {layout.d_model}"
    if isinstance(module, _ConvNd) and (
        any(s != 1 for s in module.stride) or module.padding == "valid" or (
            not isinstance(module.padding, str) and any(
                2 * p != d * (k - 1) for p, d, k in zip(
                    module.padding, module.dilation, module.kernel_size, strict=True)))
    ):
        return "its output is not of its input's spatial size (stride 1, 'same' padding)"
    return None


def _in_width(layer: nn.Module) -> int | None:
    for attr in ("in_features", "nx", "in_channels", "num_features", "num_channels",
                 "input_size", "embed_dim"):
        if value := _size(getattr(layer, attr, None)):
            return value
    return None


def read_layout(module: nn.Module, model: nn.Module | None = None) -> Found:
    """What ``module``'s structure says about its output's width and feature axis."""
    if _is_layer(module):
        return Found(_width(module), _axis(module))
    if isinstance(module, nn.Sequential):
        return _sequential(module)
    found = _block(module)
    if found.width is None and model is not None:
        model_config = getattr(model, "config", None)  # transformers: fused experts, no Linear
        width = next((v for attr in _CONFIG_WIDTHS
                      if (v := _size(getattr(model_config, attr, None)))), None)
        found = Found(width, found.axis, found.why)
    return found


_CONFIG_WIDTHS = ("hidden_size", "d_model", "n_embd", "dim")
_NO_WIDTH = ("it has no out_features, out_channels, num_features, embed_dim, hidden_size, "
             "d_model or normalized_shape, nor a layer inside with one, nor does the model "
             "have a config.hidden_size")


def same_axis(given: int, inferred: int, rank: int | None = None) -> bool:
    """Whether ``feature_dim=given`` names the ``inferred`` axis: the same index, or, for a
    channels-first output, dim 1 (the channel axis of a batched output) or the same axis of
    an output of ``rank`` dimensions."""
    if rank is not None:
        return -rank <= given < rank and given % rank == inferred % rank
    return given == inferred or (inferred != LAST and given == 1)


def axis_error(name: str, module: nn.Module, why: str) -> LayoutError:
    return LayoutError(
        f"cannot tell the feature axis of module '{name}' ({type(module).__name__})'s output: "
        f"{why}. Pass AdapterConfig(feature_dim=1) for a channels-first output (N, C, ...) "
        "or feature_dim=-1 for features on the last axis"
    )


def infer_layout(module: nn.Module, config: AdapterConfig, name: str,
                 model: nn.Module | None = None) -> Layout:
    """The adapter's width and feature axis for ``module``: ``config``'s, else read off it.

    Example:
        >>> infer_layout(nn.Conv2d(3, 8, 3), AdapterConfig(), "conv")
        Layout(d_model=8, feature_dim=-3)
        >>> infer_layout(nn.LSTM(4, 6, bidirectional=True), AdapterConfig(), "rnn")
        Layout(d_model=12, feature_dim=-1)
        >>> head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> infer_layout(head, AdapterConfig(), "head").d_model
        2
    """
    axis, width = config.feature_dim, config.d_model
    if axis is not None and width is not None:
        return Layout(width, axis)
    found = read_layout(module, model)
    if axis is None:
        if found.axis is None:
            raise axis_error(name, module, found.why or "its structure does not say")
        axis = found.axis
    elif found.axis is not None and not same_axis(axis, found.axis):
        found = Found(None, None)  # its width is on another axis: not the one asked for
    width = width or found.width
    if width is None:
        why = found.why or _NO_WIDTH
        raise LayoutError(
            f"cannot infer d_model for module '{name}' ({type(module).__name__}): {why}; "
            f"pass AdapterConfig(d_model=<size of its output on axis {axis}>), or "
            "example_inputs=... to inject, so that it is read off a real output"
        )
    return Layout(width, axis)
