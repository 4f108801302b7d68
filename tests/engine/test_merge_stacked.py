"""Merges stacked on the same modules unwind newest-first, and a real change is still refused."""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import make_gpt

LINEAR = AdapterConfig(bottleneck=4, activation="identity", placement="sequential", init="normal",
                       init_std=0.3, dropout=0.0)
TARGETS = ["re:.*mha_block\\.q_proj", "re:.*ffn_block\\.fc2"]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor],
                   adapters: str | None = None) -> None:
    """The model's state is ``expected``, plus the adapters of set ``adapters``."""
    now = model.state_dict()
    assert [k for k in now if adapters is None or f".{adapters}." not in k] == list(expected)
    for key, value in expected.items():
        assert torch.equal(now[key], value), key


def test_unmerging_in_reverse_order_restores_each_stage_exactly(tokens) -> None:
    model = make_gpt().eval()
    base = weights(model)
    adapterkit.inject(model, TARGETS, LINEAR, name="s1")
    adapted = model(tokens)
    r1 = adapterkit.merge(model, "s1")
    after_s1 = weights(model)
    adapterkit.inject(model, TARGETS, LINEAR, name="s3")
    adapterkit.set_active(model, ["s3"])
    r3 = adapterkit.merge(model, "s3")
    adapterkit.unmerge(model, r3)
    adapterkit.set_active(model, [])
    assert_weights(model, after_s1, adapters="s3")  # s1's merged weights, bit for bit
    adapterkit.unmerge(model, r1)  # refused before: "the weights ... changed after the merge"
    assert adapterkit.active(model) == ["s1"]
    torch.testing.assert_close(model(tokens), adapted, rtol=0, atol=0)
    adapterkit.eject(model)
    assert_weights(model, base)


def test_a_change_after_the_newer_unmerge_is_still_refused() -> None:
    model = make_gpt().eval()
    adapterkit.inject(model, TARGETS, LINEAR, name="s1")
    r1 = adapterkit.merge(model, "s1")
    adapterkit.inject(model, TARGETS, LINEAR, name="s3")
    r3 = adapterkit.merge(model, "s3")
    adapterkit.unmerge(model, r3)
    with torch.no_grad():
        model.decoder_blocks[0].mha_block.q_proj.weight.add_(1e-3)  # trained after the merges
    before = weights(model)
    with pytest.raises(ValueError, match=r"the weights of 'decoder_blocks.0.mha_block.q_proj' "
                                         r"changed after the merge"):
        adapterkit.unmerge(model, r1)
    assert_weights(model, before)


def test_unmerging_the_older_record_first_is_refused() -> None:
    model = make_gpt().eval()
    adapterkit.inject(model, TARGETS, LINEAR, name="s1")
    r1 = adapterkit.merge(model, "s1")
    adapterkit.inject(model, TARGETS, LINEAR, name="s3")
    adapterkit.merge(model, "s3")
    with pytest.raises(ValueError, match="changed after the merge"):
        adapterkit.unmerge(model, r1)  # s3's merge sits on top of it
