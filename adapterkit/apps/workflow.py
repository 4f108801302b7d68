"""The seed's workflows as data: demo sizes, the adapter recipe, and the regimes compared.

``adapterkit demo`` and ``benchmarks/transfer.py`` both run ``run_regime`` for every regime of
``REGIMES``, from one pretrained base that ``pretrained_base`` trains once and caches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit

from ..config import AdapterConfig
from ..models.gpt import GPT
from ..training import bits, cosine_schedule, evaluate, train, train_two_phase
from .data import (
    Corpus,
    as_tokens,
    default_corpora,
    eval_windows,
    random_windows,
    read_text_file,
)

CACHE_ENV = "ADAPTERKIT_CACHE_DIR"
Bar = Callable[[int, str], Any]  # bar(total, description) -> a context manager with update()


@dataclass(frozen=True)
class Size:
    """The model and the step counts of one demo size."""

    d_model: int
    layers: int
    heads: int
    context: int
    batch: int
    pretrain_steps: int
    adapt_steps: int
    pretrain_lr: float = 2e-3
    eval_windows: int = 128  # validation windows per corpus
    evals: int = 8  # points on each validation curve after step 0

    def model(self, seed: int) -> GPT:
        torch.manual_seed(seed)
        # dropout 0: runs this short underfit rather than overfit, and train mode stays
        # deterministic, so an adapter at zero init is the exact identity
        return GPT(vocab_size=256, d_model=self.d_model, max_length=self.context,
                   num_heads=self.heads, dff=4 * self.d_model, dropout=0.0, N=self.layers)


SIZES: dict[str, Size] = {
    # for tests: seconds
    "tiny": Size(d_model=32, layers=1, heads=2, context=32, batch=8, pretrain_steps=30,
                 adapt_steps=12, eval_windows=8, evals=2),
    # --quick: under 90 s on 2 CPU cores, pretraining included
    "quick": Size(d_model=64, layers=2, heads=4, context=64, batch=16, pretrain_steps=600,
                  adapt_steps=150, eval_windows=64, evals=5),
    # the 4-layer d=128 byte-level GPT
    "default": Size(d_model=128, layers=4, heads=4, context=64, batch=16, pretrain_steps=2000,
                    adapt_steps=400),
}


@dataclass(frozen=True)
class Recipe:
    """How adapters are built and trained; the regimes share it.

    The default is the recipe ``benchmarks/transfer.py`` found best within 5% trainable
    parameters (adapters + head): scaled parallel adapters (He et al. 2022) on the
    feed-forward blocks only, bottleneck 8, scaling 4, trained at 3e-3.
    """

    adapter: AdapterConfig = AdapterConfig(bottleneck=8, placement="parallel", scaling=4.0,
                                           dropout=0.0)
    targets: tuple[str, ...] = ("ffn_block",)
    lr_full: float = 1e-3  # full fine-tuning: the backbone is pretrained, so gentler
    lr_adapter: float = 3e-3  # adapters and head: few, freshly initialised parameters
    train_norms: bool = False  # also train the blocks' LayerNorms (Houlsby et al. do)

    def with_adapter(self, **changes: Any) -> Recipe:
        return replace(self, adapter=replace(self.adapter, **changes))


@dataclass(frozen=True)
class Regime:
    """One way to adapt: which base, with or without adapters, what trains."""

    name: str
    base: Literal["pretrained", "random"]
    adapters: bool
    train: tuple[str, ...] | None  # freeze-spec entries; None: every parameter
    warmup: float = 0.0  # workflow B: share of the steps that train everything first


REGIMES: tuple[Regime, ...] = (
    Regime("no adaptation", "pretrained", adapters=False, train=()),
    Regime("full fine-tuning", "pretrained", adapters=False, train=None),
    Regime("head only", "pretrained", adapters=False, train=("cls",)),
    Regime("adapters only", "pretrained", adapters=True, train=("adapters",)),
    Regime("adapters + head", "pretrained", adapters=True, train=("adapters", "cls")),
    Regime("workflow B (from scratch)", "random", adapters=True, train=("adapters", "cls"),
           warmup=0.5),
    Regime("trap: adapters + head, random base", "random", adapters=True,
           train=("adapters", "cls")),
)
NORMS = ("layernorm1", "layernorm2")


# -- data and the cached base ------------------------------------------------------------


@dataclass
class Data:
    """Both corpora as token tensors, with fixed validation batches."""

    a: Corpus
    b: Corpus
    train_a: torch.Tensor
    train_b: torch.Tensor
    val_a: list[tuple[torch.Tensor, torch.Tensor]]
    val_b: list[tuple[torch.Tensor, torch.Tensor]]


def load_data(size: Size, data_a: str | None, data_b: str | None, cache: Path,
              progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda it, desc: it
              ) -> Data:
    """The corpora for a run: the given files, else the standard library's (cached)."""
    # The user's files first: a bad one fails before the slow extraction of the defaults.
    a = read_text_file(data_a, "A") if data_a is not None else None
    b = read_text_file(data_b, "B") if data_b is not None else None
    if a is None or b is None:
        default_a, default_b = default_corpora(cache, progress=lambda it: progress(
            it, "extracting corpora from the standard library"))
        a, b = a or default_a, b or default_b
    for corpus in (a, b):
        corpus.check_fits(size.context)
    return Data(a, b, as_tokens(a.train), as_tokens(b.train),
                eval_windows(as_tokens(a.val), size.context, size.eval_windows),
                eval_windows(as_tokens(b.val), size.context, size.eval_windows))


def cache_root(flag: str | None) -> Path:
    """``--cache-dir``, else ``$ADAPTERKIT_CACHE_DIR``, else the user's cache directory.

    Example:
        >>> cache_root("/tmp/ak-cache")
        PosixPath('/tmp/ak-cache')
    """
    if flag:
        return Path(flag)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "adapterkit"


def base_key(size: Size, corpus_a: Corpus, seed: int) -> str:
    """A hash of everything the pretrained base depends on."""
    fields = {k: v for k, v in asdict(size).items() if k not in ("adapt_steps", "evals",
                                                                  "eval_windows")}
    material = json.dumps({"data": hashlib.sha256(corpus_a.train).hexdigest(), "size": fields,
                           "seed": seed, "torch": torch.__version__.split("+")[0], "v": 1},
                          sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def pretrained_base(size: Size, data: Data, seed: int, cache: Path, bar: Bar = lambda n, d: NoBar()
                    ) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """The base pretrained on corpus A: from the cache if there, else trained and cached."""
    path = cache / f"base-{base_key(size, data.a, seed)}.safetensors"
    if path.is_file():
        return load_file(str(path)), path, True
    model = size.model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with bar(size.pretrain_steps, "pretraining on A") as progress:
        train(model, random_windows(data.train_a, size.batch, size.context, g),
              size.pretrain_steps, lr=size.pretrain_lr,
              schedule=cosine_schedule(size.pretrain_steps, ramp=min(100, size.pretrain_steps)),
              on_step=lambda _s, loss: _tick(progress, loss))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={"size": json.dumps(asdict(size)), "seed": str(seed)})
    os.replace(tmp, path)  # a concurrent run never sees half a file
    return state, path, False


def _tick(progress: Any, loss: float) -> None:
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.3f}", refresh=False)


# -- one regime ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one regime reached."""

    regime: str
    trainable: int
    total: int
    bpc_b: float
    bpc_a: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, B, A)
    seconds: float = 0.0
    step_seconds: float = 0.0  # median wall time of one training step
    model: nn.Module | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def build(regime: Regime, recipe: Recipe, size: Size, base: dict[str, torch.Tensor], seed: int
          ) -> nn.Module:
    """The model a regime starts from, injected and frozen as the regime says."""
    model = size.model(seed)
    if regime.base == "pretrained":
        model.load_state_dict(base)
    if regime.adapters:
        torch.manual_seed(seed + 2)  # adapter init independent of the model's
        adapterkit.inject(model, list(recipe.targets), recipe.adapter)
    if regime.train is not None and regime.train:
        entries = [*regime.train, *(NORMS if regime.adapters and recipe.train_norms else ())]
        adapterkit.freeze(model, train=entries)
    elif regime.train == ():
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def run_regime(regime: Regime, recipe: Recipe, size: Size, data: Data,
               base: dict[str, torch.Tensor], seed: int, bar: Bar = lambda n, d: NoBar(),
               steps: int | None = None, eval_at: Sequence[int] = ()) -> Outcome:
    """Adapt a fresh copy of the base to corpus B as ``regime`` says; evaluate on B and A.

    The curve has ``size.evals`` points after step 0, plus one at each step of ``eval_at``.
    """
    steps = size.adapt_steps if steps is None else steps
    model = build(regime, recipe, size, base, seed)
    every = max(1, steps // size.evals)
    extra = set(eval_at)

    def point(step: int) -> tuple[int, float, float]:
        return step, bits(evaluate(model, data.val_b)), bits(evaluate(model, data.val_a))

    curve = [point(0)]
    step_times: list[float] = []
    start = time.perf_counter()
    if regime.train != () and steps:
        g = torch.Generator().manual_seed(seed + 3)  # the same batches for every regime
        batches = random_windows(data.train_b, size.batch, size.context, g)
        lr = recipe.lr_full if regime.train is None else recipe.lr_adapter
        clock = [time.perf_counter()]
        with bar(steps, regime.name) as progress:
            def on_step(step: int, loss: float) -> None:
                step_times.append(time.perf_counter() - clock[0])
                _tick(progress, loss)
                if step % every == 0 or step == steps or step in extra:
                    curve.append(point(step))
                clock[0] = time.perf_counter()  # evaluation is not part of a step

            if regime.warmup:
                warm = round(steps * regime.warmup)
                train_two_phase(model, batches, warmup_steps=warm, adapt_steps=steps - warm,
                                freeze_spec={"train": list(regime.train or ())},
                                lr=recipe.lr_full, adapt_lr=lr, on_step=on_step)
            else:
                ramp = cosine_schedule(steps, ramp=min(50, steps), floor=1.0)  # then constant
                train(model, batches, steps, lr=lr, schedule=ramp, on_step=on_step)
    seconds = time.perf_counter() - start
    s = adapterkit.summary(model)
    step_times.sort()
    median = step_times[len(step_times) // 2] if step_times else 0.0
    return Outcome(regime.name, s.trainable, s.total, curve[-1][1], curve[-1][2], curve,
                   seconds, median, model)


class NoBar:
    """A progress bar that shows nothing: the default ``bar`` of ``run_regime``."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, **kwargs: object) -> None:
        return None


def gain_share(bpc: float, zero_shot: float, full: float) -> float:
    """Share of full fine-tuning's gain over no adaptation: 1 - (x - full) / (zero - full).

    Example:
        >>> gain_share(2.75, zero_shot=3.25, full=2.25)  # half of full fine-tuning's gain
        0.5
    """
    return 1 - (bpc - full) / (zero_shot - full) if zero_shot != full else math.nan

