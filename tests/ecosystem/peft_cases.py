"""The PEFT fixtures in ``tests/fixtures/peers/peft``, as the PEFT interop tests read them.

Each case is a folder PEFT 0.21.2 saved (``adapter/``), PEFT's own outputs on fixed inputs
with a padded row (``expected.safetensors``) and ``case.json`` (the base under
``tests/fixtures/peers/bases``, ``expect``: ``"exact"`` or ``"refuse"`` + ``refuse_option``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
t = pytest.importorskip("transformers", reason="the PEFT fixtures' bases are transformers "
                                               "models: pip install -e '.[hf]'")

PEERS = Path(__file__).resolve().parents[1] / "fixtures" / "peers"
CASES = sorted(p.name for p in (PEERS / "peft").iterdir() if (p / "case.json").is_file())
INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "pixel_values")


@functools.cache
def case(name: str) -> dict:
    return json.loads((PEERS / "peft" / name / "case.json").read_text())


def exact_cases() -> list[str]:
    return [c for c in CASES if case(c)["expect"] == "exact"]


def folder(name: str) -> Path:
    return PEERS / "peft" / name / "adapter"


@functools.cache
def _expected(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(PEERS / "peft" / name / "expected.safetensors"))


def expected(name: str) -> dict[str, torch.Tensor]:
    return dict(_expected(name))


def inputs(name: str) -> dict[str, torch.Tensor]:
    """The fixture's inputs, its attention mask (a padded row) included."""
    return {k: v for k, v in _expected(name).items() if k in INPUTS}


def base(name: str) -> torch.nn.Module:
    """A fresh copy of the case's base model, as transformers 5 loads it, in eval mode."""
    spec = case(name)
    cls = (t.AutoModelForSequenceClassification if spec["arch"] == "bert_seqcls"
           else t.AutoModel)
    return cls.from_pretrained(PEERS / spec["base"]).eval()


def outputs(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The case's recorded outputs of ``model`` on the case's inputs."""
    with torch.no_grad():
        out = model(**inputs(name))
    return {k: out[k] for k in case(name)["outputs"]}


def max_diff(model: torch.nn.Module, name: str) -> float:
    """The largest difference from PEFT's recorded outputs, padded positions included."""
    want = _expected(name)
    return max((v - want[k]).abs().max().item() for k, v in outputs(model, name).items())
