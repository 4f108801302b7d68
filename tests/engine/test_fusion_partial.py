"""A fusion sits at every module its sets wrap, or it is refused: at fuse and at load alike.

While a fusion is active its sets run only inside it; at a module that held some of them and no
fusion, none ran, without a word (9.4e-4 from the mean of the sets at creation on a tiny GPT).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import assert_same, make_gpt, snapshot

CFG = AdapterConfig(bottleneck=8, init="normal", init_std=0.3, dropout=0.0)
BOTH, FFN = ["mha_block", "ffn_block"], ["ffn_block"]
ATTENTION = "'decoder_blocks.0.mha_block', 'decoder_blocks.1.mha_block'"


def with_sets(model: nn.Module, **targets: list[str]) -> nn.Module:
    torch.manual_seed(1)
    for name, where in targets.items():
        adapterkit.inject(model, where, CFG, name=name)
    return model.eval()


def refused_and_unchanged(model: nn.Module, tokens: torch.Tensor, call, match: str) -> None:
    adapterkit.set_active(model, ["a"])
    before, out = snapshot(model), model(tokens)
    with pytest.raises(ValueError, match=match):
        call()
    assert_same(model, before)
    assert adapterkit.active(model) == ["a"]
    assert sorted(adapterkit.tree.set_names(model)) == ["a", "b"]
    assert torch.equal(model(tokens), out)


def test_fuse_refuses_sets_that_wrap_different_modules(tokens: torch.Tensor) -> None:
    model = with_sets(make_gpt(), a=BOTH, b=FFN)
    refused_and_unchanged(
        model, tokens, lambda: adapterkit.fuse(model, ["a", "b"], name="f"),
        rf"fusion 'f' of \['a', 'b'\] would not sit at every module its sets wrap: {ATTENTION} "
        r"hold only \['a'\]\. While 'f' is active its sets run only inside it, so there they "
        r"would silently not run\. A fusion needs its sets on the same modules: fuse sets "
        r"injected on the same targets \(load a fusion file into a model holding the sets it "
        r"was made with\), or combine these with average\(\{\.\.\.\}\), which adds each set "
        r"where it is")


def test_many_modules_are_named_with_a_count() -> None:
    model = with_sets(make_gpt(layers=5), a=BOTH, b=FFN)
    with pytest.raises(ValueError, match=r"'decoder_blocks\.0\.mha_block', 'decoder_blocks\.1"
                                         r"\.mha_block', 'decoder_blocks\.2\.mha_block' and 2 "
                                         r"more hold only \['a'\]"):
        adapterkit.fuse(model, ["a", "b"], name="f")


def test_sets_on_the_same_subset_of_modules_fuse_into_their_mean(tokens) -> None:
    """Both sets on the FFN only: the fusion sits at every module either wraps, and starts as
    the mean of the two sets' outputs, module by module."""
    model = with_sets(make_gpt(), a=FFN, b=FFN)
    adapterkit.fuse(model, ["a", "b"], name="f")
    assert sorted(adapterkit.adapters(model, "f")) == [
        "decoder_blocks.0.ffn_block", "decoder_blocks.1.ffn_block"]
    adapterkit.set_active(model, "f")
    fused = model(tokens)
    adapterkit.set_active(model, adapterkit.average({"a": 0.5, "b": 0.5}))
    torch.testing.assert_close(fused, model(tokens), rtol=1e-5, atol=1e-6)
    ffn = model.decoder_blocks[0].ffn_block
    h = torch.randn(2, 5, 32)
    outputs = []
    for name in ["a", "b"]:  # the sets one by one, at one module
        adapterkit.set_active(model, name)
        outputs.append(ffn(h))
    adapterkit.set_active(model, "f")
    torch.testing.assert_close(ffn(h), (outputs[0] + outputs[1]) / 2, rtol=1e-5, atol=1e-6)


@pytest.fixture
def saved(tmp_path):
    """Sets a and b on the FFN only, and their fusion, saved."""
    model = with_sets(make_gpt(), a=FFN, b=FFN)
    adapterkit.fuse(model, ["a", "b"], name="f")
    for name in ["a", "b", "f"]:
        adapterkit.save_adapters(model, tmp_path / name, name)
    return tmp_path


@pytest.mark.parametrize(("b_targets", "match"), [
    (FFN, rf"{ATTENTION} hold only \['a'\]\. While 'f' is active"),
    (BOTH, rf"{ATTENTION} hold all of them, but the fusion has no weights there\. While 'f'"),
], ids=["a wraps more modules than b", "both wrap more modules than the fusion file"])
def test_loading_a_fusion_refuses_what_fuse_refuses(saved, tokens, b_targets, match) -> None:
    """The fusion file sits on the FFN; in this model set a (and b) also wrap attention."""
    model = with_sets(make_gpt(), a=BOTH, b=b_targets)
    refused_and_unchanged(model, tokens,
                          lambda: adapterkit.load_adapters(model, saved / "f"), match)


def test_loading_a_fusion_where_its_sets_wrap_the_same_modules(saved, tokens) -> None:
    model = adapterkit.load_adapters(adapterkit.load_adapters(make_gpt().eval(), saved / "a"),
                                     saved / "b")
    adapterkit.load_adapters(model, saved / "f")
    assert sorted(adapterkit.adapters(model, "f")) == [
        "decoder_blocks.0.ffn_block", "decoder_blocks.1.ffn_block"]
