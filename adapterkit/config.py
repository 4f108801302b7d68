"""Configuration objects: what an adapter looks like, what a freeze keeps trainable, and what a
fusion fuses.

All are frozen dataclasses that validate themselves on construction and turn into plain
dicts (for JSON) and back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import torch

Activation = Literal["gelu", "relu", "silu", "tanh", "identity"]
Placement = Literal["sequential", "parallel"]
Init = Literal["zeros", "normal"]
T = TypeVar("T")
Key = int | str
OutputKey = Key | tuple[Key, ...]

DEFAULT_BOTTLENECK = 64  # the seed's choice


def _check_choice(name: str, value: object, kind: Any) -> None:
    choices = get_args(kind)
    if value not in choices:
        raise ValueError(f"AdapterConfig.{name} must be one of {choices}, got {value!r}")


def _dtype_name(value: object) -> str | None:
    """``value`` (a floating ``torch.dtype`` or its name, such as ``"float32"``) as its name."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, (torch.dtype, str)) else None
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            "AdapterConfig.dtype must be a floating torch.dtype or its name (e.g. torch.float32, "
            f"'float32', 'bfloat16'), or None for the wrapped module's dtype; got {value!r}"
        )
    return str(dtype).removeprefix("torch.")  # the canonical name: "half" -> "float16"


def _check_number(name: str, value: object, *, integer: bool = False) -> None:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        what = "an int" if integer else "a number"
        raise ValueError(f"AdapterConfig.{name} must be {what}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"AdapterConfig.{name} must be finite, got {value!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """How each adapter of a set is built and where it sits.

    Example:
        >>> AdapterConfig(bottleneck=16, placement="parallel", scaling=4.0).bottleneck_for(128)
        16
        >>> AdapterConfig(reduction_factor=16).bottleneck_for(768)
        48
        >>> AdapterConfig(dropout=1.5)
        Traceback (most recent call last):
        ...
        ValueError: AdapterConfig.dropout must be in [0, 1), got 1.5
    """

    # Width of the bottleneck. Leave both this and reduction_factor unset for the seed's 64.
    bottleneck: int | None = None
    # Alternative to bottleneck: d_model / reduction_factor, rounded, at least 1.
    reduction_factor: float | None = None
    activation: Activation = "gelu"  # the seed's nn.GELU()
    dropout: float = 0.1  # the seed's default; set 0.0 for exact identity in train mode
    # "sequential": adapter(module(x)) (Houlsby 2019); "parallel": module(x) + branch(x)
    # (He et al. 2022).
    placement: Placement = "sequential"
    scaling: float = 1.0  # multiplies the adapter branch
    # "zeros": up-projection zero, so the adapter starts as the exact identity;
    # "normal": up-projection drawn from N(0, init_std), near the identity.
    init: Init = "zeros"
    init_std: float = 1e-3
    # Width of the wrapped module's output. None: inferred (see layout.py).
    d_model: int | None = None
    # The axis of the output that carries the features, which the adapter mixes (per
    # position along every other axis). None: inferred: the channel axis of a conv or norm
    # output (dim 1 of NCHW), else the last axis (see layout.py).
    feature_dim: int | None = None
    # Where the hidden state sits in a structured output: a tuple index, a dict key or a
    # namedtuple / dataclass field, or a path of those into nested outputs ((1, 0) is an
    # LSTM's h_n). None: the first tensor found.
    output_key: OutputKey | None = None
    # The adapters' own dtype, stored by name ("float32"); a torch.dtype is accepted. None: the
    # wrapped module's dtype. float32 adapters on a bfloat16 base keep small updates that
    # bfloat16 weights would round away; the adapter casts its input to this dtype and its
    # output back to the input's.
    dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError(
                "AdapterConfig takes bottleneck or reduction_factor, not both; "
                f"got bottleneck={self.bottleneck!r}, reduction_factor={self.reduction_factor!r}"
            )
        if self.bottleneck is not None:
            _check_number("bottleneck", self.bottleneck, integer=True)
            if self.bottleneck < 1:
                raise ValueError(f"AdapterConfig.bottleneck must be >= 1, got {self.bottleneck}")
        if self.reduction_factor is not None:
            _check_number("reduction_factor", self.reduction_factor)
            if self.reduction_factor <= 0:
                raise ValueError(
                    f"AdapterConfig.reduction_factor must be > 0, got {self.reduction_factor}"
                )
        _check_choice("activation", self.activation, Activation)
        _check_choice("placement", self.placement, Placement)
        _check_choice("init", self.init, Init)
        _check_number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout}")
        _check_number("scaling", self.scaling)
        if self.scaling == 0:
            raise ValueError(
                "AdapterConfig.scaling must not be 0: it multiplies the adapter's output away, so "
                "the model never changes and the adapters get no gradient; use scaling=1.0 "
                "(the default), or disable a set with adapterkit.disabled / set_active"
            )
        _check_number("init_std", self.init_std)
        if self.init_std < 0:
            raise ValueError(f"AdapterConfig.init_std must be >= 0, got {self.init_std}")
        if self.d_model is not None:
            _check_number("d_model", self.d_model, integer=True)
            if self.d_model < 1:
                raise ValueError(f"AdapterConfig.d_model must be >= 1, got {self.d_model}")
        if self.feature_dim is not None:
            _check_number("feature_dim", self.feature_dim, integer=True)
        key = self.output_key
        if isinstance(key, list):  # a path read back from JSON
            key = tuple(key)
            object.__setattr__(self, "output_key", key)
        path = key if isinstance(key, tuple) else (key,)
        if key is not None and (not path or not all(
                isinstance(k, (int, str)) and not isinstance(k, bool) for k in path)):
            raise ValueError(
                "AdapterConfig.output_key must be an int, a str, a non-empty tuple of those "
                f"(a path into nested outputs) or None, got {key!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a ``torch.dtype`` (None when unset).

        >>> AdapterConfig(dtype="float32").torch_dtype, AdapterConfig(dtype=torch.half).dtype
        (torch.float32, 'float16')
        """
        return None if self.dtype is None else getattr(torch, self.dtype)

    def bottleneck_for(self, d_model: int) -> int:
        """The bottleneck width for a module whose hidden size is ``d_model``."""
        if self.reduction_factor is not None:
            return max(1, round(d_model / self.reduction_factor))
        return self.bottleneck if self.bottleneck is not None else DEFAULT_BOTTLENECK

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a dict, refusing fields this version does not know."""
        return from_known_fields(cls, data)


def from_known_fields(cls: type[T], data: object) -> T:
    """``cls(**data)`` for a frozen config dataclass, refusing a non-dict and unknown fields."""
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} must be a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: "
                         f"{sorted(known)}")
    return cls(**data)


def as_entries(name: str, value: object) -> tuple[str, ...]:
    """A spec field given as one entry (a string) or a list of them, as a tuple; a string is
    one entry, where ``tuple("adapters")`` would split it into characters."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"FreezeSpec.{name} must be a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class FreezeSpec:
    """What stays trainable: everything ``train`` selects, minus what ``freeze`` selects.

    Entries: ``"adapters"`` (every adapter parameter), ``"adapters:NAME"`` (one set), or a
    selector of the target grammar matched on module names (a module brings all of its
    parameters) and on parameter names (``"cls.bias"``).

    Example:
        >>> spec = FreezeSpec.from_dict({"train": ["adapters", "cls"], "freeze": ["cls.bias"]})
        >>> spec.to_dict()
        {'train': ['adapters', 'cls'], 'freeze': ['cls.bias']}
    """

    train: tuple[str, ...] = ("adapters",)
    freeze: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", as_entries("train", self.train))
        object.__setattr__(self, "freeze", as_entries("freeze", self.freeze))

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "freeze": list(self.freeze)}

    @classmethod
    def coerce(cls, spec: FreezeSpec | dict | None) -> FreezeSpec:
        """A spec given as a ``FreezeSpec``, its dict form, or None (the default spec)."""
        if spec is None:
            return cls()
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, cls):
            return spec
        raise TypeError(f"a freeze spec is a FreezeSpec, a dict or None, got "
                        f"{type(spec).__name__}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FreezeSpec:
        """Build from a dict, refusing fields this version does not know."""
        return from_known_fields(cls, data)


@dataclass(frozen=True)
class FusionConfig:
    """What a fusion set fuses, and how its attention starts.

    Example:
        >>> FusionConfig(sets=("a", "b")).to_dict()
        {'sets': ['a', 'b'], 'dropout': 0.0, 'key_init_std': 0.02, 'output_key': None}
        >>> FusionConfig(sets=("a",))
        Traceback (most recent call last):
        ...
        ValueError: FusionConfig.sets must name at least two different sets, got ('a',)
    """

    sets: tuple[str, ...]
    dropout: float = 0.0  # on the attention scores, as AdapterHub's attention_probs_dropout_prob
    # std of the key projection's initial weights (AdapterHub's init_bert_weights: 0.02); 0
    # would leave query and key without a gradient for ever, since the query starts at zero
    key_init_std: float = 0.02
    output_key: int | str | None = None  # the fused sets' output_key: what they all adapt

    def __post_init__(self) -> None:
        sets = self.sets
        if isinstance(sets, str) or not isinstance(sets, (list, tuple)):
            raise ValueError(f"FusionConfig.sets must be a list of set names, got {sets!r}")
        object.__setattr__(self, "sets", tuple(sets))
        distinct = set(sets)
        if not all(isinstance(s, str) for s in sets) or len(distinct) < 2 or len(distinct) != len(
                sets):
            raise ValueError(
                f"FusionConfig.sets must name at least two different sets, got {self.sets!r}"
            )
        for name, value in (("dropout", self.dropout), ("key_init_std", self.key_init_std)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value):
                raise ValueError(f"FusionConfig.{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FusionConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.key_init_std <= 0:
            raise ValueError(
                f"FusionConfig.key_init_std must be > 0, got {self.key_init_std}: the query "
                "starts at zero, and with a zero key too neither would ever get a gradient"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sets": list(self.sets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionConfig:
        """Build from a dict, refusing fields this version does not know."""
        return from_known_fields(cls, data)
