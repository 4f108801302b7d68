"""Tiny models shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from adapterkit.models.gpt import GPT

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_gpt(seed: int = 0, *, vocab: int = 61, d: int = 32, heads: int = 4, dff: int = 48,
             layers: int = 2, max_length: int = 16, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=vocab, d_model=d, max_length=max_length, num_heads=heads, dff=dff,
               dropout=dropout, N=layers)


class MLP(nn.Module):
    """A small non-transformer model: blocks of Linear layers, one of them a Sequential."""

    def __init__(self, d: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, d)
        self.body = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.head(h + self.body(h))


@pytest.fixture
def gpt() -> GPT:
    return make_gpt().eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> dict:
    """Everything eject/refusals must restore: module objects, classes and the state_dict."""
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_same(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert list(now["state"]) == list(snap["state"])
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert now["requires_grad"] == snap["requires_grad"]
