"""AdapterFusion (Pfeiffer et al. 2021): a learned attention over several sets' contributions.

``fuse(model, ["a", "b", "c"], name="f")`` adds a set ``f`` that, at every module all three sets
wrap, computes (``h`` the module's output, ``b_s`` what set ``s`` alone adds to it)::

    scores_s = key(b_s) . query(h)             # one score per set, per position
    p = softmax(dropout(scores))
    output = h + value(sum_s p_s * b_s)        # over the feature axis of h

as AdapterHub's ``BertFusion`` does (query from the module's output, keys and values from each
adapter's branch, the residual added after; its value projection has no bias and starts at the
identity). One deliberate difference: the query projection starts at zero, so every score is 0,
the softmax is uniform and, with the identity value projection, a new fusion computes exactly
the mean of the fused sets' outputs, ``h + mean_s b_s``. The key projection is not zeroed
(N(0, 0.02), AdapterHub's init): with both zero neither would ever get a gradient. Since the
value projection is linear and has no bias, applying it after the weighted sum equals applying
it to each branch first (AdapterHub's ``value_before_softmax``), at a fraction of the cost.

A fusion is a set like any other: ``freeze(train=["adapters:f"])`` trains its parameters only,
``set_active`` / ``disabled`` switch it, ``save_adapters`` / ``load_adapters`` keep it (the fused
sets must be in the model it loads into), ``eject`` removes it. A set that a fusion uses cannot
be ejected while the fusion is there.

The fused sets must wrap the same modules, and the fusion sits at every one of them. While a
fusion is active its sets run only inside it, so at a module that held some of them and no
fusion, none would run: ``fuse``, and ``load_adapters`` of a fusion file, refuse that (both go
through ``add_fusion``), naming the modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..config import FusionConfig
from ..surgery import check_set_name, install_set
from ..tree import adapted_modules, require_sets


class AdapterFusion(nn.Module):
    """The fusion layer at one module; it lives in the module's slot under the fusion's name.

    Example:
        >>> fusion = AdapterFusion(8, FusionConfig(sets=("a", "b")))
        >>> bool(fusion.query.weight.abs().sum() == 0), bool(fusion.key.weight.abs().sum() > 0)
        (True, True)
        >>> bool(torch.equal(fusion.value.weight, torch.eye(8)))
        True
    """

    def __init__(
        self,
        d_model: int,
        config: FusionConfig,
        *,
        feature_dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.feature_dim = feature_dim  # the fused adapters' feature axis: attention runs there
        self.query = nn.Linear(d_model, d_model, device=device, dtype=dtype)
        self.key = nn.Linear(d_model, d_model, device=device, dtype=dtype)
        self.value = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Query zero, key N(0, key_init_std), value the identity: the exact mean at init."""
        if self.query.weight.is_meta:
            return  # a shape probe (load_adapters): nothing to initialise
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        nn.init.normal_(self.key.weight, std=self.config.key_init_std)
        nn.init.zeros_(self.key.bias)
        self.value.weight.copy_(torch.eye(self.d_model))

    @property
    def sets(self) -> tuple[str, ...]:
        return self.config.sets

    def forward(self, hidden: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
        """``hidden`` (..., d) and the sets' ``branches`` (..., n, d) -> what the fusion adds
        to ``hidden``: ``value(sum_s p_s branch_s)``."""
        query = self.query(hidden).unsqueeze(-1)  # (..., d, 1)
        scores = (self.key(branches) @ query).squeeze(-1)  # (..., n)
        probs = torch.softmax(self.dropout(scores), dim=-1)
        context = (probs.unsqueeze(-2) @ branches).squeeze(-2)  # (..., d)
        return self.value(context)

    # -- the composition protocol of AdapterSlot (slot.Composition) ---------------------------

    def present(self, slot: Any) -> bool:
        # a fusion runs wherever it sits: add_fusion puts it at every module its sets wrap
        return True

    def output_key(self, slot: Any) -> Any:
        return self.config.output_key

    def delta(self, slot: Any, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        deltas = [slot.delta(name, slot[name], hidden, args, kwargs) for name in self.sets]
        # Computed in the fusion's dtype (its sets', maybe float32 on a bfloat16 base) and on
        # a feature-last view (channels-first outputs move their feature axis last for a while).
        dim, dtype = self.feature_dim, self.query.weight.dtype
        cast = hidden.dtype != dtype and hidden.is_floating_point()
        last = [t.movedim(dim, -1).to(dtype) if cast else t.movedim(dim, -1)
                for t in (hidden, *deltas)]
        out = self(last[0], torch.stack(last[1:], dim=-2)).movedim(-1, dim)
        return out.to(hidden.dtype) if cast else out

    def extra_repr(self) -> str:
        return f"sets={list(self.sets)}"


def fusion_layout(slot: Any, config: FusionConfig, where: str) -> tuple[int, int]:
    """``(d_model, feature_dim)`` of a fusion at ``slot``: those of the fused sets' adapters,
    which must agree and adapt the same output."""
    missing = [s for s in config.sets if s not in slot]
    if missing:
        raise ValueError(
            f"module '{where}' holds no adapter of set(s) {missing}; a fusion sits only where "
            f"all of {list(config.sets)} are injected"
        )
    adapters = [slot[s] for s in config.sets]
    fused = [s for s, a in zip(config.sets, adapters, strict=True) if not isinstance(a, Adapter)]
    if fused:
        raise ValueError(f"set '{fused[0]}' is itself a fusion; fuse adapter sets only")
    layouts = {(a.d_model, getattr(a, "feature_dim", -1)) for a in adapters}
    keys = {a.config.output_key for a in adapters}
    if len(layouts) > 1 or keys != {config.output_key}:
        raise ValueError(
            f"at module '{where}' the sets {list(config.sets)} adapt outputs of different "
            f"(width, feature axis) {sorted(layouts)} or keys {sorted(map(repr, keys))}; a "
            "fusion weighs contributions to one hidden state"
        )
    return layouts.pop()


def add_fusion(model: nn.Module, name: str, config: FusionConfig, keys: Sequence[str]) -> None:
    """Put a new fusion ``name`` at the slots ``keys``; all checks first, then the change.

    Raises:
        ValueError: a module outside ``keys`` holds some of the fused sets (there, while the
            fusion is active, none of them would run); a slot in ``keys`` that lacks one of
            them, or whose sets adapt different outputs.
    """
    slots = {key: slot for key, _, slot in adapted_modules(model)}
    _check_covered(slots, name, config.sets, set(keys))
    new = {}
    for key in keys:
        slot = slots[key]
        width, dim = fusion_layout(slot, config, key)
        weight = next(slot[config.sets[0]].parameters())
        new[key] = AdapterFusion(width, config, feature_dim=dim, device=weight.device,
                                 dtype=weight.dtype).train(slot[config.sets[0]].training)
    install_set(model, name, {key: (slots[key], fusion) for key, fusion in new.items()},
                activate=False)


def _check_covered(slots: dict[str, Any], name: str, sets: tuple[str, ...],
                   keys: set[str]) -> None:
    """Refuse a fusion that would leave out a module its sets wrap."""
    left: dict[tuple[str, ...], list[str]] = {}
    for key, slot in slots.items():
        held = tuple(s for s in sets if s in slot)
        if held and key not in keys:
            left.setdefault(held, []).append(key)
    if not left:
        return
    parts = []
    for held, where in left.items():
        shown = ", ".join(f"'{k}'" for k in where[:3]) + (
            f" and {len(where) - 3} more" if len(where) > 3 else "")
        parts.append(f"{shown} hold only {list(held)}" if len(held) < len(sets) else
                     f"{shown} hold all of them, but the fusion has no weights there")
    raise ValueError(
        f"fusion '{name}' of {list(sets)} would not sit at every module its sets wrap: "
        f"{'; '.join(parts)}. While '{name}' is active its sets run only inside it, so there "
        "they would silently not run. A fusion needs its sets on the same modules: fuse sets "
        "injected on the same targets (load a fusion file into a model holding the sets it "
        "was made with), or combine these with average({...}), which adds each set where it is"
    )


def fuse(
    model: nn.Module, sets: Sequence[str], name: str = "fusion", *, dropout: float = 0.0
) -> nn.Module:
    """Add fusion set ``name`` over ``sets`` at every module that all of them wrap.

    The fusion starts as the exact mean of the fused sets' outputs. It is not active until
    ``set_active(model, name)``; train it alone with ``freeze(model, train=["adapters:NAME"])``
    (the fused sets stay frozen). Refused, before the model changes: fewer than two sets, an
    unknown set, a set that is itself a fusion, sets that adapt different outputs, no module
    that all the sets wrap, sets that do not wrap the same modules.

    Example:
        >>> import torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
        >>> cfg = adapterkit.AdapterConfig(bottleneck=4, init="normal", init_std=0.5)
        >>> for name in ["a", "b"]:
        ...     _ = adapterkit.inject(model, ["0"], cfg, name=name)
        >>> x, outputs = torch.randn(3, 8), []
        >>> for name in ["a", "b"]:
        ...     adapterkit.set_active(model, name)
        ...     outputs.append(model(x))
        >>> _ = adapterkit.fuse(model, ["a", "b"], name="f")
        >>> adapterkit.set_active(model, "f")
        >>> torch.allclose(model(x), (outputs[0] + outputs[1]) / 2, atol=1e-6)  # the mean
        True
        >>> report = adapterkit.freeze(model, train=["adapters:f"])
        >>> sorted({n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad})
        ['f']
    """
    if isinstance(sets, str):
        raise ValueError(f"fuse takes a list of set names, got the string {sets!r}")
    require_sets(model, list(sets), "fuse: ")
    check_set_name(model, name)
    where = {key: slot for key, _, slot in adapted_modules(model)}
    keys = [key for key, slot in where.items() if all(s in slot for s in sets)]
    first = next((slot[s] for slot in where.values() for s in sets if s in slot), None)
    key = first.config.output_key if isinstance(first, Adapter) else None
    config = FusionConfig(sets=tuple(sets), dropout=dropout, output_key=key)
    if not keys:
        wraps = {s: [k for k, slot in where.items() if s in slot][:3] for s in sets}
        raise ValueError(
            f"fuse: no module is wrapped by all of {list(sets)} (they wrap {wraps}); a fusion "
            "sits where every fused set is injected"
        )
    add_fusion(model, name, config, keys)
    return model
