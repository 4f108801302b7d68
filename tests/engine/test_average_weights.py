"""Parameter averaging takes any weights (task arithmetic); output averaging needs a sum of 1.

And parameter averaging is not output averaging even for identity-activation sets.
"""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import make_gpt

IDENTITY = AdapterConfig(bottleneck=4, activation="identity", init="normal", init_std=0.3,
                         dropout=0.0)


def two_sets() -> torch.nn.Module:
    model = make_gpt().eval()
    for name in ["a", "b"]:
        adapterkit.inject(model, ["mha_block", "ffn_block"], IDENTITY, name=name)
    return model


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": -0.5}, {"a": 0.7, "b": 0.7}])
def test_parameter_average_takes_weights_that_do_not_sum_to_one(weights) -> None:
    model = two_sets()
    adapterkit.average_sets(model, weights, name="ab")
    a, b, ab = (adapterkit.adapters(model, n)["decoder_blocks.0.ffn_block"]
                for n in ["a", "b", "ab"])
    for key, tensor in ab.state_dict().items():
        expected = weights["a"] * a.state_dict()[key] + weights["b"] * b.state_dict()[key]
        torch.testing.assert_close(tensor, expected, msg=key)


def test_output_average_still_refuses_a_sum_other_than_one_with_the_reason() -> None:
    with pytest.raises(ValueError, match="a sum other than 1 would scale the base model's output"):
        adapterkit.average({"a": 0.7, "b": 0.7})


def test_parameter_average_differs_from_output_average_for_identity_sets(tokens) -> None:
    model = two_sets()
    adapterkit.average_sets(model, {"a": 0.5, "b": 0.5}, name="ab")
    adapterkit.set_active(model, "ab")
    params = model(tokens)
    adapterkit.set_active(model, adapterkit.average({"a": 0.5, "b": 0.5}))
    outputs = model(tokens)
    assert (params - outputs).abs().max() > 1e-4  # up and down are averaged apart: bilinear
