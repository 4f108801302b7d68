"""The adapter file format on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading validates every field (``docs/format.md``) and never unpickles: tensors come only
through safetensors. Writing goes to a temporary sibling directory that is renamed into place,
so an interrupted save leaves an earlier one intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import AdapterConfig, FreezeSpec, FusionConfig
from ..errors import AdapterFileError
from ..layout import Layout
from .owned import read_owned

FORMAT = "adapterkit"
# 2 added "layouts"; 3 added fusion sets; 4 added a set's own modules ("owned"); 5 added a
# layout's own "d_in" and "bottleneck" (a parallel adapter on a Linear of another output width;
# per-module ranks). A file is written with the oldest version that holds it (5 where a layout
# has those, 4 with own modules, 3 for a fusion, else 2), so that older readers keep reading
# what they can.
FORMAT_VERSION = 5
LAYOUT_VERSION = 5  # the first version whose layouts may hold "d_in" and "bottleneck"
_LAYOUT_FIELDS = {"d_model", "feature_dim"}
_LAYOUT_EXTRA = {"d_in", "bottleneck"}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_FIELDS = {"format", "format_version", "name", "config", "targets", "include", "freeze", "base"}
# layouts: absent from version 1 files (the layouts are inferred again); owned: the set's own
# modules (adapterkit.own), in version 4 files that have any
_OPTIONAL = {"layouts", "owned"}


def config_json(config: AdapterConfig | FusionConfig) -> dict[str, Any]:
    return {"fusion": config.to_dict()} if isinstance(config, FusionConfig) else config.to_dict()


def config_from_json(data: object) -> AdapterConfig | FusionConfig:
    if isinstance(data, dict) and set(data) == {"fusion"}:
        return FusionConfig.from_dict(data["fusion"])
    return AdapterConfig.from_dict(data)  # type: ignore[arg-type]


def write_on_rank_zero(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    # Every rank returns only once rank 0's write is done, so that no rank reads the directory
    # before it is there, and a write that fails on rank 0 fails on every rank (rather than
    # leaving the others blocked in their next collective).
    dist = torch.distributed
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            write_atomically(path, meta, tensors)
        except Exception as err:  # re-raised below, once every rank knows
            error = err
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"save_adapters failed on rank 0, which writes the files: {status[0]}")
    return path


def write_atomically(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    ours = {CONFIG_FILE, WEIGHTS_FILE}
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory; give a directory path")
        others = sorted(p.name for p in path.iterdir() if p.name not in ours)
        if others:
            raise FileExistsError(
                f"{path} holds other files ({', '.join(others[:5])}); save adapters into a new "
                "or empty directory, or one written by save_adapters"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for f in ours:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, old / "previous")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_adapter_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``adapter_config.json`` of an adapter directory."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found; give a directory written by adapterkit.save_adapters, or a "
            "model folder whose save_pretrained held adapters (it has adapterkit/sets.json)"
        )
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file} is damaged: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{file} is not an adapterkit adapter config (no format "
                               f"'{FORMAT}')")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{file} has format_version {version!r}; this adapterkit reads versions up to "
            f"{FORMAT_VERSION}: upgrade adapterkit to load it"
        )
    unknown = sorted(set(meta) - _FIELDS - _OPTIONAL)
    missing = sorted(_FIELDS - set(meta))
    if unknown or missing:
        raise AdapterFileError(
            f"{file}: unknown field(s) {unknown}, missing field(s) {missing}; "
            f"expected exactly {sorted(_FIELDS)}"
        )
    try:
        meta["config"] = config_from_json(meta["config"])
        meta["freeze"] = None if meta["freeze"] is None else FreezeSpec.from_dict(meta["freeze"])
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{file}: {err}") from None
    meta["owned"] = read_owned(meta.get("owned"), file)
    if not (isinstance(meta["targets"], list) and (meta["targets"] or meta["owned"])
            and all(isinstance(t, str) for t in meta["targets"])):
        raise AdapterFileError(f"{file}: 'targets' must be a list of module names, non-empty "
                               "unless the set owns modules ('owned')")
    meta["layouts"] = read_layouts(meta.get("layouts"), meta["targets"], file, version)
    return meta


def layout_json(layout: Layout) -> dict[str, int]:
    """A layout as the file holds it: ``d_in`` and ``bottleneck`` only where they are set."""
    extra = {k: getattr(layout, k) for k in sorted(_LAYOUT_EXTRA) if getattr(layout, k)}
    return {"d_model": layout.d_model, "feature_dim": layout.feature_dim, **extra}


def read_layouts(raw: object, targets: list[str], file: Path,
                 version: int = FORMAT_VERSION) -> dict[str, Layout] | None:
    if raw is None:
        return None
    allowed = _LAYOUT_FIELDS | (_LAYOUT_EXTRA if version >= LAYOUT_VERSION else set())

    def valid(entry: object) -> bool:
        return (isinstance(entry, dict) and _LAYOUT_FIELDS <= set(entry) <= allowed
                and all(isinstance(v, int) and not isinstance(v, bool) for v in entry.values())
                and all(entry[k] > 0 for k in entry if k != "feature_dim"))

    if not isinstance(raw, dict) or set(raw) != set(targets) or not all(
            valid(v) for v in raw.values()):
        extra = (", and from version 4 on optionally \"d_in\": int > 0, \"bottleneck\": "
                 "int > 0" if version >= LAYOUT_VERSION else "")
        raise AdapterFileError(
            f"{file}: 'layouts' must map every target to {{\"d_model\": int > 0, "
            f"\"feature_dim\": int{extra}}}"
        )
    return {t: Layout(v["d_model"], v["feature_dim"], v.get("d_in"), v.get("bottleneck"))
            for t, v in raw.items()}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; the adapter directory is incomplete")
    try:
        return load_file(str(file))  # parses a JSON header and raw bytes; never unpickles
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(
            f"{file} is not a valid safetensors file ({err}); adapter weights are read only "
            "from safetensors written by save_adapters"
        ) from None
