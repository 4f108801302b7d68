"""Where the module paths of a PEFT folder are in the model it is loaded into, and which of
the model's modules PEFT's config selects.

PEFT names a module by its path in the model PEFT was given (``base_model.model.<path>``). The
model ``load_adapters`` gets may be that model, the same with a head around it (PEFT had
``BertModel``: ``encoder...``; the model is ``BertForSequenceClassification``: ``bert.encoder
...``) or without it (the reverse), as transformers' ``base_model_prefix`` says; and a folder
saved against transformers 4 may name modules that transformers 5 renamed (ViT's
``encoder.layer.0.attention.attention.query`` is now ``layers.0.attention.q_proj``), which
transformers 5 itself maps when it loads an old checkpoint. A ``Frame`` is one such reading;
``frames`` lists them in the order they are tried.

The renaming is transformers' own (``conversion_mapping.get_model_conversion_mapping``), looked
up in ``sys.modules`` only when the model is a transformers model: the engine never imports
transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import AdapterFileError
from ..layout import linear_like
from ..tree import candidates, is_pretrained
from .peft_config import EMBEDDING, LoraSpec, conv_lora


def _join(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if prefix and rest else prefix or rest


@dataclass(frozen=True)
class Frame:
    """PEFT's path ``peft + rest`` is this model's ``model + rest``, renamed by ``rename``
    (a parameter key of transformers 4 -> the model's) where it is set."""

    peft: str = ""
    model: str = ""
    rename: Callable[[str], str] | None = None

    def _moved(self, path: str) -> str | None:
        if self.peft and path != self.peft and not path.startswith(self.peft + "."):
            return None
        return _join(self.model, path[len(self.peft):].lstrip("."))

    def param(self, key: str) -> str | None:
        """The model's parameter key for PEFT's parameter key ``key``."""
        moved = self._moved(key)
        return moved if moved is None or self.rename is None else self.rename(moved)

    def module(self, path: str) -> str | None:
        """The model's module path for PEFT's module path ``path``."""
        if self.rename is None:
            return self._moved(path)
        key = self.param(path + ".weight")  # renamings are written for parameter keys
        return None if key is None else key.removesuffix(".weight")

    def to_peft(self, name: str) -> str | None:
        """The path PEFT gave this model's module ``name``: None outside PEFT's model, for the
        model PEFT was given itself (which PEFT never targets), and where names were renamed
        (transformers 4's names of modules are not known)."""
        if self.rename is not None:
            return None
        if self.model and name != self.model and not name.startswith(self.model + "."):
            return None
        return _join(self.peft, name[len(self.model):].lstrip(".")) or None


def _renaming(model: nn.Module) -> Callable[[str], str] | None:
    """transformers 5's renaming of transformers 4 checkpoint keys for this model, if any."""
    mapping = sys.modules.get("transformers.conversion_mapping")
    loading = sys.modules.get("transformers.core_model_loading")
    if mapping is None or loading is None or not is_pretrained(model):
        return None
    try:
        renamings = [c for c in mapping.get_model_conversion_mapping(model)
                     if isinstance(c, loading.WeightRenaming)]
    except Exception:  # noqa: BLE001 -- an older or newer transformers: no renaming known
        return None
    if not renamings:
        return None

    def rename(key: str) -> str:
        return loading.rename_source_key(key, renamings, [])[0]

    return rename


def frames(model: nn.Module) -> list[Frame]:
    """The readings of PEFT's paths in ``model``, in the order they are tried: as they are,
    under or without ``base_model_prefix``, then each with transformers' renaming."""
    found = [Frame()]
    prefix = getattr(model, "base_model_prefix", "")
    if isinstance(prefix, str) and prefix:
        if isinstance(getattr(model, prefix, None), nn.Module):
            found.append(Frame("", prefix))  # saved from the bare model, loaded into a head
        found.append(Frame(prefix, ""))  # saved from a model with a head, into the bare one
    rename = _renaming(model)
    if rename is not None:
        found += [Frame(f.peft, f.model, rename) for f in found]
    return found


# -- which modules PEFT's config selects -------------------------------------------------


def kind_error(path: str, module: nn.Module, file: Path) -> AdapterFileError | None:
    """Why LoRA on ``module`` is not an adapter's branch (None: a Linear or Conv1D)."""
    cls = type(module).__name__
    if linear_like(module):
        return None
    if isinstance(module, nn.Embedding):
        what = EMBEDDING
    elif isinstance(module, _ConvNd):
        what = conv_lora(cls)
    else:
        what = f"LoRA on a {cls}"
    return AdapterFileError(
        f"{file} puts {what} on '{path}'; adapterkit reads LoRA on nn.Linear and transformers' "
        "Conv1D only, where it is exactly a parallel adapter. Load this adapter with PEFT itself"
    )


def _all_linear(spec: LoraSpec, model: nn.Module, names: dict[str, str]) -> tuple[str, ...]:
    """PEFT's 'all-linear': every Linear and Conv1D, less the output embedding (or, for
    task_type SEQ_CLS, the classifier)."""
    modules = dict(candidates(model))
    out = {p for p, q in names.items() if linear_like(modules[q])}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None and spec.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in ("score", "classifier")
                     if isinstance(getattr(model, n, None), nn.Module)), None)
    return tuple(p for p in out if head is None or modules[names[p]] is not head)


def check_targets(spec: LoraSpec, model: nn.Module, frame: Frame, weighted: Collection[str],
                  meta: dict, file: Path) -> None:
    """The modules PEFT's config selects are those the file holds LoRA weights for: PEFT
    would give a selected module without weights fresh ones, and ignore weights of a module
    it does not select. Where names were renamed since transformers 4, only the file's own
    modules can be checked (the old names of the others are not known)."""
    wanted = meta.get("target_modules")
    if wanted is None:
        return  # PEFT's per-architecture default: the file's keys say which modules
    modules = dict(candidates(model))
    names = {p: q for q in modules if (p := frame.to_peft(q)) is not None}
    if isinstance(wanted, str) and wanted.lower() == "all-linear":
        if frame.rename is not None:
            return
        spec = replace(spec, target_modules=_all_linear(spec, model, names))
    selected = [p for p in names if spec.targets(p)]
    for path in selected:
        if (err := kind_error(path, modules[names[path]], file)) is not None:
            raise err
    unweighted = [p for p in selected if p not in weighted]
    unmatched = [p for p in weighted if not spec.targets(p)]
    if unweighted or unmatched:
        raise AdapterFileError(
            f"{file} does not fit its own config on this model: "
            + "; ".join(part for part in (
                f"target_modules etc. select {unweighted[:4]}, which the weights file has no "
                "LoRA weights for (PEFT would give them fresh ones)" if unweighted else "",
                f"the weights file has LoRA weights for {unmatched[:4]}, which the config does "
                "not select (PEFT would ignore them)" if unmatched else "") if part)
        )
