"""Layouts: the feature axis of channels-first outputs, widths read off real outputs with
example_inputs, structured and recurrent outputs, selection by any name, and the BatchNorm
guard on save."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit
from adapterkit import Adapter, AdapterConfig, LayoutError
from tests.conftest import assert_same, snapshot
from tests.zoo import ConvNet, Recurrent, ResBlock, Twice

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
CFG = AdapterConfig(bottleneck=3, dropout=0.0)


def nonzero(model: nn.Module, std: float = 0.5) -> nn.Module:
    gen = torch.Generator().manual_seed(5)
    for adapter in adapterkit.adapters(model).values():
        nn.init.normal_(adapter.up.weight, std=std, generator=gen)
    return model


# -- channels-first adapters, over random shapes ------------------------------------------------


@st.composite
def conv_cases(draw):
    dims = draw(st.integers(1, 3))
    batch, channels = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=dims, max_size=dims)))
    bottleneck = draw(st.integers(1, 5))
    layer = draw(st.sampled_from(["conv", "norm", "transpose"]))
    seed = draw(st.integers(0, 99))
    return dims, batch, channels, spatial, bottleneck, layer, seed


def _layer(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "conv":
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        return conv(channels, channels, 3, padding=1, padding_mode="circular")
    if kind == "transpose":
        return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1](
            channels, channels, 1)
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](channels)


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_channels_first_adapter_mixes_channels_per_position(case) -> None:
    dims, batch, channels, spatial, bottleneck, kind, seed = case
    torch.manual_seed(seed)
    model = nn.Sequential(_layer(kind, dims, channels)).eval()
    x = torch.randn(batch, channels, *spatial)
    with torch.no_grad():
        base = model(x)
        adapterkit.inject(model, ["0"], AdapterConfig(bottleneck=bottleneck, dropout=0.0))
        assert torch.equal(model(x), base)  # identity at init
        adapter = adapterkit.adapters(nonzero(model))["0"]
        # counted from the end where the layer fixes the spatial axes; BatchNorm1d takes
        # (N, C) and (N, C, L) alike, so its channels are dim 1
        axis = 1 if kind == "norm" and dims == 1 else -(dims + 1)
        assert (adapter.d_model, adapter.feature_dim) == (channels, axis)
        h = base.movedim(1, -1)  # (N, *spatial, C): the reference, one position at a time
        expected = (h + adapter.up(adapter.act(adapter.down(h)))).movedim(-1, 1)
        torch.testing.assert_close(model(x), expected)
        # per position: reversing a spatial axis commutes with the adapter alone
        flipped = adapter(base.flip(-1))
        torch.testing.assert_close(flipped, adapter(base).flip(-1))


def test_adapter_on_the_last_axis_is_unchanged_by_the_axis_field() -> None:
    adapter = Adapter(6, CFG, feature_dim=-1)
    nn.init.normal_(adapter.up.weight)
    h = torch.randn(2, 3, 6)
    torch.testing.assert_close(adapter(h), h + adapter.up(adapter.act(adapter.down(h))))
    with pytest.raises(ValueError, match=r"d_model=6 on axis 1, got shape \(2, 3, 6\)"):
        Adapter(6, CFG, feature_dim=1)(h)


# -- what the structure says, and where it cannot say -------------------------------------------


class Mixed(nn.Module):
    """A ConvNeXt-like block: a channels-first conv, then Linear layers on channels-last."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Permuted(nn.Module):
    """Only convs inside, but it hands back channels-last: its layers cannot tell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).permute(0, 2, 3, 1)


def test_a_block_of_mixed_layouts_is_refused_without_feature_dim() -> None:
    model = nn.Sequential(Mixed())
    snap = snapshot(model)
    with pytest.raises(LayoutError, match=r"cannot tell the feature axis of module '0' \(Mixed\)"
                                          r".*mixes channels-first and last-axis layers "
                                          r"\(Conv2d, Linear\).*feature_dim=1"):
        adapterkit.inject(model, ["0"], CFG)
    assert_same(model, snap)
    adapterkit.inject(model, ["0"], AdapterConfig(bottleneck=3, dropout=0.0, feature_dim=1))
    assert (adapterkit.adapters(model)["0"].d_model, adapterkit.adapters(model)["0"].feature_dim) \
        == (6, 1)
    x = torch.randn(2, 6, 5, 5)
    nonzero(model)
    assert model(x).shape == (2, 6, 5, 5)


class RawConv(nn.Module):
    """A conv of its own parameters: ``out_channels`` says channels, nothing says where."""

    def __init__(self) -> None:
        super().__init__()
        self.out_channels = 4
        self.weight = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight)


def test_a_width_attribute_that_names_channels_does_not_guess_the_axis() -> None:
    with pytest.raises(LayoutError, match=r"'0' \(RawConv\).*its width attribute names "
                                          "channels"):
        adapterkit.inject(nn.Sequential(RawConv()), ["0"], CFG)
    model = adapterkit.inject(nn.Sequential(RawConv()), ["0"],
                              AdapterConfig(bottleneck=2, feature_dim=1))
    assert adapterkit.adapters(model)["0"].d_model == 4
    assert model(torch.randn(2, 4, 3, 4)).shape == (2, 4, 3, 4)


def test_a_sequential_ending_in_flatten_needs_example_inputs_or_d_model() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), nn.Linear(16, 2))

    with pytest.raises(LayoutError, match="Sequential whose output comes from a Flatten"):
        adapterkit.inject(make(), ["re:0"], CFG)
    x = torch.randn(2, 3, 4, 4)
    model = adapterkit.inject(make(), ["re:0"], CFG, example_inputs=x)
    assert adapterkit.adapters(model)["0"].d_model == 16  # (2, 4 * 2 * 2), read off the run
    assert model(x).shape == (2, 2)


# -- example_inputs: everything a forward would hit, at inject ----------------------------------


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


class NoTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.inner(x)
        return None


class CallsNoTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = NoTensor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.m(x)
        return self.m.last


@pytest.mark.parametrize(("make", "targets", "config", "x", "message"), [
    (Unused, ["spare"], CFG, torch.randn(2, 4),
     "module 'spare' was not called when the model ran on example_inputs"),
    (CallsNoTensor, ["m"], AdapterConfig(d_model=4), torch.randn(2, 4),
     "module 'm' returned NoneType with no tensor in it on example_inputs"),
    (lambda: nn.Sequential(nn.Linear(4, 6)), ["0"], AdapterConfig(d_model=4),
     torch.randn(2, 4), r"AdapterConfig\(d_model=4\) does not match module '0', whose output "
                        "has size 6 on axis -1"),
    (lambda: nn.Sequential(Permuted()), ["0"], CFG, torch.randn(2, 4, 3, 5),
     r"its layers give width 4, but its output on example_inputs has shape \(2, 3, 5, 4\)"),
    (lambda: nn.Sequential(nn.Linear(4, 4)), ["0"], AdapterConfig(feature_dim=3),
     torch.randn(2, 4), r"has no axis 3"),
    (lambda: nn.Sequential(nn.Linear(4, 4)), ["0"], CFG, torch.randn(2, 5),
     r"example_inputs do not run through the Sequential"),
])
def test_example_inputs_turn_first_forward_errors_into_inject_errors(make, targets, config, x,
                                                                     message) -> None:
    model = make()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        adapterkit.inject(model, targets, config, example_inputs=x)
    assert_same(model, snap)
    with pytest.raises(ValueError, match=message):
        adapterkit.plan(model, targets, config, example_inputs=x)


class DataDependent(nn.Module):
    """An operation fake tensors cannot run (its output shape depends on the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x[x.sum(-1) > -100].nonzero()  # data-dependent
        return self.lin(self.drop(self.norm(x))) + keep.shape[0] * 0


def test_example_run_falls_back_to_a_real_run_that_changes_nothing(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="adapterkit.probe")
    model = nn.Sequential(DataDependent()).train()
    snap = snapshot(model)
    x = torch.randn(8, 4)
    torch.manual_seed(3)
    adapterkit.inject(model, ["0.lin"], CFG)
    expected_next = torch.rand(1)
    adapterkit.eject(model)
    torch.manual_seed(3)
    adapterkit.inject(model, ["0.lin"], CFG, example_inputs=x)
    assert torch.equal(torch.rand(1), expected_next)  # the run drew no random number
    assert "fake-tensor run failed" in caplog.text  # so it ran for real, dropout and all
    adapterkit.eject(model)
    assert_same(model, snap)  # BatchNorm statistics unchanged


def test_example_inputs_on_a_model_built_on_meta() -> None:
    with torch.device("meta"):
        model = ConvNet(2)
    adapterkit.inject(model, ["conv", "norm"], CFG, example_inputs=torch.randn(2, 3, 6, 6))
    adapter = adapterkit.adapters(model)["conv"]
    assert (adapter.d_model, adapter.feature_dim, adapter.up.weight.device.type) == (8, -3,
                                                                                    "meta")


# -- recurrent outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "message"), [
    (AdapterConfig(placement="parallel"), "use placement='sequential' there"),
    (AdapterConfig(output_key=(1, 0)), r"Adapting h_n or c_n alone \(output_key=\(1, 0\)\)"),
    (AdapterConfig(output_key=1), r"its adapter adapts the output sequence"),
])
def test_rnn_refuses_what_would_leave_sequence_and_state_apart(config, message) -> None:
    model = Recurrent("LSTM", "h_n")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        adapterkit.inject(model, ["rnn"], config)
    assert_same(model, snap)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_rnn_final_state_agrees_with_the_adapted_sequence(kind, bidirectional) -> None:
    for batch_first in (False, True):
        rnn = getattr(nn, kind)(5, 4, num_layers=2, bidirectional=bidirectional,
                                batch_first=batch_first)
        model = nonzero(adapterkit.inject(nn.Sequential(rnn), ["0"], CFG))
        x = torch.randn(3, 6, 5) if batch_first else torch.randn(6, 3, 5)
        out, state = rnn(x)
        h_n = state[0] if kind == "LSTM" else state
        steps = out if batch_first else out.transpose(0, 1)  # (N, L, D * H)
        torch.testing.assert_close(h_n[-1 - bidirectional], steps[:, -1, :4])
        if bidirectional:
            torch.testing.assert_close(h_n[-1], steps[:, 0, 4:])
        with adapterkit.disabled(model):
            base_out, base_state = rnn(x)
        base_h = base_state[0] if kind == "LSTM" else base_state
        assert torch.equal(h_n[0], base_h[0])  # the first layer's state is not an output
        assert not torch.allclose(h_n[-1], base_h[-1])
        if kind == "LSTM":
            assert torch.equal(state[1], base_state[1])  # c_n: the cell, not the output


def test_rnn_final_state_follows_packed_and_unbatched_sequences() -> None:
    rnn = nn.LSTM(5, 4, bidirectional=True, batch_first=True)
    nonzero(adapterkit.inject(nn.Sequential(rnn), ["0"], CFG))
    x = torch.randn(3, 6, 5)
    lengths = torch.tensor([6, 2, 4])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                               enforce_sorted=False)
    out, (h_n, _) = rnn(packed)
    padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(h_n[0, i], padded[i, n - 1, :4])
        torch.testing.assert_close(h_n[1, i], padded[i, 0, 4:])
    out, (h_n, _) = rnn(x[0])  # unbatched: (L, H_in)
    torch.testing.assert_close(h_n[0], out[-1, :4])
    torch.testing.assert_close(h_n[1], out[0, 4:])


# -- selection by any registered name ------------------------------------------------------------


def test_a_module_is_selected_by_any_of_its_names_and_wrapped_once(tmp_path) -> None:
    model = Twice()
    adapterkit.inject(model, ["alias"], CFG)
    assert list(adapterkit.adapters(model)) == ["block"]
    report = adapterkit.freeze(model, train=["adapters", "alias"])
    assert model.block.weight.requires_grad and not model.head.weight.requires_grad
    assert report.trainable == sum(p.numel() for p in model.block.parameters())
    path = adapterkit.save_adapters(model, tmp_path / "a", include=["alias"])
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["targets"] == ["block"] and meta["include"] == ["block"]
    both = adapterkit.inject(Twice(), ["alias", "block"], CFG)  # one module, two names
    assert list(adapterkit.adapters(both)) == ["block"]


# -- files ------------------------------------------------------------------------------------


def test_a_version_1_file_without_layouts_still_loads(tmp_path) -> None:
    torch.manual_seed(0)
    model = nonzero(adapterkit.inject(ConvNet(2).eval(), ["conv", "norm"], CFG))
    path = adapterkit.save_adapters(model, tmp_path / "a")
    config_file = path / "adapter_config.json"
    meta = json.loads(config_file.read_text())
    assert meta["layouts"] == {"conv": {"d_model": 8, "feature_dim": -3},
                               "norm": {"d_model": 8, "feature_dim": -3}}
    del meta["layouts"]
    meta["format_version"] = 1
    config_file.write_text(json.dumps(meta))
    torch.manual_seed(0)
    fresh = adapterkit.load_adapters(ConvNet(2).eval(), path)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(fresh(x), model(x))


def test_layouts_found_on_example_inputs_load_without_them(tmp_path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), nn.Linear(16, 2))

    x = torch.randn(2, 3, 4, 4)
    model = nonzero(adapterkit.inject(make(), ["re:0"], CFG, example_inputs=x))
    fresh = adapterkit.load_adapters(make(), adapterkit.save_adapters(model, tmp_path / "a"))
    assert torch.equal(fresh(x), model(x))


# -- BatchNorm statistics and save --------------------------------------------------------------


def _train_steps(model: nn.Module, x: torch.Tensor) -> None:
    adapterkit.freeze(model, train=["adapters"])
    opt = torch.optim.SGD(adapterkit.trainable_parameters(model), lr=0.1)
    for _ in range(2):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_save_refuses_adapters_trained_against_drifted_batchnorm_statistics(tmp_path) -> None:
    x = torch.randn(4, 6, 5, 5)
    model = adapterkit.inject(nn.Sequential(ResBlock(6)), ["0.conv2"], CFG).train()
    _train_steps(model, x)  # train mode: bn1 and bn2 update their running statistics
    with pytest.raises(ValueError, match=r"BatchNorm layers \['0.bn1', '0.bn2'\] updated their "
                                         r"running statistics .*include=\['0.bn1', '0.bn2'\]"):
        adapterkit.save_adapters(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    path = adapterkit.save_adapters(model, tmp_path / "a", include=["0.bn1", "0.bn2"])
    torch.manual_seed(0)
    fresh = nn.Sequential(ResBlock(6))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                           if "adapterkit" not in k and "bn" not in k}, strict=False)
    fresh = adapterkit.load_adapters(fresh, path).eval()
    assert torch.equal(fresh(x), model.eval()(x))


def test_batchnorm_in_eval_while_training_saves_adapters_alone(tmp_path) -> None:
    model = adapterkit.inject(nn.Sequential(ResBlock(6)), ["0.conv2"], CFG).eval()
    _train_steps(model, torch.randn(4, 6, 5, 5))
    assert (tmp_path / "a").name in adapterkit.save_adapters(model, tmp_path / "a").name


# -- FX mode and plan ------------------------------------------------------------------------------


def test_fx_mode_adapts_the_channels_of_a_conv_site() -> None:
    model = ConvNet(2).eval()
    x = torch.randn(2, 3, 5, 8)
    base = model(x)
    gm = adapterkit.inject(model, ["conv"], CFG, method="fx")
    adapter = adapterkit.adapters(gm)["conv"]
    assert (adapter.d_model, adapter.feature_dim) == (8, -3)
    assert torch.equal(gm(x), base)
    nonzero(gm)
    y = gm(x)
    torch.testing.assert_close(gm(torch.roll(x, 2, -1)), torch.roll(y, 2, -1))


def test_plan_shows_the_axis() -> None:
    rows = adapterkit.plan(ConvNet(2), ["conv", "norm", "out"], CFG).rows
    assert [(r.module, r.d_model, r.feature_dim) for r in rows] == [
        ("conv", 8, -3), ("norm", 8, -3), ("out", 4, -3)]
