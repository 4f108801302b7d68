"""Gradient checkpointing when the sets change between the forward and the backward.

The recompute of a checkpointed block must run what the forward ran: the sets active then, or
the route of a ``routed()`` block already left. Adapter gradients equal the run without
checkpointing, for ``torch.utils.checkpoint`` reentrant or not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AdapterConfig
from tests.conftest import Checkpointed, make_gpt

CONFIG = AdapterConfig(bottleneck=8, init="normal", init_std=0.1, dropout=0.0)
TOKENS = torch.randint(0, 61, (4, 8), generator=torch.Generator().manual_seed(3))


def adapted(reentrant: bool | None) -> nn.Module:
    model = make_gpt()
    for name in ["a", "b"]:
        adapterkit.inject(model, ["mha_block", "ffn_block"], CONFIG, name=name)
    adapterkit.freeze(model, train=["adapters"])
    if reentrant is not None:
        # a frozen embedding gives a reentrant checkpoint inputs that need no grad
        model.emb_layer.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        for i, block in enumerate(model.decoder_blocks):
            model.decoder_blocks[i] = Checkpointed(block, reentrant)
    return model


def adapter_grads(model: nn.Module, sets: tuple[str, ...] = ("a", "b")) -> dict[str, torch.Tensor]:
    grads = {n.replace(".block.", "."): p.grad for n, p in model.named_parameters()
             if any(f".adapterkit.{s}." in n for s in sets)}
    assert all(g is not None for g in grads.values())  # both sets got a gradient
    return grads


def two_sets_then_backward(model: nn.Module) -> dict[str, torch.Tensor]:
    adapterkit.set_active(model, "a")
    loss_a = model(TOKENS).square().mean()
    adapterkit.set_active(model, "b")
    loss_b = model(TOKENS).pow(3).mean()
    (loss_a + loss_b).backward()
    return adapter_grads(model)


def routed_then_backward(model: nn.Module) -> dict[str, torch.Tensor]:
    adapterkit.set_active(model, "a")  # another set active outside the block
    with adapterkit.routed(model, ["b", ["a", "b"], None, "b"]):
        out = model(TOKENS)
    out.square().mean().backward()  # after the block, as Trainer.compute_loss does
    return adapter_grads(model)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("scenario", [two_sets_then_backward, routed_then_backward])
def test_recompute_runs_what_the_forward_ran(scenario, reentrant: bool) -> None:
    expected = scenario(adapted(None))
    got = scenario(adapted(reentrant))
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_a_backward_repeated_with_retain_graph_replays_again(reentrant: bool) -> None:
    runs = []
    for checkpointing in (None, reentrant):
        model = adapted(checkpointing)
        with adapterkit.routed(model, ["a", "b", "b", "a"]):
            loss = model(TOKENS).square().mean()
        adapterkit.set_active(model, [])
        loss.backward(retain_graph=True)
        loss.backward()  # a second recompute of every block
        runs.append(adapter_grads(model))
    for name, grad in runs[0].items():
        torch.testing.assert_close(runs[1][name], grad, rtol=0, atol=1e-6, msg=name)


def test_a_set_injected_after_the_forward_is_not_run_by_the_recompute() -> None:
    model = adapted(False)
    adapterkit.set_active(model, "a")
    loss = model(TOKENS).square().mean()
    adapterkit.inject(model, ["mha_block"], CONFIG, name="late")  # active from now on
    loss.backward()
    late = [p.grad for n, p in model.named_parameters() if ".late." in n]
    assert late and all(g is None for g in late)
    reference = adapted(None)
    adapterkit.set_active(reference, "a")
    reference(TOKENS).square().mean().backward()
    expected, got = adapter_grads(reference, ("a",)), adapter_grads(model, ("a",))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=name)
