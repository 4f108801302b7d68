"""Quickstart: the seed's workflow in adapterkit, on text that ships with Python.

Builds the reference GPT, trains it briefly on docstrings of the standard library (text that
every Python installation has), injects Houlsby adapters, freezes everything but the adapters
and the head, trains a few steps and prints the summary.

    python examples/quickstart.py
"""

import argparse
import collections
import json
import pathlib

import torch
import torch.nn.functional as F

import adapterkit
from adapterkit.models.gpt import GPT


def batches(data: torch.Tensor, steps: int, batch: int = 16, T: int = 64):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(data) - T - 1, (batch,), generator=g)
        x = torch.stack([data[j : j + T] for j in i])
        y = torch.stack([data[j + 1 : j + T + 1] for j in i])
        yield x, y


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(adapterkit.trainable_parameters(model), lr=lr)
    model.train()
    for x, y in batches(data, steps):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def main() -> None:
    torch.manual_seed(0)
    text = "\n".join(m.__doc__ or "" for m in (argparse, collections, json, pathlib)) * 4
    data = torch.tensor(list(text.encode()), dtype=torch.long)
    model = GPT(vocab_size=256, d_model=64, max_length=64, num_heads=4, dff=128, dropout=0.1, N=2)
    print(f"pretrain (all parameters): loss {train(model, data, 150, 3e-3):.3f}")

    model = adapterkit.inject(model, targets=["mha_block", "ffn_block"])  # Houlsby, zero init
    print(adapterkit.freeze(model, train=["adapters", "cls"]))
    print(f"adapters + head: loss {train(model, data, 60, 1e-3):.3f}")
    print(adapterkit.summary(model))


if __name__ == "__main__":
    main()
