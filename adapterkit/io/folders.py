"""The public save and load: which kind of folder a path is, and the code that reads it.

``load_adapters`` takes a folder written by ``save_adapters`` (one set, ``checkpoint.py``), a
model folder whose ``save_pretrained`` held adapters (every set, ``bundle.py``), or a peer's
adapter folder (PEFT's LoRA, ``peft.py``). The kinds of folder with an ``adapter_config.json``
are the rows of ``FORMATS``: each says how to tell its config and how to load it, so that a
new one is one row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from torch import nn

from ..errors import AdapterFileError
from ..tree import set_names, unwrapped, wrapper_chain
from .adapterfile import CONFIG_FILE, FORMAT, read_adapter_config
from .bundle import SUBDIR, is_bundle, load_bundle, read_index
from .checkpoint import load_set, save_set
from .peft import is_peft_config, load_peft
from .peft import set_names_of as peft_set_names
from .peft_write import save_peft


class Format(NamedTuple):
    """A kind of adapter folder ``load_adapters`` reads, told by its ``adapter_config.json``."""

    name: str
    expects: str  # what its config holds, for the error that lists every kind
    recognise: Callable[[dict], bool]
    load: Callable[[nn.Module, Path, str | None], object]
    new_sets: Callable[[Path, str | None], Iterable[str]]  # the set names loading would use


def _adapterkit_sets(path: Path, name: str | None) -> list[str]:
    return [read_adapter_config(path)["name"] if name is None else name]


FORMATS: tuple[Format, ...] = (
    Format("adapterkit", f'"format": "{FORMAT}" (adapterkit.save_adapters)',
           lambda meta: meta.get("format") == FORMAT, load_set, _adapterkit_sets),
    Format("PEFT", '"peft_type" (PEFT\'s save_pretrained; LoRA is read)', is_peft_config,
           load_peft, peft_set_names),
)


def folder_format(path: Path) -> Format:
    """The row of ``FORMATS`` whose config ``path/adapter_config.json`` is.

    Raises:
        AdapterFileError: the file is not JSON, or no row (or more than one) recognises it;
            the message names the file and what each kind of folder holds.
    """
    file = path / CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file} is damaged: not valid JSON ({err})") from None
    found = [f for f in FORMATS if isinstance(meta, dict) and f.recognise(meta)]
    if len(found) == 1:
        return found[0]
    fields = sorted(meta)[:8] if isinstance(meta, dict) else type(meta).__name__
    expected = "; ".join(f"{f.name}: {f.expects}" for f in FORMATS)
    what = (f"looks like more than one kind ({', '.join(f.name for f in found)})" if found
            else f"is no adapter config this adapterkit reads (it has {fields})")
    raise AdapterFileError(f"{file} {what}; expected exactly one of: {expected}")


def save_adapters(
    model: nn.Module,
    path: str | os.PathLike[str],
    name: str = "default",
    include: Sequence[str] | None = None,
    format: Literal["adapterkit", "peft"] = "adapterkit",
) -> Path:
    """Write adapter set ``name`` (and the modules ``include`` selects) to directory ``path``.

    ``format="peft"`` writes PEFT's LoRA folder instead (what ``PeftModel.from_pretrained``
    and LoRA serving engines load), for a set of identity-activation adapters on Linear or
    Conv1D layers; the included modules become ``modules_to_save``. A set PEFT cannot
    express exactly is refused with the reason (see ``docs/interop-peft.md``).

    ``include`` names modules saved with the set, such as a head trained beside the adapters
    (an included module's own adapters stay out: sets are saved as sets). The default,
    None, takes the modules recorded for the set (``AdapterCheckpointCallback`` records its
    ``include``), else none, and refuses when the last freeze spec trains modules the file
    would not hold; ``include=[]`` saves the adapters alone without asking.

    The directory gets ``adapter_config.json`` and ``adapter_model.safetensors``. The write
    goes to a temporary directory first and is renamed into place, so an interrupted save
    leaves an earlier save at ``path`` intact. A directory at ``path`` that holds other
    files is refused rather than replaced.

    Under ``torch.distributed`` every rank must call it (sharded tensors are gathered);
    rank 0 writes, and every rank returns once the files are written. A
    ``DistributedDataParallel`` wrapper and ``torch.compile``'s are seen through: the file is
    the one the model inside gives, and loads into the model or a compiled one alike.

    Raises:
        ValueError: set ``name`` is not in the model; ``include`` selects nothing; the freeze
            spec trains modules outside the file (``include=None``); BatchNorm statistics
            moved that the file would not hold; ``format="peft"`` for a set PEFT cannot
            express; an unknown ``format``. Nothing is written then.

    Example:
        >>> import tempfile, torch, adapterkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> _ = adapterkit.inject(model, ["0"], adapterkit.AdapterConfig(bottleneck=4))
        >>> out = adapterkit.save_adapters(model, tempfile.mkdtemp() + "/a", include=["1"])
        >>> sorted(p.name for p in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> lora = adapterkit.AdapterConfig(bottleneck=2, activation="identity",
        ...                                 placement="parallel")
        >>> _ = adapterkit.inject(model, ["1"], lora, name="lora")
        >>> out = adapterkit.save_adapters(model, tempfile.mkdtemp() + "/lora", "lora",
        ...                                format="peft")
        >>> import json; meta = json.loads((out / "adapter_config.json").read_text())
        >>> meta["peft_type"], meta["r"], meta["target_modules"]
        ('LORA', 2, ['1'])
    """
    writers = {"adapterkit": save_set, "peft": save_peft}
    if format not in writers:
        raise ValueError(f"save_adapters: format must be one of {sorted(writers)}, got "
                         f"{format!r}")
    # names and base class are those of the model itself, not of a wrapper around it
    return writers[format](unwrapped(model), Path(path), name, include)


def load_adapters(
    model: nn.Module, path: str | os.PathLike[str], name: str | None = None
) -> nn.Module:
    """Load a saved adapter set into ``model``, injecting it first if it is not there.

    ``path`` is a folder ``save_adapters`` wrote, a model folder whose ``save_pretrained``
    held adapters (every set), or PEFT's LoRA folder (``adapter_config.json`` with
    ``peft_type``), which loads as a set of identity-activation parallel adapters named after
    the folder (see ``docs/interop-peft.md``). ``name`` renames the set (default: the saved
    name). Weights are cast to the dtype and
    device of the adapters they load into. A model under ``torch.compile`` gets the set in
    the model inside, and is returned as given. Every check (format, config, base
    fingerprint, keys, shapes) runs before the model changes; on any error the model is as it
    was. Under ``torch.distributed``, load into the unsharded model, then wrap it (into a
    ``DistributedDataParallel`` wrapper, only sets it already holds load). A fusion set
    (``fuse``) loads onto the slots of its fused sets, which must be in the model already.

    Example:
        >>> import tempfile, torch, adapterkit
        >>> def make():
        ...     return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).eval()
        >>> model = adapterkit.inject(make(), ["0"], adapterkit.AdapterConfig(init="normal"))
        >>> where = adapterkit.save_adapters(model, tempfile.mkdtemp() + "/a")
        >>> fresh = make()
        >>> fresh.load_state_dict({k: v for k, v in model.state_dict().items()
        ...                        if ".adapterkit." not in k})  # the trained base weights
        <All keys matched successfully>
        >>> fresh = adapterkit.load_adapters(fresh, where)
        >>> x = torch.randn(3, 8)
        >>> bool(torch.equal(fresh(x), model(x)))
        True
    """
    path, chain = Path(path), wrapper_chain(model)
    inner, bundle = chain[-1], not (path / CONFIG_FILE).exists() and is_bundle(path)
    kind = None if bundle else (
        folder_format(path) if (path / CONFIG_FILE).exists() else FORMATS[0])
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in chain):
        _check_no_new_set(inner, path, name, kind)
    if kind is None:
        load_bundle(inner, path, name)  # a folder written by save_pretrained
    else:
        kind.load(inner, path, name)
    return model


def _check_no_new_set(model: nn.Module, path: Path, name: str | None,
                      kind: Format | None) -> None:
    """DDP's reducer knows the parameters it was built with: a set injected into the model
    inside it would train on each rank apart, its gradients never averaged."""
    if kind is None:
        saved = read_index(path / SUBDIR)["sets"]
        names = [name] if name is not None and len(saved) == 1 else saved
    else:
        names = list(kind.new_sets(path, name))
    new = [n for n in names if n not in set_names(model)]
    if new:
        raise ValueError(
            f"cannot load {path} into a model that DistributedDataParallel already wraps: set(s) "
            f"{new} would be injected outside its gradient reducer, and their gradients never "
            "averaged across ranks. Load into the model first, then wrap it "
            "(DistributedDataParallel(load_adapters(model, path))), or inject the set(s) "
            "before wrapping and load into them"
        )
