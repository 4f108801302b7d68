"""The bottleneck adapter module (Houlsby et al. 2019), as the seed writes it."""

from __future__ import annotations

import torch
from torch import nn

from .config import AdapterConfig

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class Adapter(nn.Module):
    """``h -> h + scaling * dropout(up(act(down(h))))``, with ``up`` zero at init.

    Example:
        >>> adapter = Adapter(32, AdapterConfig(bottleneck=8))
        >>> h = torch.randn(2, 5, 32)
        >>> bool(torch.equal(adapter.eval()(h), h))  # zero init: the exact identity
        True
    """

    def __init__(
        self,
        d_model: int,
        config: AdapterConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = config or AdapterConfig()
        self.config = config
        self.d_model = d_model
        bottleneck = config.bottleneck_for(d_model)
        self.down = nn.Linear(d_model, bottleneck, device=device, dtype=dtype)
        self.act = _ACTIVATIONS[config.activation]()
        self.up = nn.Linear(bottleneck, d_model, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = config.scaling
        self.reset_up()

    @torch.no_grad()
    def reset_up(self) -> None:
        """Initialise the up-projection as the config says (zero: exact identity)."""
        if self.config.init == "zeros":
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.up.weight, std=self.config.init_std)
        nn.init.zeros_(self.up.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution alone: ``scaling * dropout(up(act(down(x))))``."""
        if not isinstance(x, torch.fx.Proxy) and x.shape[-1] != self.d_model:
            raise ValueError(
                f"adapter expects inputs whose last dimension is d_model={self.d_model}, "
                f"got shape {tuple(x.shape)}; pass AdapterConfig(d_model=...) matching the "
                "wrapped module's output"
            )
        y = self.dropout(self.up(self.act(self.down(x))))
        return y if self.scaling == 1.0 else y * self.scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)

    def extra_repr(self) -> str:
        c = self.config
        return f"placement={c.placement}, scaling={c.scaling}"
