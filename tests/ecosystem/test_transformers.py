"""transformers: Trainer checkpoints and resume, save_pretrained / from_pretrained, generate,
init_weights, and big models built on meta. Tiny models from configs, and MiniLM (real)."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit
from adapterkit import UninitialisedAdapterError
from tests.conftest import minilm, minilm_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HF_REASON = "Hugging Face models need the 'hf' extra: pip install -e '.[hf]'"
t = pytest.importorskip("transformers", reason=HF_REASON)
pytest.importorskip("accelerate", reason="Trainer needs accelerate (the 'hf' extra)")
from adapterkit.integrations.transformers import AdapterCheckpointCallback  # noqa: E402

TRAINED = adapterkit.AdapterConfig(bottleneck=8, dropout=0.0, init="normal", init_std=0.2)
BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=3)


def bert_cls(seed: int = 0):
    torch.manual_seed(seed)
    return t.BertForSequenceClassification(t.BertConfig(**BERT)).eval()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[2, 5:] = 0
    return {"input_ids": torch.randint(1, 60, (3, 8), generator=g), "attention_mask": mask}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapterkit." in k}


# -- save_pretrained / from_pretrained ----------------------------------------------------------


def test_save_pretrained_then_from_pretrained_and_load_adapters_is_the_trained_model(tmp_path):
    model = bert_cls()
    adapterkit.inject(model, "auto", TRAINED, name="a")
    adapterkit.inject(model, "auto:ffn", TRAINED, name="b")
    adapterkit.set_active(model, ["a"])  # b saved, but not active
    with torch.no_grad():
        model.classifier.weight.mul_(3)  # a trained head: a base weight, in model.safetensors
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "adapterkit").iterdir()) == ["a", "b", "sets.json"]

    base = t.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with adapterkit.disabled(model):
        assert torch.equal(logits(base), logits(model))  # alone, from_pretrained is the base
    loaded = adapterkit.load_adapters(base, tmp_path)
    assert adapterkit.active(loaded) == ["a"]
    assert sorted(adapterkit.adapters(loaded, "b")) == sorted(adapterkit.adapters(model, "b"))
    assert torch.equal(logits(loaded), logits(model))


def test_adapter_files_are_not_taken_for_a_peft_adapter(tmp_path):
    from transformers.utils.peft_utils import find_adapter_config_file

    model = adapterkit.inject(bert_cls(), "auto", TRAINED)
    model.save_pretrained(tmp_path)
    assert find_adapter_config_file(str(tmp_path)) is None  # transformers' own PEFT check
    # a save_adapters directory at the top level would be taken for one (and, with peft
    # installed, from_pretrained fails on it): save_adapters refuses to write there
    with pytest.raises(FileExistsError, match="holds other files"):
        adapterkit.save_adapters(model, tmp_path)


def test_save_pretrained_drops_sets_the_model_no_longer_holds(tmp_path):
    model = bert_cls()
    adapterkit.inject(model, "auto", TRAINED, name="a")
    adapterkit.inject(model, "auto:ffn", TRAINED, name="b")
    model.save_pretrained(tmp_path)
    adapterkit.eject(model, "b")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in (tmp_path / "adapterkit").iterdir()) == ["a", "sets.json"]
    loaded = adapterkit.load_adapters(t.BertForSequenceClassification.from_pretrained(tmp_path),
                                      tmp_path)
    assert adapterkit.active(loaded) == ["a"]


def test_eject_restores_save_pretrained_and_copies_save_their_own_adapters(tmp_path):
    model = adapterkit.inject(bert_cls(), "auto", TRAINED)
    assert "save_pretrained" in vars(model)
    clone = copy.deepcopy(model)
    assert clone.save_pretrained.model is clone
    adapterkit.eject(model)
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base" / "adapterkit").exists()
    clone.save_pretrained(tmp_path / "clone")
    loaded = adapterkit.load_adapters(
        t.BertForSequenceClassification.from_pretrained(tmp_path / "clone"), tmp_path / "clone")
    assert torch.equal(logits(loaded), logits(clone))


def test_merge_then_unmerge_then_save_pretrained_keeps_the_adapters(tmp_path):
    """unmerge puts the set back with its save_pretrained hook: the folder holds the set."""
    model = bert_cls()
    mergeable = adapterkit.AdapterConfig(activation="identity", init="normal", init_std=0.3,
                                         dropout=0.0)
    adapterkit.inject(model, "auto", mergeable, name="a")
    model.eval()
    merged = adapterkit.merge(model, "a")
    adapterkit.unmerge(model, merged)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapterkit" / "sets.json").is_file()
    fresh = adapterkit.load_adapters(t.BertForSequenceClassification.from_pretrained(tmp_path),
                                     tmp_path)
    assert adapterkit.active(fresh) == ["a"]
    torch.testing.assert_close(logits(fresh.eval()), logits(model), atol=0, rtol=0)


def test_a_failing_multi_set_load_leaves_the_model_as_it_was(tmp_path):
    model = bert_cls()
    adapterkit.inject(model, "auto", TRAINED, name="a")
    adapterkit.inject(model, "auto:ffn", TRAINED, name="b")
    model.save_pretrained(tmp_path)
    (tmp_path / "adapterkit" / "b" / "adapter_model.safetensors").write_bytes(b"not tensors")
    fresh = bert_cls()
    before = fresh.state_dict()
    with pytest.raises(adapterkit.AdapterFileError, match="not a valid safetensors"):
        adapterkit.load_adapters(fresh, tmp_path)
    assert adapterkit.adapters(fresh) == {}
    assert list(fresh.state_dict()) == list(before)
    with pytest.raises(ValueError, match="name= renames a single set"):
        adapterkit.load_adapters(fresh, tmp_path, name="c")


# -- Trainer ------------------------------------------------------------------------------------


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    return [{"input_ids": torch.randint(1, 60, (8,), generator=g),
             "labels": torch.tensor(i % 3)} for i in range(16)]


def trainer(output_dir: Path, model=None, include=("classifier",), **overrides):
    if model is None:
        model = adapterkit.inject(bert_cls(), "auto", adapterkit.AdapterConfig(bottleneck=8,
                                                                               dropout=0.0))
        adapterkit.freeze(model, train=["adapters", "classifier"])
    settings = dict(max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                    report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_strategy="no")
    args = t.TrainingArguments(str(output_dir), **{**settings, **overrides})
    tr = t.Trainer(model, args, train_dataset=dataset(),
                   callbacks=[AdapterCheckpointCallback(include=include)])
    tr.remove_callback(t.PrinterCallback)
    return tr


def trained_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if ".adapterkit." in k or k.startswith("classifier.")}


def test_trainer_checkpoints_hold_the_adapters_and_a_resume_equals_the_uninterrupted_run(
        tmp_path):
    full = trainer(tmp_path / "full")
    full.train()
    expected = trained_state(full.model)
    # every checkpoint and the end hold the adapters, with the classifier saved beside them
    for folder in ("checkpoint-2", "checkpoint-4", "."):
        meta = json.loads((tmp_path / "full" / folder / "adapterkit" / "default" /
                           "adapter_config.json").read_text())
        assert meta["include"] == ["classifier"]
    # the end folder loads into a fresh model: the trained model
    fresh = adapterkit.load_adapters(bert_cls(), tmp_path / "full")
    assert torch.equal(logits(fresh), logits(full.model.eval()))

    # resume from checkpoint-2, whose model weights we strip of every adapter key: the
    # callback restores the adapters from the checkpoint's adapterkit/ folder
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    weights = tmp_path / "resumed" / "checkpoint-2" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".adapterkit." not in k},
              weights, metadata={"format": "pt"})
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    got = trained_state(resumed.model)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=k)


def test_resume_never_loads_another_runs_checkpoint_of_the_same_step(tmp_path):
    full = trainer(tmp_path / "a")
    full.train()
    expected = trained_state(full.model)
    other = trainer(tmp_path / "b", learning_rate=3e-2, max_steps=2)
    other.train()  # another run, with its own checkpoint-2
    # resume run a's checkpoint-2 with output_dir b: the callback finds b/checkpoint-2, whose
    # run id is not the one the Trainer restored, and leaves it alone
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    got = trained_state(resumed.model)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=k)


def test_trainer_refuses_a_model_without_the_set_it_saves(tmp_path):
    with pytest.raises(ValueError, match=r"\(or load_adapters\) before creating the Trainer"):
        trainer(tmp_path, model=bert_cls()).train()
    with pytest.raises(ValueError, match="no module matches 'classifer'; closest: classifier"):
        trainer(tmp_path, include=["classifer"]).train()  # at the start, not at the first save


def test_trainer_save_model_writes_a_folder_from_pretrained_and_load_adapters_restore(tmp_path):
    tr = trainer(tmp_path / "run", max_steps=1)
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    loaded = adapterkit.load_adapters(
        t.BertForSequenceClassification.from_pretrained(tmp_path / "final"), tmp_path / "final")
    assert torch.equal(logits(loaded), logits(tr.model.eval()))


# -- generate -----------------------------------------------------------------------------------


def test_generate_with_adapters_survives_save_pretrained(tmp_path):
    torch.manual_seed(0)
    config = t.GPT2Config(vocab_size=70, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    model = adapterkit.inject(t.GPT2LMHeadModel(config).eval(), "auto", TRAINED)
    prompt = torch.randint(1, 70, (2, 5), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=6, do_sample=False)
    out = model.generate(prompt, **kwargs)
    with adapterkit.disabled(model):
        base_out = model.generate(prompt, **kwargs)
    assert not torch.equal(out, base_out)  # the adapters change what is generated
    model.save_pretrained(tmp_path)
    reloaded = t.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.generate(prompt, **kwargs), base_out)  # forgot load_adapters
    adapterkit.load_adapters(reloaded, tmp_path)
    assert torch.equal(reloaded.generate(prompt, **kwargs), out)


# -- init_weights and big models on meta --------------------------------------------------------


def test_hf_init_weights_after_inject_leaves_adapters_alone():
    model = adapterkit.inject(bert_cls(), "auto", TRAINED)
    model.extra = torch.nn.Linear(4, 4)  # control: a new module without adapterkit's flag
    extra = model.extra.weight.clone()
    before = adapter_state(model)
    model.init_weights()
    assert not torch.equal(model.extra.weight, extra)  # init_weights does reach new modules
    after = adapter_state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def meta_bert():
    with torch.device("meta"):
        model = t.BertModel(t.BertConfig(**BERT))
    return model


def base_bert():
    torch.manual_seed(0)
    return t.BertModel(t.BertConfig(**BERT)).eval()


def hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).last_hidden_state


def materialized(model):
    """The documented meta flow for a transformers model, up to the adapters: memory, then
    transformers' own init (buffers such as position_ids are in no checkpoint; the adapters
    are left alone), then the base weights."""
    model.to_empty(device="cpu")
    model.init_weights()
    report = model.load_state_dict(base_bert().state_dict(), strict=False)
    assert report.unexpected_keys == [] and all(".adapterkit." in k for k in report.missing_keys)
    return model.eval()


def test_meta_to_empty_load_base_then_reset_is_the_base():
    model = adapterkit.inject(meta_bert(), "auto", adapterkit.AdapterConfig(bottleneck=8))
    materialized(model)
    with pytest.raises(UninitialisedAdapterError, match=r"adapterkit.reset_adapters\(model\)"):
        hidden(model)
    adapterkit.reset_adapters(model)
    assert torch.equal(hidden(model), hidden(base_bert()))


def test_meta_to_empty_load_base_then_load_adapters_is_the_trained_model(tmp_path):
    trained = adapterkit.inject(base_bert(), "auto", TRAINED)
    adapterkit.save_adapters(trained, tmp_path / "a")
    with pytest.raises(ValueError, match="meta device"):
        adapterkit.load_adapters(meta_bert(), tmp_path / "a")  # before to_empty: refused
    model = materialized(adapterkit.inject(meta_bert(), "auto", TRAINED))
    adapterkit.load_adapters(model, tmp_path / "a")
    assert torch.equal(hidden(model), hidden(trained))
    # a full state dict, adapter keys included, initialises them as well
    model = adapterkit.inject(meta_bert(), "auto", TRAINED).to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(trained.state_dict())
    assert torch.equal(hidden(model.eval()), hidden(trained))


# -- MiniLM, the real pretrained model ------------------------------------------------------------


@functools.cache
def minilm_tokenizer():
    return t.AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def minilm_batch() -> dict[str, torch.Tensor]:
    tokenizer = minilm_tokenizer()
    return tokenizer(["Adapters keep the base frozen.", "It rained all day."], padding=True,
                     return_tensors="pt")


def test_minilm_save_pretrained_round_trip(tmp_path):
    model = minilm()
    adapterkit.inject(model, "auto", TRAINED)
    model.save_pretrained(tmp_path)
    loaded = t.AutoModel.from_pretrained(tmp_path, local_files_only=True).eval()
    adapterkit.load_adapters(loaded, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**minilm_batch()).last_hidden_state,
                           model(**minilm_batch()).last_hidden_state)


def test_minilm_built_on_meta_from_its_weights_file():
    folder = minilm_dir()
    config = t.AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = t.AutoModel.from_config(config)
    adapterkit.inject(model, "auto", adapterkit.AdapterConfig(dtype="float32"))
    model.to_empty(device="cpu")
    model.init_weights()  # the buffers (position_ids) are in no checkpoint
    report = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert all(".adapterkit." in k or "position_ids" in k for k in report.missing_keys)
    adapterkit.reset_adapters(model)
    reference = minilm()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**minilm_batch()).last_hidden_state,
                                   reference(**minilm_batch()).last_hidden_state)


def test_minilm_bfloat16_base_with_float32_adapters_is_the_identity_at_init():
    # the same weights as from_pretrained(..., dtype=torch.bfloat16): each float32 tensor cast
    model = minilm().to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        before = model(**minilm_batch()).last_hidden_state
    adapterkit.inject(model, "auto", adapterkit.AdapterConfig(dtype="float32"))
    assert {p.dtype for a in adapterkit.adapters(model).values()
            for p in a.parameters()} == {torch.float32}
    with torch.no_grad():
        after = model(**minilm_batch()).last_hidden_state
    assert after.dtype == torch.bfloat16 and torch.equal(after, before)
