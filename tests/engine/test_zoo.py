"""Every layout adapterkit meets, table-driven over the zoo in tests/zoo.py: identity at
init, gradients on adapters only, only adapters change in training, save/load, disabled,
bit-exact eject, deepcopy, and the width and axis of every adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapterkit
from tests.conftest import assert_same, snapshot
from tests.zoo import CONV_W_EQ_C, ZOO, Animal, ConvNet, _gen

ids = [a.name for a in ZOO]
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")


def run(animal: Animal, model: nn.Module) -> torch.Tensor:
    return animal.read(model(*animal.inputs()))


def injected(animal: Animal, **kw) -> nn.Module:
    return adapterkit.inject(animal.build(), animal.targets, animal.config, **kw)


def frozen_base(animal: Animal) -> nn.Module:
    """The base as a trained model runs it: torch's RNNs pick kernels by requires_grad."""
    base = animal.build()
    base.requires_grad_(False)
    return base


def norms_in_eval(model: nn.Module) -> None:
    """The practice for a frozen CNN: BatchNorm keeps its statistics (see docs/models.md)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train(animal: Animal, model: nn.Module, steps: int = 3) -> list[float]:
    adapterkit.freeze(model, train=["adapters"])
    model.train()
    norms_in_eval(model)
    with torch.no_grad():
        target = torch.randn(run(animal, model).shape, generator=_gen(9))
    opt = torch.optim.Adam(adapterkit.trainable_parameters(model), lr=0.05)
    losses = []
    for _ in range(steps):
        loss = (run(animal, model) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("animal", ZOO, ids=ids)
def test_identity_at_init(animal: Animal, mode: str) -> None:
    base = animal.build().train(mode == "train")
    model = copy.deepcopy(base)
    adapterkit.inject(model, animal.targets, animal.config)
    assert len(adapterkit.adapters(model)) == animal.n_adapters
    with torch.no_grad():
        assert torch.equal(run(animal, model), run(animal, base))


@pytest.mark.parametrize("animal", ZOO, ids=ids)
def test_gradients_reach_adapters_only(animal: Animal) -> None:
    model = injected(animal).train()
    norms_in_eval(model)
    adapterkit.freeze(model, train=["adapters"])
    run(animal, model).pow(2).sum().backward()
    adapter_ids = {id(p) for a in adapterkit.adapters(model).values() for p in a.parameters()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in adapter_ids), name
    for name, adapter in adapterkit.adapters(model).items():
        assert adapter.up.weight.grad.abs().sum() > 0, name  # it reaches the output


@pytest.mark.parametrize("animal", ZOO, ids=ids)
def test_training_changes_adapters_only_and_they_change_the_output(animal: Animal) -> None:
    model = injected(animal)
    base_state = {k: v.clone() for k, v in animal.build().state_dict().items()}
    losses = train(animal, model)
    assert losses[-1] < losses[0], losses
    state = model.state_dict()
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key
    model.eval()
    with torch.no_grad():
        adapted = run(animal, model)
        base = run(animal, frozen_base(animal))
        with adapterkit.disabled(model):
            assert torch.equal(run(animal, model), base)
    assert not torch.allclose(adapted, base)


@pytest.mark.parametrize("animal", ZOO, ids=ids)
def test_save_load_round_trip_onto_a_fresh_base(animal: Animal, tmp_path) -> None:
    model = injected(animal)
    train(animal, model, steps=2)
    path = adapterkit.save_adapters(model, tmp_path / "a")
    fresh = adapterkit.load_adapters(frozen_base(animal), path)
    assert sorted(adapterkit.adapters(fresh)) == sorted(adapterkit.adapters(model))
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(animal, fresh), run(animal, model))


@pytest.mark.parametrize("animal", ZOO, ids=ids)
def test_eject_is_bit_exact(animal: Animal) -> None:
    model = animal.build()
    snap = snapshot(model)
    adapterkit.inject(model, animal.targets, animal.config)
    train(animal, model, steps=1)
    adapterkit.freeze(model, train=["adapters"], freeze=[])
    for p in model.parameters():  # the freeze is the user's to undo: undo it for the check
        p.requires_grad_(True)
    adapterkit.eject(model.eval())
    assert_same(model, snap)


@pytest.mark.parametrize("animal", ZOO, ids=ids)
def test_deepcopy_is_independent_and_equal(animal: Animal) -> None:
    model = injected(animal)
    train(animal, model, steps=1)
    twin = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(animal, twin), run(animal, model))
        for adapter in adapterkit.adapters(twin).values():
            adapter.up.weight.add_(1.0)
        assert not torch.allclose(run(animal, twin), run(animal, model))


@pytest.mark.parametrize("animal", [a for a in ZOO if a.layouts], ids=lambda a: a.name)
def test_width_and_axis_of_every_adapter(animal: Animal) -> None:
    adapters = adapterkit.adapters(injected(animal))
    for target, (width, axis) in animal.layouts.items():
        assert (adapters[target].d_model, adapters[target].feature_dim) == (width, axis)


@pytest.mark.parametrize("animal", ZOO, ids=ids)
def test_example_inputs_give_the_layouts_that_the_structure_gives(animal: Animal) -> None:
    static = adapterkit.adapters(injected(animal))
    seen = adapterkit.adapters(injected(animal, example_inputs=animal.inputs()))
    for target, adapter in static.items():
        width, axis = seen[target].d_model, seen[target].feature_dim
        assert (width, axis) == (adapter.d_model, adapter.feature_dim), target


def test_conv_adapter_acts_on_channels_when_width_equals_channels() -> None:
    """A block of circular convs commutes with shifts along W; so does a per-position adapter
    on the channels. One on the W axis (size 8 == C here) would not."""
    model = injected(CONV_W_EQ_C)
    for adapter in adapterkit.adapters(model).values():
        nn.init.normal_(adapter.up.weight, std=0.5, generator=_gen(3))
    (x,) = CONV_W_EQ_C.inputs()
    assert x.shape[-1] == model.conv.out_channels  # the case that used to pass silently
    with torch.no_grad():
        y = model(x)
        for shift in (1, 3):
            torch.testing.assert_close(model(torch.roll(x, shift, -1)),
                                       torch.roll(y, shift, -1))
        with adapterkit.disabled(model):
            assert not torch.allclose(model(x), y)
    wrong = adapterkit.inject(ConvNet(2).eval(), ["conv"], adapterkit.AdapterConfig(
        bottleneck=3, d_model=8, feature_dim=-1, init="normal", init_std=0.5))
    with torch.no_grad():
        y = wrong(x)
        assert not torch.allclose(wrong(torch.roll(x, 1, -1)), torch.roll(y, 1, -1))
