"""Declarative freezing and the summary report."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import adapterkit
from adapterkit import AdapterConfig, FreezeSpec
from tests.conftest import assert_same, snapshot


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_train_adapters_and_cls_with_an_exception(gpt):
    adapterkit.inject(gpt, ["mha_block", "ffn_block"], AdapterConfig(bottleneck=4))
    report = adapterkit.freeze(gpt, train=["adapters", "cls"], freeze=["cls.bias"])
    names = trainable_names(gpt)
    assert "cls.weight" in names and "cls.bias" not in names
    assert {n for n in names if n != "cls.weight"} == {
        n for n in dict(gpt.named_parameters()) if ".adapterkit." in n
    }
    assert report.trainable == sum(p.numel() for p in adapterkit.trainable_parameters(gpt))
    assert "cls.bias" in report.frozen and not report.unfrozen
    assert "trainable after" in str(report)


def test_spec_from_json_equals_keywords(gpt):
    adapterkit.inject(gpt, ["ffn_block"], name="a")
    adapterkit.inject(gpt, ["mha_block"], name="b")
    spec = json.loads('{"train": ["adapters:b", "layernorm1", "bias"],'
                      ' "freeze": ["cls", "adapters:a"]}')
    adapterkit.freeze(gpt, spec)
    names = trainable_names(gpt)
    assert all(".adapterkit.a." not in n for n in names)
    assert any(".mha_block.adapterkit.b." in n for n in names)
    assert "decoder_blocks.1.layernorm1.weight" in names
    assert "decoder_blocks.0.ffn_block.fc1.bias" in names  # "bias" matches parameter names
    assert not any(n.startswith("cls.") for n in names)
    same = adapterkit.freeze(gpt, FreezeSpec(train=spec["train"], freeze=spec["freeze"]))
    assert not same.frozen and not same.unfrozen


def test_frozen_parameters_lose_their_gradients(gpt, tokens):
    gpt(tokens).sum().backward()
    adapterkit.inject(gpt, ["mha_block"])
    adapterkit.freeze(gpt, train=["adapters"])
    assert all(p.grad is None for p in gpt.parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train": ["adapters", "clss"]}, "no module or parameter matches 'clss'; closest: cls"),
        ({"train": ["adapters:zzz"]}, "'adapters:zzz': no adapter set named 'zzz'"),
        ({"train": ["adapters"], "freeze": ["nothing_here"]}, "matches 'nothing_here'"),
        ({"train": [3]}, "list of strings"),
    ],
)
def test_entries_that_select_nothing_are_errors_and_change_nothing(gpt, kwargs, message):
    adapterkit.inject(gpt, ["mha_block"])
    snap = snapshot(gpt)
    with pytest.raises(ValueError, match=message):
        adapterkit.freeze(gpt, **kwargs)
    assert_same(gpt, snap)


def test_adapters_entry_without_adapters_is_an_error(gpt):
    with pytest.raises(ValueError, match="the model has no adapters yet"):
        adapterkit.freeze(gpt, train=["adapters"])


def test_summary_groups_and_counts(gpt):
    adapterkit.inject(gpt, ["mha_block"], AdapterConfig(bottleneck=4), name="a")
    adapterkit.inject(gpt, ["ffn_block"], AdapterConfig(bottleneck=2), name="b")
    adapterkit.freeze(gpt, train=["adapters:a"])
    s = adapterkit.summary(gpt)
    per_adapter = {4: 2 * 32 * 4 + 4 + 32, 2: 2 * 32 * 2 + 2 + 32}
    rows = {group: (t, n) for group, t, n in s.rows}
    assert rows["adapters[a]"] == (2 * per_adapter[4], 2 * per_adapter[4])
    assert rows["adapters[b]"] == (0, 2 * per_adapter[2])
    assert rows["cls"] == (0, 32 * 61 + 61)
    assert s.trainable == 2 * per_adapter[4]
    assert s.total == sum(p.numel() for p in gpt.parameters())
    assert str(s).splitlines()[-1] == f"Total params: {s.total}"


def test_summary_counts_tied_parameters_once():
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(10, 4)
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = model.emb.weight
    s = adapterkit.summary(model)
    assert s.total == 40 and [r[0] for r in s.rows] == ["emb"]


def test_a_string_is_one_entry_not_its_characters(gpt):
    adapterkit.inject(gpt, ["mha_block"], AdapterConfig(bottleneck=4))
    report = adapterkit.freeze(gpt, train="adapters")
    assert report.spec.train == ("adapters",)
    assert trainable_names(gpt) == {n for n in dict(gpt.named_parameters()) if ".adapterkit." in n}
    report = adapterkit.freeze(gpt, train=["adapters", "cls"], freeze="cls.bias")
    assert report.spec.freeze == ("cls.bias",)
    assert "cls.weight" in trainable_names(gpt) and "cls.bias" not in trainable_names(gpt)


def test_training_an_inactive_set_warns_naming_it_and_the_ddp_error(gpt):
    adapterkit.inject(gpt, ["mha_block"], AdapterConfig(bottleneck=4), name="a")
    adapterkit.inject(gpt, ["ffn_block"], AdapterConfig(bottleneck=4), name="b")
    adapterkit.set_active(gpt, ["a"])
    with pytest.warns(UserWarning, match=r"adapter set\(s\) \['b'\] trainable .* not active "
                      r"\(active: \['a'\]\).*'Expected to have finished reduction in the prior "
                      r"iteration'.*train=\['adapters:a'\]"):
        adapterkit.freeze(gpt, train=["adapters"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the active set alone: no warning
        adapterkit.freeze(gpt, train=["adapters:a"])
        adapterkit.set_active(gpt, ["a", "b"])
        adapterkit.freeze(gpt, train=["adapters"])
