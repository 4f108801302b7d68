"""What adapterkit does to a transformers model, without importing transformers.

Two hooks, installed by adapterkit's own calls and removed when the last set is ejected:

- ``save_pretrained`` keeps the adapters. ``inject`` / ``load_adapters`` on a
  ``PreTrainedModel`` set an instance attribute over the class's method: it runs the method,
  then writes every set under ``<dir>/adapterkit/`` (see ``adapterkit/bundle.py``), so that
  ``from_pretrained(d)`` followed by ``adapterkit.load_adapters(model, d)`` is the trained
  model again. ``Trainer.save_model`` and Trainer checkpoints call ``save_pretrained`` too.
- Gradients reach adapters under reentrant gradient checkpointing. A reentrant checkpoint
  whose inputs do not require grad gives nothing inside it a gradient; with a frozen
  embedding, nothing does. ``freeze`` makes the input embeddings' output require grad while
  adapters train and a module has ``gradient_checkpointing`` on (as PEFT's
  ``enable_input_require_grads``; transformers does it itself only for models whose input is
  ``input_ids``, not for ViT's ``pixel_values``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

from ..bundle import check_saveable, save_bundle
from ..tree import set_names

_HOOKED = "save_pretrained"


def is_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (never imports transformers)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    cls = getattr(modeling, "PreTrainedModel", None)
    return cls is not None and isinstance(model, cls)


class SavePretrained:
    """``model.save_pretrained`` that also writes the adapters to ``<dir>/adapterkit/``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if set_names(model):
            check_saveable(model)  # before transformers writes anything
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        is_main = kwargs.get("is_main_process", args[0] if args else True)
        if is_main and set_names(model):
            save_bundle(model, save_directory)
        return result


def install_save_hook(model: nn.Module) -> None:
    if is_pretrained(model) and not isinstance(model.__dict__.get(_HOOKED), SavePretrained):
        model.__dict__[_HOOKED] = SavePretrained(model)


class RequireGradWhileCheckpointing:
    """Forward hook on an input embedding: its output requires grad while gradient
    checkpointing is on, so that a reentrant checkpoint above it passes gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.checkpointing = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if (isinstance(output, torch.Tensor) and torch.is_grad_enabled()
                and not output.requires_grad
                and any(m.gradient_checkpointing for m in self.checkpointing)):
            output.requires_grad_(True)


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embeddings of ``model`` and of the transformers models inside it."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if not is_pretrained(module):
            continue
        try:
            embedding = module.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embedding, nn.Module):
            found.setdefault(id(embedding), embedding)
    return list(found.values())


def require_input_grads(model: nn.Module, wanted: bool) -> None:
    """Install (``wanted``) or remove the ``RequireGradWhileCheckpointing`` hooks."""
    for module in model.modules():
        hooks = module._forward_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, RequireGradWhileCheckpointing)]:
            del hooks[key]
    if not wanted or not is_pretrained(model):
        return
    hook = RequireGradWhileCheckpointing(model)
    for embedding in _input_embeddings(model):
        if not any(p.requires_grad for p in embedding.parameters()):
            embedding.register_forward_hook(hook)


def remove_hooks(model: nn.Module) -> None:
    """Take out everything this module installed on ``model`` (the last set was ejected)."""
    if isinstance(model.__dict__.get(_HOOKED), SavePretrained):
        del model.__dict__[_HOOKED]
    require_input_grads(model, False)
