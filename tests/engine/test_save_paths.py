"""Saves that follow the library's own advice, or go through a wrapper, load back: an included
module that holds adapters (issue 20, item 3)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapterkit
from tests.zoo import ResBlock

TRAINED = adapterkit.AdapterConfig(bottleneck=3, dropout=0.0, init="normal", init_std=0.3)


# -- an included module that holds adapters ---------------------------------------------------


def resblock() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(ResBlock(6))


def bn_trained(targets: list[str]) -> nn.Sequential:
    """Adapters trained in train mode, so that the BatchNorm statistics moved."""
    model = adapterkit.inject(resblock(), targets, TRAINED).train()
    adapterkit.freeze(model, train=["adapters"])
    opt = torch.optim.SGD(adapterkit.trainable_parameters(model), lr=0.1)
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("include", [["0.bn1", "0.bn2"], ["0"]])
def test_the_include_the_batchnorm_refusal_names_loads_when_a_batchnorm_is_a_target(
        tmp_path, include):
    targets = ["0.conv2", "0.bn2"]
    model = bn_trained(targets)
    with pytest.raises(ValueError, match=r"include=\['0.bn1', '0.bn2'\]"):
        adapterkit.save_adapters(model, tmp_path / "a")
    path = adapterkit.save_adapters(model, tmp_path / "a", include=include)
    keys = set(load_file(path / "adapter_model.safetensors"))
    assert not [k for k in keys if k.startswith("modules.") and ".adapterkit." in k]
    assert {k for k in keys if k.startswith("adapters.")} == {
        f"adapters.{t}.{p}" for t in targets
        for p in ("down.weight", "down.bias", "up.weight", "up.bias")}
    x = torch.randn(3, 6, 5, 5)
    expected = model(x)
    plain = adapterkit.load_adapters(resblock().eval(), path)
    assert torch.equal(plain(x), expected)
    injected = adapterkit.inject(resblock().eval(), targets, TRAINED)  # other adapter weights
    assert not torch.equal(injected(x), expected)
    injected = adapterkit.load_adapters(injected, path)
    assert torch.equal(injected(x), expected)


def test_an_included_module_saves_no_tensor_of_another_set(tmp_path):
    model = bn_trained(["0.bn2"])
    adapterkit.inject(model, ["0.bn2"], TRAINED, name="other")
    path = adapterkit.save_adapters(model, tmp_path / "a", include=["0.bn1", "0.bn2"])
    assert "modules.0.bn2.running_mean" in load_file(path / "adapter_model.safetensors")
    assert not [k for k in load_file(path / "adapter_model.safetensors") if "other" in k]
    x = torch.randn(3, 6, 5, 5)
    adapterkit.set_active(model, ["default"])  # what the file holds: the set alone
    fresh = adapterkit.load_adapters(resblock().eval(), path)
    assert torch.equal(fresh(x), model(x))

