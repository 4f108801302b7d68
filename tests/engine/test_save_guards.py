"""save_adapters without include=: a module the freeze spec trains beside the adapters is never
dropped from the file without a word (issue 20, item 2)."""

from __future__ import annotations

import json

import pytest
import torch

import adapterkit
from tests.conftest import MLP, assert_same, snapshot

TRAINED = adapterkit.AdapterConfig(bottleneck=4, dropout=0.0, init="normal", init_std=0.3)


def adapted(seed: int = 0) -> MLP:
    model = MLP(seed=seed).eval()
    return adapterkit.inject(model, ["body.0", "body.2"], TRAINED)


def trained_head(model: MLP) -> MLP:
    """What a training run leaves: the head moved away from its initial weights."""
    with torch.no_grad():
        model.head.weight.add_(0.5)
    return model


# (train, freeze, the modules the refusal names; None: the adapters alone are the whole story)
CASES = [
    (["adapters", "head"], [], ["head"]),
    (["adapters", "head.bias"], [], ["head"]),  # a parameter: its module is what include takes
    (["adapters", "body"], [], ["body"]),  # the adapters inside body are the set's own
    (["adapters", "re:body\\.0", "inp"], [], ["inp", "body.0"]),  # in model order
    (["adapters", "re:body\\.[02]"], [], ["body.0", "body.2"]),  # the modules it names
    (["adapters", "head"], ["head"], None),  # frozen again: nothing trained outside
    (["adapters:default"], [], None),
    (["adapters"], ["adapters"], None),
]


@pytest.mark.parametrize("train, frozen, modules", CASES)
def test_save_without_include_refuses_exactly_when_the_spec_trains_modules_outside_the_file(
        tmp_path, train, frozen, modules):
    model = adapted()
    adapterkit.freeze(model, train=train, freeze=frozen)
    if modules is None:
        adapterkit.save_adapters(model, tmp_path / "a")
        return
    snap = snapshot(model)
    entries = [e for e in train if not e.startswith("adapters")]
    with pytest.raises(ValueError) as err:
        adapterkit.save_adapters(model, tmp_path / "a")
    message = str(err.value)
    assert f"trains {entries}" in message and f"modules {modules}" in message, message
    assert f"include={modules!r}" in message and "include=[]" in message, message
    assert not (tmp_path / "a").exists()  # refused before any file was written
    assert_same(model, snap)


def test_the_named_include_saves_the_trained_head_and_include_empty_the_adapters_alone(tmp_path):
    model = adapted()
    adapterkit.freeze(model, train=["adapters", "head"])
    trained_head(model)
    x = torch.randn(5, 8)
    # the fix the refusal names: the head travels with the set
    with_head = adapterkit.save_adapters(model, tmp_path / "with", include=["head"])
    fresh = adapterkit.load_adapters(MLP(seed=0).eval(), with_head)
    assert torch.equal(fresh(x), model(x))
    # the other fix: an explicit include=[] is a choice, and saves the adapters alone
    alone = adapterkit.save_adapters(model, tmp_path / "alone", include=[])
    meta = json.loads((alone / "adapter_config.json").read_text())
    assert meta["include"] == [] and meta["freeze"]["train"] == ["adapters", "head"]


def test_a_model_never_frozen_saves_its_adapters_alone_without_include(tmp_path):
    model = adapted()
    path = adapterkit.save_adapters(model, tmp_path / "a")
    assert json.loads((path / "adapter_config.json").read_text())["include"] == []


def test_a_spec_whose_entries_select_nothing_any_more_is_no_reason_to_refuse(tmp_path):
    model = adapted()
    adapterkit.inject(model, ["head"], TRAINED, name="b")
    adapterkit.freeze(model, train=["adapters", "adapters:b"], freeze=["adapters:b"])
    adapterkit.eject(model, "b")  # 'adapters:b' selects nothing now
    adapterkit.save_adapters(model, tmp_path / "a")


class Tied(torch.nn.Module):
    """An output layer whose weight is the embedding's (as GPT-2's lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 8)
        self.body = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.emb(x)))


def test_the_refusal_names_the_module_the_spec_named_when_its_weight_is_tied(tmp_path):
    model = adapterkit.inject(Tied().eval(), ["body"], TRAINED)
    adapterkit.freeze(model, train=["adapters", "out"])
    with pytest.raises(ValueError, match=r"trains \['out'\] \(modules \['out'\]\)"):
        adapterkit.save_adapters(model, tmp_path / "a")
    with torch.no_grad():
        model.out.weight.mul_(2.0)  # trained: the embedding moves with it
    path = adapterkit.save_adapters(model, tmp_path / "a", include=["out"])
    x = torch.randint(0, 10, (3, 4))
    assert torch.equal(adapterkit.load_adapters(Tied().eval(), path)(x), model(x))
