"""adapterkit: bottleneck adapters for any PyTorch model, one call in, exactly undone.

>>> import adapterkit
>>> from adapterkit.models.gpt import GPT
>>> model = GPT(vocab_size=64, d_model=32, max_length=16, num_heads=4, dff=64, dropout=0.1, N=2)
>>> model = adapterkit.inject(model, targets=["mha_block", "ffn_block"])
>>> _ = adapterkit.freeze(model, train=["adapters", "cls"])
>>> len(adapterkit.adapters(model))
4
"""

from .adapter import Adapter
from .compose import (
    AdapterFusion,
    Average,
    Merged,
    average,
    average_sets,
    fuse,
    merge,
    routed,
    unmerge,
)
from .config import AdapterConfig, FreezeSpec, FusionConfig
from .errors import (
    AdapterFileError,
    LayoutError,
    NoGradientError,
    UninitialisedAdapterError,
    UntraceableModelError,
)
from .freezing import FreezeReport, freeze, trainable_parameters
from .fx import calls
from .io import load_adapters, save_adapters
from .lifecycle import (
    active,
    adapters,
    disabled,
    eject,
    inject,
    own,
    reset_adapters,
    set_active,
)
from .presets import auto_targets
from .report import Plan, PlanRow, Summary, plan, summary
from .training import TwoPhaseResult, train_two_phase

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterFusion",
    "Average",
    "FreezeReport",
    "FreezeSpec",
    "FusionConfig",
    "LayoutError",
    "Merged",
    "NoGradientError",
    "Plan",
    "PlanRow",
    "Summary",
    "TwoPhaseResult",
    "UninitialisedAdapterError",
    "UntraceableModelError",
    "active",
    "adapters",
    "auto_targets",
    "average",
    "average_sets",
    "calls",
    "disabled",
    "eject",
    "freeze",
    "fuse",
    "inject",
    "load_adapters",
    "merge",
    "own",
    "plan",
    "reset_adapters",
    "routed",
    "save_adapters",
    "set_active",
    "summary",
    "train_two_phase",
    "trainable_parameters",
    "unmerge",
]
