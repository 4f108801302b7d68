"""Reports as a REPL user sees them: ``freeze``'s echo and ``summary``'s table."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig, FreezeReport
from adapterkit.models.gpt import GPT
from tests.conftest import make_gpt


def docs_gpt(layers: int = 2) -> GPT:
    """docs/index.md's model."""
    torch.manual_seed(0)
    return GPT(vocab_size=256, d_model=64, max_length=32, num_heads=4, dff=128, dropout=0.1,
               N=layers)


def test_freeze_report_repr_is_one_short_line_of_counts() -> None:
    model = adapterkit.inject(docs_gpt(), ["mha_block", "ffn_block"])
    report = adapterkit.freeze(model, train=["adapters", "cls"])
    assert repr(report) == (
        "FreezeReport(froze=34 tensors, unfroze=0 tensors, trainable=49,920 of 135,296 "
        "(36.90%), spec=FreezeSpec(train=('adapters', 'cls'), freeze=()))")
    assert not any(name in repr(report) for name in report.frozen)
    # the fields are as they were: the names are still there for whoever asks
    assert [f.name for f in dataclasses.fields(FreezeReport)] == [
        "spec", "frozen", "unfrozen", "trainable", "total"]
    assert len(report.frozen) == 34 and "emb_layer.weight" in report.frozen


def test_freeze_report_repr_does_not_grow_with_the_model() -> None:
    small = adapterkit.inject(docs_gpt(1), ["mha_block", "ffn_block"])
    big = adapterkit.inject(docs_gpt(12), ["mha_block", "ffn_block"])
    lines = [repr(adapterkit.freeze(m, train=["adapters"])) for m in (small, big)]
    assert all("\n" not in line for line in lines)
    assert len(lines[1]) - len(lines[0]) <= 6  # a few more digits, not 12 blocks of names
    # unfreezing is counted too
    again = adapterkit.freeze(big, train=["adapters", "cls"])
    assert repr(again).startswith("FreezeReport(froze=0 tensors, unfroze=2 tensors, ")


def _one_set(model: nn.Module) -> nn.Module:
    adapterkit.inject(model, ["mha_block", "ffn_block"], AdapterConfig(bottleneck=4))
    adapterkit.freeze(model, train=["adapters", "cls"])
    return model


def _two_sets(model: nn.Module) -> nn.Module:
    adapterkit.inject(model, ["mha_block"], AdapterConfig(bottleneck=4), name="a")
    adapterkit.inject(model, ["mha_block", "ffn_block"], AdapterConfig(bottleneck=2), name="b")
    adapterkit.freeze(model, train=["adapters:a"])
    return model


def _fused(model: nn.Module) -> nn.Module:
    adapterkit.inject(model, ["ffn_block"], AdapterConfig(bottleneck=4), name="a")
    adapterkit.inject(model, ["ffn_block"], AdapterConfig(bottleneck=4), name="b")
    adapterkit.fuse(model, ["a", "b"], "f")
    adapterkit.set_active(model, "f")
    adapterkit.freeze(model, train=["adapters:f"])
    return model


def _tied(model: nn.Module) -> nn.Module:
    model.cls.weight = model.emb_layer.weight  # (vocab, d) both
    return _one_set(model)


def _fx(model: nn.Module) -> nn.Module:
    gm = adapterkit.inject(model, "residual", AdapterConfig(bottleneck=4), method="fx",
                           example_inputs=(torch.randint(0, 61, (2, 8)),))
    adapterkit.freeze(gm, train=["adapters"])
    return gm


@pytest.mark.parametrize("adapt", [_one_set, _two_sets, _fused, _tied, _fx, lambda m: m],
                         ids=["one set", "two sets", "fusion", "tied", "fx", "no adapters"])
def test_summary_rows_add_up_to_the_totals(adapt: Callable[[nn.Module], nn.Module]) -> None:
    model = adapt(make_gpt())
    s = adapterkit.summary(model)
    params = list(model.parameters())  # each parameter once
    assert s.total == sum(p.numel() for p in params)
    assert s.trainable == sum(p.numel() for p in params if p.requires_grad)
    assert sum(n for _, _, n in s.rows) == s.total
    assert sum(t for _, t, _ in s.rows) == s.trainable
    # the table says what the module rows count, when there are adapters to leave out
    note = "the module rows leave out the adapters inside them"
    assert (note in str(s)) == bool(adapterkit.adapters(model))
    assert str(s).splitlines()[-1] == f"Total params: {s.total}"


def test_summary_module_rows_count_the_base_alone() -> None:
    model = make_gpt()
    base = {name: sum(p.numel() for p in child.parameters())
            for name, child in model.named_children()}
    s = adapterkit.summary(_one_set(model))
    rows = {g: (t, n) for g, t, n in s.rows}
    assert rows["decoder_blocks"] == (0, base["decoder_blocks"])
    n_adapters = sum(p.numel() for a in adapterkit.adapters(model).values()
                     for p in a.parameters())
    assert rows["adapters[default]"] == (n_adapters, n_adapters)
    assert rows["cls"] == (base["cls"], base["cls"])
