"""PEFT's LoRA ``adapter_config.json``: every option, what adapterkit does with it, and PEFT's
rules for which modules it targets with which rank and scaling.

Written against PEFT 0.21.2 (``tuners/lora/config.py``; the matching in
``tuners/tuners_utils.py:check_target_module_exists`` and ``utils/other.py:get_pattern_key``),
without importing PEFT: reading a folder needs only the standard library, torch and
safetensors. ``OPTIONS`` is the table ``docs/interop-peft.md`` shows; a test checks that it
names every field of the installed PEFT's ``LoraConfig``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import AdapterFileError

PEFT_TYPE = "LORA"
Treatment = Literal["read", "ignored", "refused"]


@dataclass(frozen=True)
class Option:
    """What ``load_adapters`` does with one option of a PEFT LoRA config."""

    treatment: Treatment  # "refused": only when set (not null, false or empty)
    what: str


_INIT = "how PEFT initialised the weights; the file holds them as trained"
_META = "metadata"

OPTIONS: dict[str, Option] = {
    "peft_type": Option("read", "must be LORA; any other PEFT method (IA3, LOHA, LOKR, ADALORA, "
                                "prompt tuning, ...) is refused, naming it"),
    "r": Option("read", "each module's rank; the ranks are read off the tensors' shapes and "
                        "checked against r and rank_pattern"),
    "lora_alpha": Option("read", "scaling alpha / r"),
    "use_rslora": Option("read", "scaling alpha / sqrt(r)"),
    "rank_pattern": Option("read", "per module, PEFT's rule (the first pattern p in order with "
                                   "re.match('(.*\\.)?(p)$', name)); an adapter's width may "
                                   "differ from its set's"),
    "alpha_pattern": Option("read", "per module, as rank_pattern; where the modules' scalings "
                                    "differ, each is folded into its up.weight and the set's "
                                    "scaling is 1"),
    "target_modules": Option("read", "a list (a name equal to the module's or a dotted suffix "
                                     "of it), a regex (re.fullmatch), 'all-linear', or absent "
                                     "(PEFT's default list: the modules that have weights in "
                                     "the file); checked against the file's keys"),
    "exclude_modules": Option("read", "a list (as target_modules) or a regex"),
    "layers_to_transform": Option("read", "with a list target_modules, as PEFT: the first "
                                          "number after layers_pattern (or after any name)"),
    "layers_pattern": Option("read", "with layers_to_transform"),
    "lora_dropout": Option("read", "the set's dropout: nothing in eval mode; in training "
                                   "adapterkit drops the branch's output, PEFT its input"),
    "fan_in_fan_out": Option("read", "nothing to do: lora_A and lora_B act on x for GPT-2's "
                                     "Conv1D too (only merging transposes)"),
    "bias": Option("read", "'none'; 'lora_only' and 'all' save trained biases that replace the "
                           "base's in PEFT: adapterkit leaves the base as it is and adds the "
                           "difference (in up.bias of a targeted layer; a zero-weight adapter of "
                           "width 1 on any other Linear, Conv1D or LayerNorm)"),
    "lora_bias": Option("read", "up.bias (inside PEFT's scaled term: scaling * b)"),
    "modules_to_save": Option("read", "the copies' weights load into the modules themselves, "
                                      "which the set includes (save_adapters saves them with "
                                      "it, as include=); eject leaves them loaded"),
    "init_lora_weights": Option("ignored", f"{_INIT} (PiSSA, OLoRA, CorDA, LoftQ change the base "
                                           "at init: load into the base the folder was saved "
                                           "against, as PEFT needs too; MiCA's forward is "
                                           "LoRA's)"),
    "loftq_config": Option("ignored", _INIT),
    "eva_config": Option("ignored", _INIT),
    "corda_config": Option("ignored", _INIT),
    "lora_ga_config": Option("ignored", _INIT),
    "use_dora": Option("refused", "DoRA rescales each output by a learned magnitude over the "
                                  "norm of the merged weight: not an adapter branch"),
    "velora_config": Option("refused", "VeLoRA, a LoRA variant: its eval forward is LoRA's, "
                                       "its training backward compresses activations; not "
                                       "checked against PEFT here, so refused, not assumed"),
    "monteclora_config": Option("refused", "MonteCLoRA, a LoRA variant that samples its weights "
                                           "(variational Monte Carlo)"),
    "use_bdlora": Option("refused", "BD-LoRA, a LoRA variant with block-diagonal factors"),
    "arrow_config": Option("refused", "Arrow, a LoRA variant that routes each token among "
                                      "several LoRA experts"),
    "kasa_config": Option("refused", "KaSA, a LoRA variant that truncates the base weight's "
                                     "smallest singular components and puts a learned "
                                     "diagonal between A and B"),
    "alora_invocation_tokens": Option("refused", "activated LoRA acts only from the invocation "
                                                 "tokens on, which depends on each input"),
    "use_qalora": Option("refused", "QALoRA pools the input in groups before lora_A"),
    "qalora_group_size": Option("ignored", "used only with use_qalora"),
    "layer_replication": Option("refused", "it repeats layers of the base model"),
    "target_parameters": Option("refused", "LoRA on nn.Parameters (mixture-of-experts weights), "
                                           "not on modules"),
    "trainable_token_indices": Option("refused", "it trains rows of the embedding matrix"),
    "megatron_config": Option("refused", "Megatron's parallel layers"),
    "megatron_core": Option("ignored", "used only with megatron_config"),
    "ensure_weight_tying": Option("refused", "it ties adapters of tied layers (embedding and "
                                             "output), which adapterkit does not"),
    "runtime_config": Option("ignored", "runtime only (PEFT does not save it)"),
    "task_type": Option("ignored", f"{_META} (with 'all-linear': SEQ_CLS leaves the classifier "
                                   "out, as PEFT)"),
    "base_model_name_or_path": Option("ignored", _META),
    "revision": Option("ignored", _META),
    "inference_mode": Option("ignored", _META),
    "auto_mapping": Option("ignored", f"{_META} (named when the keys do not fit the model)"),
    "peft_version": Option("ignored", _META),
}

EMBEDDING = "embedding LoRA (target is an nn.Embedding)"


def conv_lora(cls: str) -> str:
    return f"conv LoRA (target is an nn.{cls})"


def is_set(value: object) -> bool:
    return value not in (None, False, "", [], {})


def pattern_key(patterns: list[str], key: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``key`` at a dot."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), None)


@dataclass(frozen=True)
class LoraSpec:
    """A PEFT LoRA config as adapterkit reads it (``read_spec``); PEFT's defaults where absent."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()
    task_type: str | None = None

    def rank(self, key: str) -> int:
        found = pattern_key([p for p, _ in self.rank_pattern], key)
        return dict(self.rank_pattern)[found] if found is not None else self.r

    def scaling(self, key: str) -> float:
        """PEFT's ``scaling[adapter]`` for module ``key``."""
        found = pattern_key([p for p, _ in self.alpha_pattern], key)
        alpha = dict(self.alpha_pattern)[found] if found is not None else self.lora_alpha
        r = self.rank(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def in_modules_to_save(self, key: str) -> bool:
        return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in self.modules_to_save)

    def targets(self, key: str) -> bool:
        """PEFT's ``check_target_module_exists``: whether PEFT puts LoRA on module ``key``."""
        excluded = self.exclude_modules
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return False
        elif excluded and (key in excluded or any(key.endswith("." + e) for e in excluded)):
            return False
        if self.in_modules_to_save(key):
            return False
        wanted = self.target_modules
        if wanted is None:
            return False
        if isinstance(wanted, str):
            return re.fullmatch(wanted, key) is not None
        if key in wanted:
            return True
        if not any(key.endswith("." + t) for t in wanted):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == ():
            return True
        index = self._layer_index(key)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers

    def _layer_index(self, key: str) -> int | None:
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        return None if match is None else int(match.group("idx"))


# -- reading the config ---------------------------------------------------------------------


def _bad(file: Path, field: str, value: object, expected: str) -> AdapterFileError:
    return AdapterFileError(f"{file}: PEFT option '{field}' is {value!r}; expected {expected}")


def _number(file: Path, meta: dict, field: str, default: float, *, integer: bool = False,
            positive: bool = True) -> Any:
    value = meta.get(field, default)
    if value is None:
        value = default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or (
            positive and value <= 0):
        raise _bad(file, field, value, f"a {'positive ' if positive else ''}"
                                       f"{'integer' if integer else 'number'}")
    return value


def _flag(file: Path, meta: dict, field: str) -> bool:
    value = meta.get(field, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(file, field, value, "true or false")
    return value


def _names(file: Path, meta: dict, field: str, *, regex: bool = True
           ) -> tuple[str, ...] | str | None:
    value = meta.get(field)
    if value is None:
        return None
    if isinstance(value, str) and regex:
        try:
            re.compile(value)
        except re.error as err:
            raise _bad(file, field, value, f"a valid regular expression ({err})") from None
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _bad(file, field, value, "a list of module names" + (" or a regex" if regex else ""))


def _pattern(file: Path, meta: dict, field: str, integer: bool) -> tuple[tuple[str, Any], ...]:
    value = meta.get(field) or {}
    if not isinstance(value, dict):
        raise _bad(file, field, value, "an object mapping module-name patterns to numbers")
    for pattern, number in value.items():
        _number(file, {field: number}, field, 1, integer=integer)
        try:
            re.compile(pattern)
        except re.error as err:
            raise _bad(file, field, value, f"patterns that are valid regexes ({err})") from None
    return tuple(value.items())


def _layers(file: Path, meta: dict) -> tuple[int, ...] | int | None:
    value = meta.get("layers_to_transform")
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                       for v in value):
        return tuple(value)
    raise _bad(file, "layers_to_transform", value, "an integer or a list of integers")


def refuse_options(file: Path, meta: dict) -> None:
    """Refuse a PEFT config adapterkit cannot reproduce exactly, naming what."""
    peft_type = meta.get("peft_type")
    if peft_type != PEFT_TYPE:
        raise AdapterFileError(
            f"{file} holds a PEFT adapter with peft_type: {peft_type}; adapterkit reads PEFT's "
            f"LoRA only (peft_type: {PEFT_TYPE}), whose branch is an adapter's. Load it with "
            "PEFT itself"
        )
    for field, value in meta.items():
        option = OPTIONS.get(field)
        if option is None and is_set(value):
            raise AdapterFileError(
                f"{file} sets PEFT option '{field}' ({value!r}), which this adapterkit does not "
                f"know (written by PEFT {meta.get('peft_version', '?')}; adapterkit reads the "
                "options of PEFT 0.21.2): refused rather than ignored, since it may change "
                "what the adapter computes"
            )
        if option is not None and option.treatment == "refused" and is_set(value):
            raise AdapterFileError(
                f"{file} sets {field}={value!r}: {option.what}. adapterkit reads plain LoRA "
                f"exactly; load this adapter with PEFT itself"
            )


def read_spec(file: Path, meta: dict) -> LoraSpec:
    """The options of a PEFT LoRA config, checked; ``AdapterFileError`` names a bad one."""
    refuse_options(file, meta)
    bias = meta.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise _bad(file, "bias", bias, "'none', 'all' or 'lora_only'")
    dropout = _number(file, meta, "lora_dropout", 0.0, positive=False)
    if not 0 <= dropout < 1:
        raise _bad(file, "lora_dropout", dropout, "a number in [0, 1)")
    pattern = meta.get("layers_pattern")
    if pattern is not None and not (isinstance(pattern, str) or (
            isinstance(pattern, list) and all(isinstance(p, str) for p in pattern))):
        raise _bad(file, "layers_pattern", pattern, "a name or a list of names")
    target_modules = _names(file, meta, "target_modules")
    if isinstance(target_modules, str) and meta.get("layers_to_transform") is not None:
        raise _bad(file, "layers_to_transform", meta["layers_to_transform"],
                   "null with a regex target_modules (PEFT refuses the two together)")
    modules_to_save = _names(file, meta, "modules_to_save", regex=False) or ()
    return LoraSpec(
        r=_number(file, meta, "r", 8, integer=True),
        lora_alpha=_number(file, meta, "lora_alpha", 8),
        use_rslora=_flag(file, meta, "use_rslora"),
        lora_dropout=float(dropout),
        target_modules=target_modules,
        exclude_modules=_names(file, meta, "exclude_modules"),
        layers_to_transform=_layers(file, meta),
        layers_pattern=(pattern,) if isinstance(pattern, str) else (
            tuple(pattern) if pattern else None),
        rank_pattern=_pattern(file, meta, "rank_pattern", integer=True),
        alpha_pattern=_pattern(file, meta, "alpha_pattern", integer=False),
        bias=bias,
        lora_bias=_flag(file, meta, "lora_bias"),
        modules_to_save=modules_to_save,  # type: ignore[arg-type]
        task_type=meta.get("task_type") if isinstance(meta.get("task_type"), str) else None,
    )
