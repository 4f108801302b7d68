"""torchao quantized bases: ``base_linears(model)``, a ``filter_fn`` that keeps adapters out.

The supported order is quantize, then inject: adapters are made in the base's floating dtype
and train over the frozen quantized weights. Quantizing after inject with torchao's default
filter would quantize the adapters' ``down`` / ``up`` layers too, and a quantized weight gets
no gradient: ``freeze`` and the first training forward refuse such adapters (see
``adapterkit/adapter.py``). This filter quantizes the base's ``nn.Linear`` layers only. It needs
nothing from torchao itself.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..adapter import is_quantized
from ..tree import adapted_modules

__all__ = ["base_linears"]


def base_linears(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """A ``filter_fn`` for ``torchao.quantization.quantize_``: the base's linear layers.

    True for an ``nn.Linear`` that is not inside an adapter and not quantized already
    (a wrapped ``nn.Linear`` target counts as the base's; its adapters stay float).

    Example:
        >>> import torch, adapterkit
        >>> from adapterkit.integrations.torchao import base_linears
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> _ = adapterkit.inject(model, ["0"], adapterkit.AdapterConfig(bottleneck=2))
        >>> keep = base_linears(model)
        >>> [name for name, m in model.named_modules() if keep(m, name)]
        ['0']
    """
    inside_adapters = {id(m) for _, _, slot in adapted_modules(model) for m in slot.modules()}

    def filter_fn(module: nn.Module, fqn: str = "") -> bool:
        return (isinstance(module, nn.Linear) and id(module) not in inside_adapters
                and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)
                and not is_quantized(module.weight))

    return filter_fn
