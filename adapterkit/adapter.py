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

    ``down`` and ``up`` mix the features on axis ``feature_dim`` of ``h`` and act per position
    along every other axis: the last axis of a transformer's hidden state, the channel axis
    (``feature_dim=1``) of a conv output, where they are the 1x1 bottleneck of residual
    adapters for CNNs (Rebuffi et al. 2017).

    Example:
        >>> adapter = Adapter(32, AdapterConfig(bottleneck=8))
        >>> h = torch.randn(2, 5, 32)
        >>> bool(torch.equal(adapter.eval()(h), h))  # zero init: the exact identity
        True
        >>> conv_adapter = Adapter(16, AdapterConfig(bottleneck=4), feature_dim=1)
        >>> conv_adapter(torch.randn(2, 16, 7, 5)).shape  # (N, C, H, W): C is mixed
        torch.Size([2, 16, 7, 5])
    """

    def __init__(
        self,
        d_model: int,
        config: AdapterConfig | None = None,
        *,
        feature_dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = config or AdapterConfig()
        self.config = config
        self.d_model = d_model
        self.feature_dim = feature_dim
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
        dim = self.feature_dim
        if not isinstance(x, torch.fx.Proxy) and not (
            -x.dim() <= dim < x.dim() and x.shape[dim] == self.d_model
        ):
            raise ValueError(
                f"adapter expects inputs of size d_model={self.d_model} on axis {dim}, got "
                f"shape {tuple(x.shape)}; pass AdapterConfig(d_model=..., feature_dim=...) "
                "matching the wrapped module's output"
            )
        last = dim == -1 or (not isinstance(x, torch.fx.Proxy) and dim == x.dim() - 1)
        if not last:
            x = x.movedim(dim, -1)
        y = self.dropout(self.up(self.act(self.down(x))))
        if self.scaling != 1.0:
            y = y * self.scaling
        return y if last else y.movedim(-1, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)

    def extra_repr(self) -> str:
        c = self.config
        axis = "" if self.feature_dim == -1 else f", feature_dim={self.feature_dim}"
        return f"placement={c.placement}, scaling={c.scaling}{axis}"
