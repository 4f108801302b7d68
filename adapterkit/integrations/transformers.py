"""transformers' ``Trainer`` with adapters: ``AdapterCheckpointCallback``.

Needs the ``hf`` extra (``transformers``, and ``accelerate`` for ``Trainer``). The engine never
imports this module; what adapterkit does to a transformers model on its own
(``save_pretrained`` keeps the adapters, gradients under reentrant checkpointing) is in the
engine (``adapterkit/io/bundle.py``, ``adapterkit/freezing.py``). See ``docs/transformers.md``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .. import state as model_state
from ..io import load_adapters
from ..io.bundle import SUBDIR, is_bundle, read_index, save_bundle
from ..io.includes import as_include, included_modules, resolve_include
from ..tree import set_names, unwrapped

__all__ = ["AdapterCheckpointCallback"]


def _run_id(state: Any) -> str | None:
    """The run id our callback left in a ``TrainerState`` (or its JSON), if any."""
    callbacks = state.get("stateful_callbacks") if isinstance(state, dict) else getattr(
        state, "stateful_callbacks", None)
    entry = (callbacks or {}).get("AdapterCheckpointCallback")
    entry = entry[0] if isinstance(entry, list) and entry else entry
    attributes = entry.get("attributes") if isinstance(entry, dict) else None
    return attributes.get("run_id") if isinstance(attributes, dict) else None


def _resumed_from(checkpoint: Path, state: TrainerState) -> bool:
    """Whether training resumes from ``checkpoint``. A callback is not told the path that
    ``train(resume_from_checkpoint=...)`` got; the Trainer restored ``state`` from it, and our
    run id in there must equal the one in ``checkpoint``'s saved state, so that a folder of
    the same step from another run is never taken for it."""
    try:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    ours = _run_id(state)
    return (ours is not None and _run_id(saved) == ours
            and saved.get("global_step") == state.global_step)


class AdapterCheckpointCallback(TrainerCallback, ExportableState):
    """Save the adapters at every ``Trainer`` checkpoint and at the end; restore on resume.

    At each checkpoint every adapter set goes to ``<output_dir>/checkpoint-<step>/adapterkit/``
    and, when training ends, to ``<output_dir>/adapterkit/`` (with ``save_adapters``; the
    layout is in ``docs/format.md``). The modules that ``include`` selects, such as a
    classifier trained beside the adapters, are saved with set ``name``; the default, None,
    takes the modules recorded for the set (else none), and ``include=[]`` saves the adapters
    alone. Either folder loads back with
    ``adapterkit.load_adapters(model, folder_above_adapterkit)``.

    At the start of training the set's ``include`` is checked and recorded on the model:
    with ``include=None``, a freeze spec that trains modules outside it (``train=["adapters",
    "classifier"]``) is an error there, naming the modules and both fixes; once recorded,
    ``model.save_pretrained`` (``trainer.save_model()``) and ``save_adapters`` without
    ``include`` save the set with the same modules, so the usual last line does not undo
    the callback's end-of-training folder.

    When ``trainer.train(resume_from_checkpoint=...)`` resumes from one of this run's
    checkpoints in ``output_dir`` (recognised by a run id the Trainer keeps in
    ``trainer_state.json``), the adapters and included modules are loaded back from its
    ``adapterkit/`` folder, in place, so the optimizer's parameters stay the model's; from any
    other checkpoint, transformers' own load of ``model.safetensors`` (adapter keys included)
    restores them. At the start of training the model must already hold set ``name`` (and
    every set of the checkpoint): adapters injected later would be outside the optimizer and
    never train, so that is an error.

    Example:
        >>> import tempfile, torch, transformers, adapterkit
        >>> from pathlib import Path
        >>> from adapterkit.integrations.transformers import AdapterCheckpointCallback
        >>> config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                                  num_attention_heads=2, intermediate_size=32)
        >>> model = adapterkit.inject(transformers.BertForSequenceClassification(config), "auto")
        >>> _ = adapterkit.freeze(model, train=["adapters", "classifier"])
        >>> data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)}
        ...         for i in range(8)]
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), max_steps=2, save_steps=1,
        ...                                       report_to=[], use_cpu=True, disable_tqdm=True)
        >>> trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=[
        ...     AdapterCheckpointCallback(include=["classifier"])])
        >>> trainer.remove_callback(transformers.PrinterCallback)  # quiet, for this doctest
        >>> _ = trainer.train()
        >>> saved = Path(args.output_dir) / "checkpoint-2" / "adapterkit"
        >>> sorted(p.name for p in saved.iterdir())
        ['default', 'sets.json']
    """

    def __init__(self, name: str = "default", include: Sequence[str] | None = None) -> None:
        self.name = name
        self.include = None if include is None else as_include(include)
        # saved in every checkpoint's trainer_state.json, to recognise this run's checkpoints
        self.run_id = uuid.uuid4().hex

    def state(self) -> dict[str, Any]:
        """What the Trainer stores in ``trainer_state.json`` (``ExportableState``)."""
        include = None if self.include is None else list(self.include)
        return {"args": {"name": self.name, "include": include},
                "attributes": {"run_id": self.run_id}}

    def _save(self, args: TrainingArguments, model: nn.Module, directory: Path) -> None:
        if args.should_save:  # the process that writes Trainer's own files, and only it
            save_bundle(unwrapped(model), directory)  # with the includes train begin recorded

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        model = unwrapped(model)  # type: ignore[arg-type]
        held = set_names(model)
        if self.name not in held:
            raise ValueError(
                f"AdapterCheckpointCallback saves set {self.name!r}, but the model holds "
                f"{held}: inject (or load_adapters) before creating the Trainer, so that "
                "the optimizer gets the adapters"
            )
        # a name that selects nothing, or a trained module the saves would drop, fails now,
        # not at a save
        include = resolve_include(model, self.name, self.include, "AdapterCheckpointCallback")
        included_modules(model, include)
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and is_bundle(checkpoint) and _resumed_from(checkpoint, state):
            missing = [s for s in read_index(checkpoint / SUBDIR)["sets"] if s not in held]
            if missing:
                raise ValueError(
                    f"{checkpoint} holds adapter sets {missing} that the model lacks; inject "
                    "them before creating the Trainer, so that the optimizer gets them"
                )
            load_adapters(model, checkpoint)
            self.run_id = _run_id(state)  # later checkpoints belong to the same run
        model_state.set_includes(model, self.name, include)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._save(args, model, folder)  # type: ignore[arg-type]

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        self._save(args, model, Path(args.output_dir))  # type: ignore[arg-type]
