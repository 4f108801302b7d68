"""PEFT's LoRA folders in: every fixture PEFT 0.21.2 saved loads to PEFT's own outputs (1e-5,
padded row included) or is refused naming the option, the model unchanged; malformed and
unknown configs get one clear error; every option of PEFT's LoraConfig has a stated treatment.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit
from adapterkit import AdapterFileError
from adapterkit.io.peft_config import OPTIONS
from tests.conftest import assert_same, snapshot
from tests.ecosystem.peft_cases import (
    CASES,
    PEERS,
    base,
    case,
    folder,
    inputs,
    max_diff,
    outputs,
    t,
)

TOLERANCE = 1e-5


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapterkit." not in k}


@pytest.mark.parametrize("name", CASES)
def test_every_peft_fixture_loads_exactly_or_is_refused(name: str) -> None:
    spec = case(name)
    model = base(name)
    if spec["expect"] == "refuse":
        snap = snapshot(model)
        with pytest.raises((AdapterFileError, ValueError), match=re.escape(spec["refuse_option"])):
            adapterkit.load_adapters(model, folder(name))
        assert_same(model, snap)
        assert adapterkit.adapters(model) == {}
        return
    before = _base_state(model)
    untouched = outputs(model, name)
    adapterkit.load_adapters(model, folder(name))
    assert adapterkit.active(model) == ["adapter"]  # the folder's name
    assert max_diff(model, name) <= TOLERANCE
    moved = max((v - untouched[k]).abs().max().item() for k, v in outputs(model, name).items())
    assert moved > 1e-3  # the adapter reached the output
    # the base is left as it was, but for PEFT's modules_to_save copies, which load in place
    after = _base_state(model)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == (["classifier.bias", "classifier.weight"]
                       if "modules_to_save" in name else [])


def test_the_loaded_set_is_an_identity_parallel_set_whose_tensors_are_peft_s() -> None:
    name = "gpt2_lora_c_attn_rslora_lora_bias"  # Conv1D 32 -> 96, rsLoRA, lora_bias
    model = adapterkit.load_adapters(base(name), folder(name), name="lora")
    tensors = load_file(str(folder(name) / "adapter_model.safetensors"))
    adapter = adapterkit.adapters(model, "lora")["h.0.attn.c_attn"]
    config = adapter.config
    assert (config.activation, config.placement) == ("identity", "parallel")
    assert config.scaling == pytest.approx(8 / 4 ** 0.5)  # lora_alpha / sqrt(r): one scaling
    assert (adapter.d_in, adapter.d_model) == (32, 96)
    key = "base_model.model.h.0.attn.c_attn"
    assert torch.equal(adapter.down.weight, tensors[f"{key}.lora_A.weight"])
    assert torch.equal(adapter.up.weight, tensors[f"{key}.lora_B.weight"])
    assert torch.equal(adapter.up.bias, tensors[f"{key}.lora_B.bias"])
    assert not adapter.down.bias.any()


def test_per_module_ranks_and_scalings_are_read_off_the_tensors() -> None:
    name = "bert_lora_rank_alpha_pattern"
    model = adapterkit.load_adapters(base(name), folder(name))
    found = {k: a.down.out_features for k, a in adapterkit.adapters(model).items()}
    assert found["encoder.layer.0.attention.self.query"] == 2  # rank_pattern, full name
    assert found["encoder.layer.1.attention.self.value"] == 6  # rank_pattern "value"
    assert found["encoder.layer.1.attention.self.query"] == 4  # r
    # the modules' scalings differ (alpha / r per module): folded into up, the set's is 1
    assert adapterkit.adapters(model)["encoder.layer.0.intermediate.dense"].scaling == 1.0


def test_bias_all_leaves_the_base_alone_and_adds_the_differences() -> None:
    name = "bert_lora_bias_all"
    model = base(name)
    snap = snapshot(model)
    adapterkit.load_adapters(model, folder(name))
    held = adapterkit.adapters(model)
    norm = held["embeddings.LayerNorm"]  # a zero-weight adapter that adds the bias change
    assert norm.down.out_features == 1 and not norm.up.weight.any() and norm.up.bias.any()
    assert "encoder.layer.0.attention.self.key" in held  # a Linear PEFT did not target
    adapterkit.eject(model)
    assert_same(model, snap)  # nothing of the base moved: eject is exact


@pytest.mark.parametrize(("saved_as", "loaded_into"), [("bert", "head"), ("head", "bert")])
def test_a_folder_fits_the_model_with_or_without_its_head(tmp_path: Path, saved_as: str,
                                                           loaded_into: str) -> None:
    """base_model_prefix both ways: PEFT's paths from BertModel (encoder...) load into
    BertForSequenceClassification (bert.encoder...), and the reverse."""
    bert = base("bert_lora_list")
    head = t.BertForSequenceClassification(bert.config).eval()
    head.bert.load_state_dict(bert.state_dict())
    source = folder("bert_lora_list")
    if saved_as == "head":  # the same weights, as PEFT writes them from the head model
        source = tmp_path / "from_head"
        shutil.copytree(folder("bert_lora_list"), source)
        tensors = load_file(str(source / "adapter_model.safetensors"))
        save_file({k.replace("base_model.model.", "base_model.model.bert."): v
                   for k, v in tensors.items()}, str(source / "adapter_model.safetensors"))
    model = adapterkit.load_adapters(head if loaded_into == "head" else bert, source, name="l")
    with torch.no_grad():
        out = model(**inputs("bert_lora_list"), output_hidden_states=True)
    hidden = out.hidden_states[-1] if loaded_into == "head" else out.last_hidden_state
    want = load_file(str(PEERS / "peft" / "bert_lora_list" / "expected.safetensors"))
    assert (hidden - want["last_hidden_state"]).abs().max() <= TOLERANCE


def test_a_folder_whose_keys_do_not_fit_is_refused_naming_the_module() -> None:
    model = base("bert_lora_list")  # a bare BertModel: no classifier
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match=r"does not fit this BertModel \(PEFT saved it "
                       r"from a BertForSequenceClassification\): it holds weights for module "
                       r"'classifier'"):
        adapterkit.load_adapters(model, folder("bert_seqcls_lora_modules_to_save"))
    assert_same(model, snap)


def test_all_linear_selects_what_peft_selects(tmp_path: Path) -> None:
    name = "llama_lora_all_linear"  # q, k, v, o, gate, up, down: every Linear of LlamaModel
    source = tmp_path / "all_linear"
    shutil.copytree(folder(name), source)
    _edit(source, target_modules="all-linear")
    model = adapterkit.load_adapters(base(name), source)
    assert max_diff(model, name) <= TOLERANCE


def _edit(path: Path, **changes: object) -> None:
    file = path / "adapter_config.json"
    meta = json.loads(file.read_text())
    meta.update(changes)
    file.write_text(json.dumps(meta))


def _drop_keys(path: Path, needle: str) -> None:
    file = path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(file)).items() if needle not in k}, str(file))


def _rank2(path: Path) -> None:
    _edit(path, r=2)


# (case, change to a copy of bert_lora_list's folder, what the error says)
BAD = [
    ("not an object", lambda p: (p / "adapter_config.json").write_text("[1, 2]"),
     r"adapter_config.json is no adapter config this adapterkit reads .*expected exactly one "
     r"of: adapterkit: \"format\": \"adapterkit\".*PEFT: \"peft_type\""),
    ("no known field", lambda p: (p / "adapter_config.json").write_text('{"r": 4}'),
     r"is no adapter config this adapterkit reads \(it has \['r'\]\)"),
    ("both kinds", lambda p: _edit(p, format="adapterkit"),
     r"looks like more than one kind \(adapterkit, PEFT\)"),
    ("damaged json", lambda p: (p / "adapter_config.json").write_text('{"peft_type": "LO'),
     "is damaged: not valid JSON"),
    ("bad rank", lambda p: _edit(p, r="four"),
     r"PEFT option 'r' is 'four'; expected a positive integer"),
    ("bad targets", lambda p: _edit(p, target_modules=5),
     r"PEFT option 'target_modules' is 5; expected a list of module names or a regex"),
    ("bad bias", lambda p: _edit(p, bias="some"),
     r"PEFT option 'bias' is 'some'; expected 'none', 'all' or 'lora_only'"),
    ("unknown option", lambda p: _edit(p, use_magic=True),
     r"sets PEFT option 'use_magic' \(True\), which this adapterkit does not know"),
    ("a variant", lambda p: _edit(p, alora_invocation_tokens=[3, 4]),
     r"sets alora_invocation_tokens=\[3, 4\]: activated LoRA"),
    ("rank not the config's", _rank2,
     r"has lora_A \[4, 32\] and lora_B \[32, 4\]; .* rank 2 \(r, rank_pattern\)"),
    ("config selects more", lambda p: _edit(p, target_modules=["query", "value", "key"]),
     r"target_modules etc. select \['encoder.layer.0.attention.self.key'"),
    ("config selects less", lambda p: _edit(p, target_modules=["query"]),
     r"has LoRA weights for \['encoder.layer.0.attention.self.value'"),
    ("lora_bias without biases", lambda p: _edit(p, lora_bias=True),
     r"lora_bias is True but lora_B.bias is absent"),
    ("half a LoRA", lambda p: _drop_keys(p, "layer.1.attention.self.query.lora_B"),
     r"module 'encoder.layer.1.attention.self.query' has only \['A'\]"),
    ("a bias on lora_A", lambda p: save_file(
        {**load_file(str(p / "adapter_model.safetensors")),
         "base_model.model.encoder.layer.0.attention.self.query.lora_A.bias": torch.ones(4)},
        str(p / "adapter_model.safetensors")),
     r"module 'encoder.layer.0.attention.self.query' has lora_A.bias"),
    ("not PEFT keys", lambda p: save_file({"encoder.x.lora_A.weight": torch.zeros(2, 2)},
                                          str(p / "adapter_model.safetensors")),
     r"has key 'encoder.x.lora_A.weight', which is not a PEFT key"),
    ("a pickle", lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
     r"holds adapter_model.bin, a pickle, and adapterkit never unpickles"),
    ("a base weight", lambda p: save_file(
        {**load_file(str(p / "adapter_model.safetensors")),
         "base_model.model.pooler.dense.weight": torch.zeros(32, 32)},
        str(p / "adapter_model.safetensors")),
     r"sets 'pooler.dense.weight': neither a bias nor in modules_to_save"),
    ("another method's keys", lambda p: save_file(
        {**load_file(str(p / "adapter_model.safetensors")),
         "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector":
         torch.ones(32)}, str(p / "adapter_model.safetensors")),
     r"holds DoRA \(use_dora\): lora_magnitude_vector"),
]


@pytest.mark.parametrize(("case_name", "damage", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_folders_get_one_clear_error_and_leave_the_model_as_it_was(
        tmp_path: Path, case_name: str, damage, message: str) -> None:
    path = tmp_path / "lora"
    shutil.copytree(folder("bert_lora_list"), path)
    damage(path)
    model = base("bert_lora_list")
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        adapterkit.load_adapters(model, path)
    assert_same(model, snap)


def test_a_folder_name_that_is_no_set_name_asks_for_name(tmp_path: Path) -> None:
    path = tmp_path / "my.lora"
    shutil.copytree(folder("bert_lora_list"), path)
    model = base("bert_lora_list")
    with pytest.raises(ValueError, match=r"'my.lora' is not a set name .* name=\.\.\."):
        adapterkit.load_adapters(model, path)
    adapterkit.load_adapters(model, path, name="mine")
    assert adapterkit.active(model) == ["mine"]


def test_an_adapterkit_folder_is_never_read_as_peft(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapterkit.inject(model, ["0"], adapterkit.AdapterConfig(bottleneck=2, init="normal"))
    path = adapterkit.save_adapters(model, tmp_path / "a")
    meta = json.loads((path / "adapter_config.json").read_text())
    assert "peft_type" not in meta and meta["format"] == "adapterkit"
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapterkit.load_adapters(fresh, path)  # read by adapterkit's own reader
    assert list(adapterkit.adapters(fresh)) == ["0"]


def test_every_option_of_peft_s_lora_config_has_a_stated_treatment() -> None:
    """A PEFT release that adds an option fails here until the table says what it does."""
    peft = pytest.importorskip("peft")
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - set(OPTIONS) == set()
    assert set(OPTIONS) - fields == set()


def test_the_docs_table_lists_every_option_as_the_code_treats_it() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "interop-peft.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (read|ignored|refused) \|", page, re.M))
    assert rows == {name: option.treatment for name, option in OPTIONS.items()}


def test_a_base_on_the_meta_device_is_refused() -> None:
    config = base("bert_lora_list").config
    with torch.device("meta"):
        model = t.BertModel(config)
    with pytest.raises(ValueError, match="into a model on the meta device"):
        adapterkit.load_adapters(model, folder("bert_lora_list"))
    assert adapterkit.adapters(model) == {}
