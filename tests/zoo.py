"""A zoo of small models of every layout adapterkit meets, for the table-driven tests.

Each ``Animal`` builds a model (the same weights on every call), its inputs, the targets to
adapt, the config, and how to read one tensor out of the model's output.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from adapterkit import AdapterConfig


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Animal:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    targets: Any
    config: AdapterConfig = AdapterConfig(bottleneck=3, dropout=0.0)
    read: Callable[[Any], torch.Tensor] = lambda y: y
    n_adapters: int = 1
    layouts: dict[str, tuple[int, int]] = field(default_factory=dict)  # expected, by target

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make().eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU(),
                                   nn.Dropout(0.0), nn.Linear(16, 16))
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.norm(h + self.block(h))
        return self.head(h)


class ConvNet(nn.Module):
    """Conv -> norm -> act over ``dims`` spatial axes; circular padding keeps every layer
    equivariant to shifts along the spatial axes."""

    def __init__(self, dims: int, norm: str = "batch", groups: int = 1) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.stem = conv(3, 8, 3, padding=1, padding_mode="circular")
        self.conv = conv(8, 8, 3, padding=1, padding_mode="circular", groups=groups)
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.norm = bn(8) if norm == "batch" else nn.GroupNorm(2, 8)
        self.out = conv(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + torch.relu(self.norm(self.conv(h)))
        return self.out(h)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(6), ResBlock(6)])
        self.up = nn.ConvTranspose2d(6, 5, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.up(h)


class Recurrent(nn.Module):
    """An RNN and a head that reads either the sequence or the final state h_n."""

    def __init__(self, kind: str, reads: str, **rnn: Any) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(5, 6, **rnn)
        self.reads = reads
        width = 6 if not rnn.get("proj_size") else rnn["proj_size"]
        directions = 2 if rnn.get("bidirectional") else 1
        self.head = nn.Linear(width * directions, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        if self.reads == "h_n":  # the last layer's final state, every direction
            d = 2 if self.rnn.bidirectional else 1
            return self.head(torch.cat(list(h_n[-d:]), dim=-1))
        return self.head(out)


class Attention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.mha(x, x, x)
        return self.head(out)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(ids))))


class Twice(nn.Module):
    """One block called twice, and registered under a second name too."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(8, 8)
        self.alias = self.block
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(torch.relu(self.block(x))))


class Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.T) / 2


def parametrized() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


Pair = collections.namedtuple("Pair", "logits hidden")


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> dict:
        return {"mask": x > 0, "hidden": self.lin(x)}


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(x.sum(-1), self.lin(x))


class NestedOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple:
        return x.mean(), ([x, self.lin(x)], {"n": 2})


class Reads(nn.Module):
    """Wraps a module with a structured output and reads one tensor of it."""

    def __init__(self, inner: nn.Module, read: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.read, self.head = inner, read, nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.read(self.inner(x)))


def _x(*shape: int, seed: int = 1) -> tuple:
    return (torch.randn(*shape, generator=_gen(seed)),)


def _ids() -> tuple:
    return (torch.randint(0, 20, (2, 5), generator=_gen(2)),)


CONV_W_EQ_C = Animal("Conv2d, W == C", lambda: ConvNet(2), lambda: _x(2, 3, 5, 8),
                     ["conv"], layouts={"conv": (8, -3)})
ZOO = [
    Animal("MLP: LayerNorm, dropout, residual Sequential", MLP, lambda: _x(4, 6),
           ["block", "head"], n_adapters=2, layouts={"block": (16, -1), "head": (2, -1)}),
    Animal("MLP: BatchNorm1d", MLP, lambda: _x(4, 6), ["norm"], layouts={"norm": (16, 1)}),
    Animal("Conv1d", lambda: ConvNet(1), lambda: _x(2, 3, 7), ["conv"],
           layouts={"conv": (8, -2)}),
    CONV_W_EQ_C,
    Animal("Conv3d", lambda: ConvNet(3), lambda: _x(2, 3, 3, 4, 5), ["conv"],
           layouts={"conv": (8, -4)}),
    Animal("grouped Conv2d + GroupNorm", lambda: ConvNet(2, norm="group", groups=4),
           lambda: _x(2, 3, 6, 6), ["conv", "norm"], n_adapters=2,
           layouts={"conv": (8, -3), "norm": (8, 1)}),
    Animal("BatchNorm2d", lambda: ConvNet(2), lambda: _x(2, 3, 6, 6), ["norm"],
           layouts={"norm": (8, -3)}),
    Animal("conv residual blocks + ConvTranspose2d", ResNetish, lambda: _x(2, 3, 6, 6),
           ["blocks.*", "up"], n_adapters=3,
           layouts={"blocks.0": (6, -3), "up": (5, -3)}),
    Animal("Embedding (tied to the head)", Tied, _ids, ["emb", "mix"], n_adapters=2,
           layouts={"emb": (8, -1), "mix": (8, -1)}),
    Animal("MultiheadAttention, batch_first", lambda: Attention(True), lambda: _x(2, 5, 8),
           ["mha"], layouts={"mha": (8, -1)}),
    Animal("MultiheadAttention, sequence first", lambda: Attention(False),
           lambda: _x(5, 2, 8), ["mha"]),
    Animal("GRU", lambda: Recurrent("GRU", "seq", batch_first=True), lambda: _x(2, 4, 5),
           ["rnn"], layouts={"rnn": (6, -1)}),
    Animal("GRU, reads h_n", lambda: Recurrent("GRU", "h_n", num_layers=2),
           lambda: _x(4, 2, 5), ["rnn"]),
    Animal("LSTM, bidirectional, reads h_n",
           lambda: Recurrent("LSTM", "h_n", bidirectional=True, batch_first=True),
           lambda: _x(2, 4, 5), ["rnn"], layouts={"rnn": (12, -1)}),
    Animal("LSTM, proj_size, bidirectional, 2 layers",
           lambda: Recurrent("LSTM", "seq", proj_size=3, bidirectional=True, num_layers=2,
                             batch_first=True),
           lambda: _x(2, 4, 5), ["rnn"], layouts={"rnn": (6, -1)}),
    Animal("LSTM, proj_size, reads h_n",
           lambda: Recurrent("LSTM", "h_n", proj_size=4), lambda: _x(4, 2, 5), ["rnn"],
           layouts={"rnn": (4, -1)}),
    Animal("module called twice, selected by its second name", Twice, lambda: _x(3, 8),
           ["alias"], layouts={"block": (8, -1)}),
    Animal("parametrized Linear", parametrized, lambda: _x(3, 8), ["re:0"],
           layouts={"0": (8, -1)}),
    Animal("dict output", lambda: Reads(DictOut(), lambda y: y["hidden"]), lambda: _x(3, 8),
           ["inner"], AdapterConfig(bottleneck=3, dropout=0.0, output_key="hidden")),
    Animal("namedtuple output, by field name",
           lambda: Reads(TupleOut(), lambda y: y.hidden), lambda: _x(3, 8), ["inner"],
           AdapterConfig(bottleneck=3, dropout=0.0, output_key="hidden")),
    Animal("nested output, by path", lambda: Reads(NestedOut(), lambda y: y[1][0][1]),
           lambda: _x(3, 8), ["inner"],
           AdapterConfig(bottleneck=3, dropout=0.0, output_key=(1, 0, 1))),
    Animal("parallel placement on a conv", lambda: ConvNet(2), lambda: _x(2, 3, 5, 8),
           ["conv"], AdapterConfig(bottleneck=3, dropout=0.0, placement="parallel",
                                   scaling=2.0)),
]
