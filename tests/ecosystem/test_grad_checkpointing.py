"""Gradient checkpointing: adapters get the gradients they get without it, or an error.

A reentrant ``torch.utils.checkpoint`` whose inputs do not require grad gives nothing inside
it a gradient; with a frozen embedding below, that is every adapter. adapterkit's ``freeze``
makes a transformers model's input embeddings require grad while checkpointing is on (ViT's
``pixel_values`` path needs it: transformers does it itself only for ``input_ids`` models);
elsewhere the first training forward raises, naming the fix.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import NoGradientError
from tests.conftest import Checkpointed, make_gpt
from tests.conftest import minilm as minilm_copy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HF_REASON = "Hugging Face models need the 'hf' extra: pip install -e '.[hf]'"
CONFIG = adapterkit.AdapterConfig(bottleneck=8, dropout=0.0, init="normal", init_std=0.1)


def grads(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss(model).backward()
    found = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert found and all(g is not None for g in found.values()), "a trainable got no grad"
    return {n: g.clone() for n, g in found.items()}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(".adapterkit." in n for n in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


# -- the reference GPT, blocks wrapped in torch.utils.checkpoint by the user ------------------


def gpt(reentrant: bool | None, train: list[str]) -> nn.Module:
    model = make_gpt()
    if reentrant is not None:
        model.decoder_blocks = nn.ModuleList(Checkpointed(b, reentrant)
                                             for b in model.decoder_blocks)
    torch.manual_seed(1)
    adapterkit.inject(model, ["mha_block", "ffn_block"], CONFIG)
    adapterkit.freeze(model, train=train)
    return model.train()


def gpt_loss(tokens: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    return lambda model: model(tokens).logsumexp(-1).mean()


def _renamed(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n.replace(".block.", "."): v for n, v in g.items()}


@pytest.mark.parametrize("train", [["adapters", "cls"], ["adapters", "emb_layer"]])
def test_non_reentrant_checkpoint_gives_the_same_adapter_grads(tokens, train):
    expected = grads(gpt(None, train), gpt_loss(tokens))
    assert_same_grads(_renamed(grads(gpt(False, train), gpt_loss(tokens))), expected)


def test_reentrant_checkpoint_with_a_trainable_input_gives_the_same_grads(tokens):
    train = ["adapters", "emb_layer"]  # the blocks' input requires grad
    expected = grads(gpt(None, train), gpt_loss(tokens))
    assert_same_grads(_renamed(grads(gpt(True, train), gpt_loss(tokens))), expected)


def test_reentrant_checkpoint_over_a_frozen_embedding_raises_naming_the_fix(tokens):
    model = gpt(True, ["adapters", "cls"])  # the head would learn, the adapters never
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own "None of the inputs..."
        with pytest.raises(NoGradientError, match=r"use_reentrant=True\) whose inputs do not "
                           r"require grad.*Use use_reentrant=False"):
            model(tokens)
        with torch.no_grad():  # nothing here tells the checkpoint from a training step
            with pytest.raises(NoGradientError, match=r"call model.eval\(\) first"):
                model(tokens)
        model.eval()(tokens)  # evaluation is fine
    plain = gpt(None, ["adapters", "cls"])
    with torch.no_grad():
        plain(tokens)  # a no_grad forward in train mode, outside a checkpoint, is fine


def test_reentrant_checkpoint_with_the_documented_hook_gives_the_same_grads(tokens):
    expected = grads(gpt(None, ["adapters", "cls"]), gpt_loss(tokens))
    model = gpt(True, ["adapters", "cls"])
    model.emb_layer.register_forward_hook(lambda m, args, out: out.requires_grad_())
    assert_same_grads(_renamed(grads(model, gpt_loss(tokens))), expected)


# -- transformers models: gradient_checkpointing_enable ----------------------------------------


def hf():
    return pytest.importorskip("transformers", reason=HF_REASON)


def _text_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(3, vocab, (2, 9), generator=g), "attention_mask": mask}


def gpt2():
    t = hf()
    config = t.GPT2Config(vocab_size=80, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    batch = _text_batch(80)
    return t.GPT2LMHeadModel(config), ["adapters"], lambda m: m(**batch,
                                                                   labels=batch["input_ids"]).loss


def bert():
    t = hf()
    config = t.BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, num_labels=3)
    batch = _text_batch(80)
    labels = torch.tensor([0, 2])
    return (t.BertForSequenceClassification(config), ["adapters", "classifier"],
            lambda m: m(**batch, labels=labels).loss)


def vit():
    t = hf()
    config = t.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_labels=3)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 2])
    return (t.ViTForImageClassification(config), ["adapters", "classifier"],
            lambda m: m(pixel_values=pixels, labels=labels).loss)


def minilm():
    hf()
    model = minilm_copy(dropout=False)  # trained in train mode: dropout off, as the others
    batch = _text_batch(1000)
    return model, ["adapters"], lambda m: m(**batch).last_hidden_state.pow(2).mean()


def _adapted(build: Callable, enable: bool | None, freeze_first: bool):
    torch.manual_seed(0)
    model, train, loss = build()
    torch.manual_seed(1)
    adapterkit.inject(model, "auto", CONFIG)
    if freeze_first:
        adapterkit.freeze(model, train=train)
    if enable is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated alias in transformers 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": enable})
    if not freeze_first:
        adapterkit.freeze(model, train=train)
    return model.train(), loss


@pytest.mark.parametrize("build", [gpt2, bert, vit, pytest.param(minilm, id="minilm")])
@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_gradient_checkpointing_gives_the_same_adapter_grads(build, reentrant):
    model, loss = _adapted(build, None, True)
    expected = grads(model, loss)
    model, loss = _adapted(build, reentrant, True)
    assert_same_grads(grads(model, loss), expected)


def test_vit_checkpointing_enabled_before_freeze_gives_the_same_grads():
    model, loss = _adapted(vit, None, True)
    expected = grads(model, loss)
    model, loss = _adapted(vit, True, False)
    assert_same_grads(grads(model, loss), expected)


def test_vit_without_adapterkits_input_hook_would_train_nothing_and_raises():
    from adapterkit import freezing

    model, loss = _adapted(vit, True, True)
    freezing.require_input_grads(model, False)  # what transformers alone does for ViT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(NoGradientError, match="use_reentrant=True"):
            loss(model)
    with torch.no_grad():
        loss(model)  # transformers' layers skip the checkpoint without gradients: no error


def test_input_hook_only_acts_while_checkpointing_and_goes_with_the_adapters():
    from adapterkit.freezing import RequireGradWhileCheckpointing

    model, loss = _adapted(vit, None, True)
    embedding = model.get_input_embeddings()
    hooks = [h for h in embedding._forward_hooks.values()
             if isinstance(h, RequireGradWhileCheckpointing)]
    assert len(hooks) == 1
    out = embedding(torch.randn(1, 3, 16, 16))
    assert not out.requires_grad  # checkpointing off: the graph is what it was
    clone = copy.deepcopy(model)
    adapterkit.eject(model)
    assert not any(isinstance(h, RequireGradWhileCheckpointing)
                   for m in model.modules() for h in m._forward_hooks.values())
    assert any(isinstance(h, RequireGradWhileCheckpointing)
               for m in clone.modules() for h in m._forward_hooks.values())
