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
from .average import Average, average, average_sets
from .checkpoint import load_adapters, save_adapters
from .config import AdapterConfig, FreezeSpec
from .freeze import FreezeReport, freeze, trainable_parameters
from .fusion import AdapterFusion, FusionConfig, fuse
from .fx import calls
from .lifecycle import active, adapters, disabled, eject, inject, set_active
from .merge import Merged, merge, unmerge
from .plan import Plan, PlanRow, plan
from .presets import auto_targets
from .report import Summary, summary
from .reset import reset_adapters
from .routing import routed
from .training import TwoPhaseResult, train_two_phase

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterFusion",
    "Average",
    "FreezeReport",
    "FreezeSpec",
    "FusionConfig",
    "Merged",
    "Plan",
    "PlanRow",
    "Summary",
    "TwoPhaseResult",
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
