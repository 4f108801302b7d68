"""What ``targets="auto"`` selects: presets for known architectures, a structural rule for the rest.

``"auto"`` places Houlsby adapters: one on each attention sub-layer's output and one on each
feed-forward sub-layer's output, where the output is complete but the residual add has not
happened yet. ``"auto:ffn"`` places only the feed-forward ones (Pfeiffer et al. 2021).

A *preset* names the block classes of one architecture (matched on the class and its bases,
by module and qualified name, so transformers need not be imported) and where inside such a
block the two outputs are. A module of a preset class is covered by its preset and nothing
else looks inside it.

Every other stack of blocks goes through the *structural rule*: a ``ModuleList`` or
``Sequential`` whose children have an attention-like child (by name or class: ``attn``,
``attention``, ``mha``, ``*Attention``; cross-attention names excluded) or an MLP-like child
(``mlp``, ``ffn``, ``feed_forward``, ``*MLP``, ``*FeedForward``; else the BERT layout's
``output`` next to ``intermediate``; else the one down-projecting ``Linear`` child, such as
OPT's ``fc2``). A child that does its residual add inside (it holds a norm, as BERT's
``attention``, or its forward takes the residual, as ``BertOutput``) gives its last ``Linear``
instead. Where a block has two candidates for
one role, or a stack has an attention output but no feed-forward output, the rule is not sure
and raises an error that lists what it considered.

Cross-attention (T5's ``EncDecAttention``, ``nn.TransformerDecoderLayer.multihead_attn``,
GPT-2's ``crossattention``) gets no adapter from ``"auto"``; see ``docs/models.md``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .select import compile_selector
from .surgery import NEVER_CALLED
from .tree import candidates, original_class

Role = Literal["attention", "ffn"]
SPECS: dict[str, tuple[Role, ...]] = {"auto": ("attention", "ffn"), "auto:ffn": ("ffn",)}


@dataclass(frozen=True)
class Preset:
    """Where the sub-layer outputs are inside the blocks of one architecture.

    ``blocks`` are ``"module.QualName"`` of the block classes (a subclass matches too);
    ``attention`` and ``ffn`` are paths relative to the block, the first one present wins
    (so that one preset serves several transformers versions); ``()`` means the block has
    no such sub-layer.
    """

    architecture: str
    blocks: tuple[str, ...]
    attention: tuple[str, ...] = ()
    ffn: tuple[str, ...] = ()
    # False for blocks of the class that "auto" leaves alone (cross-attention)
    applies: Callable[[nn.Module], bool] | None = None

    def paths(self, role: Role) -> tuple[str, ...]:
        return self.attention if role == "attention" else self.ffn


_HF = "transformers.models"
# BERT-family layers add the residual inside BertSelfOutput / BertOutput
# (dense -> dropout -> LayerNorm(h + input)): the adapter goes on the dense, before the add.
PRESETS: tuple[Preset, ...] = (
    Preset("adapterkit reference GPT", ("adapterkit.models.gpt.GPTBlock",),
           ("mha_block",), ("ffn_block",)),
    Preset("torch nn.TransformerEncoderLayer",
           ("torch.nn.modules.transformer.TransformerEncoderLayer",), ("self_attn",), ("linear2",)),
    Preset("torch nn.TransformerDecoderLayer",
           ("torch.nn.modules.transformer.TransformerDecoderLayer",), ("self_attn",), ("linear2",)),
    Preset("GPT-2", (f"{_HF}.gpt2.modeling_gpt2.GPT2Block",), ("attn",), ("mlp",)),
    Preset("BERT", (f"{_HF}.bert.modeling_bert.BertLayer",),
           ("attention.output.dense",), ("output.dense",)),
    Preset("RoBERTa", (f"{_HF}.roberta.modeling_roberta.RobertaLayer",),
           ("attention.output.dense",), ("output.dense",)),
    Preset("LLaMA", (f"{_HF}.llama.modeling_llama.LlamaDecoderLayer",), ("self_attn",), ("mlp",)),
    Preset("Mistral", (f"{_HF}.mistral.modeling_mistral.MistralDecoderLayer",),
           ("self_attn",), ("mlp",)),
    # T5 sub-layers are "x + dropout(sublayer(norm(x)))": adapt the inner module's output.
    Preset("T5", (f"{_HF}.t5.modeling_t5.T5LayerSelfAttention",), ("SelfAttention",), ()),
    Preset("T5", (f"{_HF}.t5.modeling_t5.T5LayerFF",), (), ("DenseReluDense",)),
    # transformers 5 ViT: attention + mlp; transformers 4: ViTOutput adds the residual.
    Preset("ViT", (f"{_HF}.vit.modeling_vit.ViTLayer",), ("attention",), ("mlp", "output.dense")),
    # CNNs: a residual block's branch plays the feed-forward's part. ResNet's `layer` is the
    # Sequential of convs before `+ shortcut`; ConvNeXt's branch ends with `pwconv2`, a Linear
    # on channels-last features, before the layer scale, the permute back and the add.
    Preset("ResNet", (f"{_HF}.resnet.modeling_resnet.ResNetBasicLayer",
                      f"{_HF}.resnet.modeling_resnet.ResNetBottleNeckLayer"), (), ("layer",)),
    Preset("ConvNeXt", (f"{_HF}.convnext.modeling_convnext.ConvNextLayer",
                        f"{_HF}.convnextv2.modeling_convnextv2.ConvNextV2Layer"), (), ("pwconv2",)),
    # diffusers: ResnetBlock2D computes conv2(...) then (shortcut(x) + h) / scale; Attention's
    # processor runs to_out[0] (a Linear over (B, H*W, C)), to_out[1] (dropout), then the
    # residual add. Cross-attention is left alone, as everywhere.
    Preset("diffusers ResnetBlock2D", ("diffusers.models.resnet.ResnetBlock2D",), (), ("conv2",)),
    Preset("diffusers Attention", ("diffusers.models.attention_processor.Attention",),
           ("to_out.0",), (), applies=lambda m: not getattr(m, "is_cross_attention", False)),
)


def preset_for(module: nn.Module) -> Preset | None:
    """The preset whose block class ``module`` is (an instance of), if any.

    Example:
        >>> from adapterkit.models.gpt import GPTBlock
        >>> preset_for(GPTBlock(32, 4, 64, 0.0)).ffn
        ('ffn_block',)
    """
    for cls in original_class(module).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        for preset in PRESETS:
            if key in preset.blocks:
                return preset if preset.applies is None or preset.applies(module) else None
    return None


def auto_targets(model: nn.Module, spec: str = "auto") -> list[str]:
    """The selectors that ``inject(model, spec)`` resolves, for ``spec`` "auto" or "auto:ffn".

    Known blocks go by their preset; other stacks of blocks by the structural rule (see the
    module docstring). Raises ``ValueError`` when nothing is found or the rule is not sure,
    listing what it considered.

    Example:
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=50, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.0, N=2)
        >>> auto_targets(model)
        ['decoder_blocks.*.mha_block', 'decoder_blocks.*.ffn_block']
        >>> auto_targets(model, "auto:ffn")
        ['decoder_blocks.*.ffn_block']
    """
    if spec not in SPECS:
        raise ValueError(
            f"unknown auto spec {spec!r}; use 'auto' (attention and feed-forward outputs, "
            "Houlsby) or 'auto:ffn' (feed-forward outputs only, Pfeiffer)"
        )
    roles = SPECS[spec]
    named = candidates(model)
    found = _from_presets(named, roles)
    covered = [name for name, module in named if preset_for(module) is not None]
    found += _from_structure(named, roles, covered)
    if not found:
        raise ValueError(_nothing_found(named))
    order = {name: i for i, (name, _) in enumerate(named)}
    return compress(sorted(set(found), key=order.__getitem__), named)


# -- presets ----------------------------------------------------------------------------------


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _from_presets(named: list[tuple[str, nn.Module]], roles: Sequence[Role]) -> list[str]:
    modules = dict(named)
    found: list[str] = []
    blocks: list[str] = []
    for name, module in named:
        preset = preset_for(module)
        if preset is None or any(_within(name, b) for b in blocks):
            continue  # not a preset block, or inside one: the outer block's preset decides
        blocks.append(name)
        for role in roles:
            paths = preset.paths(role)
            hit = next((p for p in paths if _join(name, p) in modules), None)
            if paths and hit is None:
                children = ", ".join(n for n, _ in module.named_children())
                raise ValueError(
                    f"'{name}' is a {type(module).__name__} ({preset.architecture} preset) but "
                    f"has none of {list(paths)} for its {role} output (children: {children}); "
                    "this version of the library laid the block out differently: pass "
                    "targets=[...] explicitly (see docs/models.md)"
                )
            if hit is not None:
                found.append(_join(name, hit))
    return found


# -- the structural rule ------------------------------------------------------------------------

# Whole child names only: "post_attention_layernorm" or "attn_dropout" are not sub-layers.
_ATTN_NAME = re.compile(r"(?i)^(self_?)?(attn|attention|mha)(_?block|_?layer)?$|^selfattention$")
_ATTN_CLASS = re.compile(r"(?i)attention|attn")
_CROSS = re.compile(r"(?i)cross|enc_?dec|encoder_attn|multihead_attn")
_FFN_NAME = re.compile(r"(?i)^(mlp|ffn|ff|feed_?forward|densereludense)(_?block|_?layer)?$")
_FFN_CLASS = re.compile(r"(?i)mlp|feed_?forward|ffn|layerff$|denseactdense")
_NORM_CLASS = re.compile(r"(?i)norm")


def _within(inner: str, outer: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _is_norm(module: nn.Module) -> bool:
    return bool(_NORM_CLASS.search(original_class(module).__name__))


def _linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    # transformers' GPT-2 Conv1D is a Linear with its weight transposed; it says so by `nf`.
    return [(n, m) for n, m in module.named_modules()
            if n and (isinstance(m, nn.Linear) or isinstance(getattr(m, "nf", None), int))]


def _adds_residual(child: nn.Module, role: Role) -> bool:
    """Whether a sub-layer does its residual add inside: it holds a norm (post-LN wrappers
    such as BERT's ``attention``), or it is a feed-forward whose forward takes a second
    required argument, which can only be the residual (``BertOutput.forward(hidden_states,
    input_tensor)``; an attention's extra arguments are keys, values and masks)."""
    if any(_is_norm(m) for _, m in child.named_modules()):
        return True
    if role == "attention":
        return False
    try:
        params = inspect.signature(original_class(child).forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) >= 3  # self, the hidden state, the residual


def _output_of(name: str, child: nn.Module, role: Role) -> str:
    """The module to adapt for a sub-layer ``child``: itself, or, when it adds the residual
    inside, its output projection (its last ``Linear``)."""
    if not _adds_residual(child, role):
        return name
    linears = _linears(child)
    if not linears:
        return name
    path, _ = linears[-1]
    parent_path, _, leaf = path.rpartition(".")
    parent = child.get_submodule(parent_path)
    if any(isinstance(parent, cls) and leaf == attr for cls, attr in NEVER_CALLED):
        path = parent_path  # its parent computes with its weights and never calls it
    return _join(name, path)


def _role_candidates(block: nn.Module, role: Role) -> list[str]:
    """Children of ``block`` that look like its attention / feed-forward sub-layer."""
    if role == "attention":
        name_re, class_re = _ATTN_NAME, _ATTN_CLASS
    else:
        name_re, class_re = _FFN_NAME, _FFN_CLASS
    hits = []
    for name, child in block.named_children():
        cls = original_class(child).__name__
        if _is_norm(child) or next(child.parameters(), None) is None:
            continue  # a sub-layer has weights, and a norm is not one
        if role == "attention" and (_CROSS.search(name) or "cross" in cls.lower()):
            continue
        if name_re.search(name) or class_re.search(cls):
            hits.append(name)
    if hits or role == "attention":
        return hits
    children = dict(block.named_children())
    if "output" in children and "intermediate" in children:  # the BERT layout
        return ["output"]
    down = [n for n, m in children.items()
            if isinstance(m, nn.Linear) and m.in_features > m.out_features]
    return down if len(down) == 1 else []


@dataclass
class _Stack:
    """A ModuleList or Sequential, and those of its children that are blocks."""

    name: str
    blocks: list[tuple[str, nn.Module]]

    def describe(self) -> str:
        classes = sorted({original_class(b).__name__ for _, b in self.blocks})
        block_name, block = self.blocks[0]
        children = ", ".join(n for n, _ in block.named_children()) or "none"
        return (f"'{self.name}' ({len(self.blocks)} x {'/'.join(classes)}; children of "
                f"'{block_name}': {children})")


def _stacks(named: list[tuple[str, nn.Module]]) -> Iterator[_Stack]:
    for name, module in named:
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            # children without submodules (a final norm, an activation) are not blocks
            blocks = [(_join(name, n), m) for n, m in module.named_children() if m._modules]
            if blocks:
                yield _Stack(name, blocks)


def _from_structure(
    named: list[tuple[str, nn.Module]], roles: Sequence[Role], covered: list[str]
) -> list[str]:
    modules = dict(named)
    found: list[str] = []
    for stack in _stacks(named):
        if any(_within(stack.name, o) for o in covered + found) or any(
            _within(c, stack.name) for c in covered
        ):
            continue  # a preset covers it, or it sits inside a module already chosen
        per_role: dict[Role, list[str]] = {"attention": [], "ffn": []}
        for block_name, block in stack.blocks:
            for role in ("attention", "ffn"):
                hits = _role_candidates(block, role)
                if len(hits) > 1:
                    raise ValueError(
                        f"auto: not sure which child of '{block_name}' is its {role} sub-layer; "
                        f"candidates: {', '.join(hits)}. Pass targets=[...] explicitly, e.g. "
                        f"'{stack.name}.*.{hits[0]}' (see docs/models.md)"
                    )
                per_role[role] += [_join(block_name, h) for h in hits]
        if not per_role["attention"] and not per_role["ffn"]:
            continue  # not a stack of transformer blocks (e.g. a Sequential of Linear layers)
        missing = [role for role in roles if not per_role[role]]
        if missing:
            raise ValueError(
                f"auto: the blocks of {stack.describe()} look like transformer blocks but no "
                f"{' or '.join(missing)} sub-layer was found in them; pass targets=[...] "
                "explicitly (see docs/models.md)"
            )
        found += [_output_of(n, modules[n], role) for role in roles for n in per_role[role]]
    return found


def _nothing_found(named: list[tuple[str, nn.Module]]) -> str:
    stacks = [s.describe() for s in _stacks(named)]
    considered = "; ".join(stacks[:6]) if stacks else "no ModuleList or Sequential of blocks"
    model = original_class(named[0][1]).__name__
    return (
        f"auto: no preset matches this {model} and the structural rule "
        f"found no blocks with attention- or MLP-like children. Considered: {considered}. "
        "Pass targets=[...] explicitly (see docs/models.md)"
    )


# -- selectors ----------------------------------------------------------------------------------


def _selects_exactly(selector: str, names: set[str], all_names: list[str]) -> bool:
    try:
        match = compile_selector(selector)
    except ValueError:
        return False
    return {n for n in all_names if match(n, None)} == names


def compress(names: Sequence[str], named: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Selectors that select exactly ``names``: a glob per repeated position where one does,
    else the name itself (or an escaped ``re:`` when the name alone would select more).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
        >>> compress(["0.0", "1.0"], list(model.named_modules()))
        ['*.*']
        >>> compress(["0.0"], list(model.named_modules()))
        ['0.0']
    """
    all_names = [n for n, _ in named if n]
    groups: dict[str, list[str]] = {}
    for name in names:
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        groups.setdefault(pattern, []).append(name)
    selectors: list[str] = []
    for pattern, members in groups.items():
        if "*" in pattern and _selects_exactly(pattern, set(members), all_names):
            selectors.append(pattern)
            continue
        for name in members:
            exact = _selects_exactly(name, {name}, all_names)
            selectors.append(name if exact else "re:" + re.escape(name))
    return selectors
