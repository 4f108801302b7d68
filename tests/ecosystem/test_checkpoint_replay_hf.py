"""transformers' gradient checkpointing when the sets change before backward.

``gradient_checkpointing_enable()`` recomputes each layer during backward. A loss taken after a
``routed()`` block (as ``Trainer`` does when ``compute_loss`` wraps the model call) or after
switching sets must still give the gradients of the run without checkpointing.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import adapterkit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
t = pytest.importorskip("transformers", reason="needs the 'hf' extra: pip install -e '.[hf]'")

CONFIG = adapterkit.AdapterConfig(bottleneck=8, init="normal", init_std=0.1, dropout=0.0)
TOKENS = torch.randint(0, 60, (4, 8), generator=torch.Generator().manual_seed(2))
TASKS = ["a", "b", "b", "a"]


def gpt2(checkpointing: bool | None) -> nn.Module:
    torch.manual_seed(0)
    config = t.GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = t.GPT2LMHeadModel(config)
    for name in ["a", "b"]:
        adapterkit.inject(model, "auto", CONFIG, name=name)
    adapterkit.freeze(model, train=["adapters"])
    if checkpointing is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    return model.train()


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad for n, p in model.named_parameters() if ".adapterkit." in n}
    assert all(g is not None for g in grads.values())
    return grads


def routed_then_backward(model: nn.Module) -> dict[str, torch.Tensor]:
    adapterkit.set_active(model, "b")
    with adapterkit.routed(model, TASKS):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    return adapter_grads(model)


def two_sets_then_backward(model: nn.Module) -> dict[str, torch.Tensor]:
    adapterkit.set_active(model, "a")
    loss_a = model(input_ids=TOKENS, labels=TOKENS).loss
    adapterkit.set_active(model, "b")
    loss_b = model(input_ids=TOKENS.flip(0), labels=TOKENS.flip(0)).loss
    (loss_a + loss_b).backward()
    return adapter_grads(model)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("scenario", [routed_then_backward, two_sets_then_backward])
def test_gradient_checkpointing_gives_the_grads_of_the_plain_run(scenario, reentrant) -> None:
    expected = scenario(gpt2(None))
    got = scenario(gpt2(reentrant))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=name)


class MultiTask(t.Trainer):
    """Each example runs its own task's set: the model call wrapped in routed()."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        tasks = inputs.pop("task")
        with adapterkit.routed(model, tasks):
            outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def collate(rows: list[dict]) -> dict:
    return {"input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["input_ids"] for r in rows]),
            "task": [r["task"] for r in rows]}


def train_three_steps(tmp_path, checkpointing: bool | None) -> dict[str, torch.Tensor]:
    model = gpt2(None)
    g = torch.Generator().manual_seed(7)
    rows = [{"input_ids": torch.randint(1, 60, (8,), generator=g), "task": "ab"[i % 2]}
            for i in range(12)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames the kwargs
        args = t.TrainingArguments(
            str(tmp_path / str(checkpointing)), max_steps=3, per_device_train_batch_size=4,
            learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
            logging_strategy="no", save_strategy="no", remove_unused_columns=False,
            gradient_checkpointing=checkpointing is not None,
            gradient_checkpointing_kwargs=None if checkpointing is None else {
                "use_reentrant": checkpointing})
        MultiTask(model, args, train_dataset=rows, data_collator=collate).train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapterkit." in n}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_multi_task_trainer_with_checkpointing_trains_as_without(tmp_path, reentrant) -> None:
    expected = train_three_steps(tmp_path, None)
    got = train_three_steps(tmp_path, reentrant)
    changed = [n for n, p in expected.items() if ".a.up" in n or ".b.up" in n]
    assert changed
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-6, msg=name)
