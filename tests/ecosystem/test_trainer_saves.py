"""Trainer saves keep what trained beside the adapters (issue 20, item 2): the callback refuses
at the start a spec that trains modules its saves would not hold, and trainer.save_model()
after train() writes the set with the modules the callback saves it with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import adapterkit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HF_REASON = "Hugging Face models need the 'hf' extra: pip install -e '.[hf]'"
t = pytest.importorskip("transformers", reason=HF_REASON)
pytest.importorskip("accelerate", reason="Trainer needs accelerate (the 'hf' extra)")
from adapterkit.integrations.transformers import AdapterCheckpointCallback  # noqa: E402

BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=3)


def bert_cls():
    torch.manual_seed(0)
    return t.BertForSequenceClassification(t.BertConfig(**BERT)).eval()


def logits(model) -> torch.Tensor:
    ids = torch.randint(1, 60, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    return [{"input_ids": torch.randint(1, 60, (8,), generator=g),
             "labels": torch.tensor(i % 3)} for i in range(16)]


def trainer(output_dir: Path, callback: AdapterCheckpointCallback, max_steps: int = 4):
    model = adapterkit.inject(bert_cls(), "auto", adapterkit.AdapterConfig(bottleneck=8,
                                                                           dropout=0.0))
    adapterkit.freeze(model, train=["adapters", "classifier"])
    args = t.TrainingArguments(str(output_dir), max_steps=max_steps, save_steps=2,
                               per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                               use_cpu=True, disable_tqdm=True, seed=0, logging_strategy="no")
    tr = t.Trainer(model, args, train_dataset=dataset(), callbacks=[callback])
    tr.remove_callback(t.PrinterCallback)
    return tr


def saved_include(folder: Path) -> list[str]:
    meta = json.loads((folder / "adapterkit" / "default" / "adapter_config.json").read_text())
    return meta["include"]


def test_the_callback_refuses_at_train_begin_a_trained_head_its_saves_would_drop(tmp_path):
    tr = trainer(tmp_path / "run", AdapterCheckpointCallback())
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        tr.train()
    message = str(err.value)
    assert "AdapterCheckpointCallback" in message and "trains ['classifier']" in message
    assert "include=['classifier']" in message and "include=[]" in message, message
    assert tr.state.global_step == 0 and not list((tmp_path / "run").glob("checkpoint-*"))
    after = tr.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_callback_with_include_empty_saves_the_adapters_alone(tmp_path):
    tr = trainer(tmp_path / "run", AdapterCheckpointCallback(include=[]), max_steps=2)
    tr.train()
    assert saved_include(tmp_path / "run") == []


def test_save_model_after_train_gives_the_trained_logits_in_a_fresh_base(tmp_path):
    tr = trainer(tmp_path / "run", AdapterCheckpointCallback(include=["classifier"]))
    tr.train()
    tr.save_model()  # the usual last line: save_pretrained over the callback's end folder
    assert saved_include(tmp_path / "run") == ["classifier"]
    fresh = adapterkit.load_adapters(bert_cls(), tmp_path / "run")
    assert torch.equal(logits(fresh), logits(tr.model))
    # the includes the callback saves the set with are the set's: save_adapters uses them too
    path = adapterkit.save_adapters(tr.model, tmp_path / "alone")
    assert json.loads((path / "adapter_config.json").read_text())["include"] == ["classifier"]
