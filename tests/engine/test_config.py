"""AdapterConfig, FreezeSpec and the Adapter module."""

from __future__ import annotations

import pytest
import torch

from adapterkit import Adapter, AdapterConfig, FreezeSpec


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bottleneck": 0}, "bottleneck"),
        ({"bottleneck": 2.5}, "bottleneck"),
        ({"bottleneck": True}, "bottleneck"),
        ({"bottleneck": 8, "reduction_factor": 4}, "bottleneck or reduction_factor"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"reduction_factor": "16"}, "reduction_factor"),
        ({"activation": "swish"}, "activation"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": 1.0}, "dropout"),
        ({"placement": "after"}, "placement"),
        ({"scaling": float("nan")}, "scaling"),
        ({"scaling": "2"}, "scaling"),
        ({"scaling": 0.0}, "scaling must not be 0"),
        ({"init": "xavier"}, "init"),
        ({"init_std": -1.0}, "init_std"),
        ({"d_model": 0}, "d_model"),
        ({"output_key": 1.5}, "output_key"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**kwargs)


def test_bottleneck_rules():
    assert AdapterConfig().bottleneck_for(768) == 64  # the seed's default
    assert AdapterConfig(bottleneck=8).bottleneck_for(768) == 8
    assert AdapterConfig(reduction_factor=16).bottleneck_for(768) == 48
    assert AdapterConfig(reduction_factor=1000).bottleneck_for(32) == 1


def test_config_is_frozen_and_round_trips_through_a_dict():
    config = AdapterConfig(bottleneck=8, activation="relu", placement="parallel", scaling=2.0)
    with pytest.raises(AttributeError):
        config.bottleneck = 3  # type: ignore[misc]
    assert AdapterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown AdapterConfig field\(s\) \['rank'\]"):
        AdapterConfig.from_dict({**config.to_dict(), "rank": 4})


def test_freeze_spec_round_trip_and_validation():
    spec = FreezeSpec(train=["adapters", "cls"], freeze=["cls.bias"])
    assert spec.train == ("adapters", "cls")
    assert FreezeSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="list of strings"):
        FreezeSpec(train=[1])
    with pytest.raises(ValueError, match=r"unknown FreezeSpec field\(s\) \['trian'\]"):
        FreezeSpec.from_dict({"trian": ["adapters"]})


def test_adapter_structure_and_zero_init():
    adapter = Adapter(16, AdapterConfig(bottleneck=4))
    assert [n for n, _ in adapter.named_children()] == ["down", "act", "up", "dropout"]
    assert adapter.up.weight.abs().sum() == 0 and adapter.up.bias.abs().sum() == 0
    assert adapter.down.weight.abs().sum() > 0
    h = torch.randn(3, 16)
    assert torch.equal(adapter.train()(h), h)  # dropout of zeros is zeros


def test_adapter_formula_with_scaling_and_normal_init():
    torch.manual_seed(0)
    config = AdapterConfig(bottleneck=4, activation="tanh", scaling=0.5, init="normal",
                           init_std=0.1)
    adapter = Adapter(16, config).eval()
    assert 0 < adapter.up.weight.std() < 0.2
    h = torch.randn(3, 16)
    expected = h + 0.5 * adapter.up(torch.tanh(adapter.down(h)))
    assert torch.allclose(adapter(h), expected)
    with pytest.raises(ValueError,
                       match=r"inputs of size d_model=16 on axis -1, got shape \(3, 8\)"):
        adapter(torch.randn(3, 8))


def test_freeze_spec_coerce_accepts_the_three_forms_and_refuses_others():
    spec = FreezeSpec(train=["cls"])
    assert FreezeSpec.coerce(spec) is spec
    assert FreezeSpec.coerce({"train": ["cls"]}) == spec
    assert FreezeSpec.coerce(None) == FreezeSpec(train=["adapters"])
    with pytest.raises(TypeError, match="a freeze spec is a FreezeSpec, a dict or None, got list"):
        FreezeSpec.coerce(["cls"])
