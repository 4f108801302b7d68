"""Saves that follow the library's own advice, or go through a wrapper, load back: an included
module that holds adapters (issue 20, item 3), and a model under torch.compile (item 7)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapterkit
from tests.conftest import make_gpt
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


# -- torch.compile ------------------------------------------------------------------------------


def compiled_set(tmp_path):
    torch._dynamo.reset()
    model = adapterkit.inject(make_gpt().eval(), ["mha_block", "ffn_block"], TRAINED)
    plain = adapterkit.save_adapters(model, tmp_path / "plain")
    from_compiled = adapterkit.save_adapters(torch.compile(model, backend="aot_eager"),
                                             tmp_path / "compiled")
    return model, plain, from_compiled


def test_a_set_saved_from_a_compiled_model_is_the_set_saved_from_the_model(tmp_path):
    _, plain, from_compiled = compiled_set(tmp_path)
    assert (json.loads((from_compiled / "adapter_config.json").read_text())
            == json.loads((plain / "adapter_config.json").read_text()))
    got = load_file(from_compiled / "adapter_model.safetensors")
    want = load_file(plain / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("ran_before", [False, True])
def test_a_set_saved_from_a_compiled_model_loads_into_the_plain_and_the_compiled_model(
        tmp_path, ran_before):
    model, _, path = compiled_set(tmp_path)
    x = torch.randint(0, 61, (2, 9))
    expected = model(x)
    fresh = adapterkit.load_adapters(make_gpt().eval(), path)
    assert torch.equal(fresh(x), expected)
    compiled = torch.compile(make_gpt().eval(), backend="aot_eager")
    if ran_before:  # a graph of the base model exists: it must not be reused
        compiled(x)
    assert adapterkit.load_adapters(compiled, path) is compiled
    assert torch.equal(compiled(x), expected)
    again = adapterkit.save_adapters(compiled, tmp_path / "again")
    assert json.loads((again / "adapter_config.json").read_text())["base"]["class"] == "GPT"


def test_a_file_saved_from_a_compiled_model_before_the_fix_still_loads(tmp_path):
    from adapterkit.io.checkpoint import save_set  # below save_adapters: no unwrapping

    model, _, _ = compiled_set(tmp_path)
    old = save_set(torch.compile(model, backend="aot_eager"), tmp_path / "old", "default", [])
    meta = json.loads((old / "adapter_config.json").read_text())
    assert meta["base"]["class"] == "OptimizedModule"
    assert meta["targets"][0].startswith("_orig_mod.")  # what earlier versions wrote
    x = torch.randint(0, 61, (2, 9))
    fresh = adapterkit.load_adapters(make_gpt().eval(), old)
    assert torch.equal(fresh(x), model(x))
    compiled = adapterkit.load_adapters(torch.compile(make_gpt().eval(), backend="aot_eager"), old)
    assert torch.equal(compiled(x), model(x))


def test_load_into_a_ddp_wrapper_refuses_a_set_its_reducer_would_not_see(tmp_path):
    import torch.distributed as dist

    model = adapterkit.inject(make_gpt().eval(), ["mha_block"], TRAINED)
    path = adapterkit.save_adapters(model, tmp_path / "a")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(make_gpt().eval())
        before = {k: v.clone() for k, v in ddp.state_dict().items()}
        with pytest.raises(ValueError, match=r"DistributedDataParallel already wraps: set\(s\) "
                                             r"\['default'\] would be injected outside"):
            adapterkit.load_adapters(ddp, path)
        assert list(ddp.state_dict()) == list(before)
        # a set the model held when DDP wrapped it loads: the model inside gets the weights
        held = adapterkit.inject(make_gpt().eval(), ["mha_block"], TRAINED)
        ddp = nn.parallel.DistributedDataParallel(held)
        assert adapterkit.load_adapters(ddp, path) is ddp
        x = torch.randint(0, 61, (2, 9))
        assert torch.equal(held(x), model(x))
    finally:
        dist.destroy_process_group()
