"""The selection grammar, table-driven over the reference GPT's module names."""

from __future__ import annotations

import pytest
from torch import nn

from adapterkit.models.gpt import FeedForward, MultiheadAttention
from adapterkit.select import compile_selector, select_modules
from adapterkit.tree import candidates
from tests.conftest import make_gpt

NAMES = [
    "decoder_blocks.0.mha_block",
    "decoder_blocks.0.mha_block.q_proj",
    "decoder_blocks.1.ffn_block",
    "decoder_blocks.1.ffn_block.fc2",
    "cls",
    "emb_layer",
    "mha_block",
    "mha_block_extra",
]

CASES = [
    # (selector, names it matches among NAMES)
    ("mha_block", ["decoder_blocks.0.mha_block", "mha_block"]),
    ("cls", ["cls"]),
    ("q_proj", ["decoder_blocks.0.mha_block.q_proj"]),
    ("0.mha_block", ["decoder_blocks.0.mha_block"]),
    ("decoder_blocks.*.mha_block", ["decoder_blocks.0.mha_block"]),
    ("decoder_blocks.*", []),  # '*' stays inside one component; '0' has no module in NAMES
    ("**.mha_block", ["decoder_blocks.0.mha_block", "mha_block"]),
    ("decoder_blocks.**", [n for n in NAMES if n.startswith("decoder_blocks.")]),
    ("decoder_blocks.**.fc2", ["decoder_blocks.1.ffn_block.fc2"]),
    ("*_block", ["mha_block"]),
    ("mha_block*", ["mha_block", "mha_block_extra"]),
    ("decoder_blocks.[01].*_block", ["decoder_blocks.0.mha_block", "decoder_blocks.1.ffn_block"]),
    ("decoder_blocks.[!0].*_block", ["decoder_blocks.1.ffn_block"]),
    ("decoder_blocks.?.mha_block", ["decoder_blocks.0.mha_block"]),
    ("re:.*\\.(q_proj|fc2)",
     ["decoder_blocks.0.mha_block.q_proj", "decoder_blocks.1.ffn_block.fc2"]),
    ("re:mha_block", ["mha_block"]),  # full match, not search
    ("re:.*mha_block", ["decoder_blocks.0.mha_block", "mha_block"]),
    (lambda name, _m: name.count(".") == 1, []),
    (lambda name, _m: name.endswith("extra"), ["mha_block_extra"]),
]


@pytest.mark.parametrize(("selector", "expected"), CASES)
def test_string_and_callable_selectors(selector, expected):
    match = compile_selector(selector)
    assert [n for n in NAMES if match(n, nn.Identity())] == expected


@pytest.mark.parametrize(
    ("selector", "count"),
    [(MultiheadAttention, 2), (FeedForward, 2), (nn.Linear, 2 * 6 + 1), (nn.Embedding, 2)],
)
def test_class_selector_is_isinstance(selector, count):
    found = select_modules(candidates(make_gpt()), selector)
    assert len(found) == count
    assert all(isinstance(m, selector) for m in found.values())


def test_selection_is_in_model_order_and_deduplicated():
    model = make_gpt(layers=3)
    found = select_modules(candidates(model), ["ffn_block", "mha_block", "decoder_blocks.0.*"])
    first = [f"decoder_blocks.0.{m}" for m in ("mha_block", "ffn_block", "layernorm1",
                                               "layernorm2")]
    rest = [f"decoder_blocks.{i}.{m}" for i in (1, 2) for m in ("mha_block", "ffn_block")]
    assert list(found) == first + rest


def test_shared_module_is_selected_once():
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": shared})
    assert list(select_modules(candidates(model), nn.Linear)) == ["a"]


@pytest.mark.parametrize(
    ("selector", "error", "message"),
    [
        ("re:(unclosed", ValueError, "invalid regular expression"),
        ("decoder_blocks.[0.mha", ValueError, "invalid glob"),
        ("", ValueError, "empty string"),
        (3, TypeError, "a selector is a str"),
        (int, TypeError, "nn.Module subclass"),
        (None, TypeError, "a selector is a str"),
    ],
)
def test_invalid_selectors(selector, error, message):
    with pytest.raises(error, match=message):
        compile_selector(selector)


def test_no_match_names_the_closest_modules():
    with pytest.raises(ValueError, match="no module matches 'mha_blok'; closest: "
                       "decoder_blocks.0.mha_block, decoder_blocks.1.mha_block"):
        select_modules(candidates(make_gpt()), ["mha_block", "mha_blok"])
