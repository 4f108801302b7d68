"""One rank of the distributed tests: train adapters on this rank's shard of a global batch.

``tests/ecosystem/test_distributed.py`` launches it as users launch training::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/ecosystem/dist_worker.py --mode ddp --out DIR

and trains the same model on the whole batch in one process (``train(..., world=1)``) to
compare. Rank 0 writes what the test checks under ``DIR``: ``weights.safetensors`` (the
trained parameters, whole), ``report.json`` (losses and observations) and ``adapters/`` (the
``save_adapters`` output). Every assertion lives in the test; this file only observes.
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import adapterkit
from adapterkit.models.gpt import GPT

VOCAB, CONTEXT, BATCH, STEPS = 61, 12, 8, 4
TRAIN = ["adapters", "cls"]  # a frozen backbone; the head trains with the adapters
# Normal init: the adapters' down-projections get gradients from the first step on, so every
# trainable tensor is reduced (and compared) in every step.
CONFIG = adapterkit.AdapterConfig(bottleneck=8, dropout=0.0, init="normal", init_std=0.05)


def build_base(seed: int = 0) -> GPT:
    """The frozen backbone: dropout 0, so that a shard computes what the whole batch does."""
    torch.manual_seed(seed)
    return GPT(vocab_size=VOCAB, d_model=32, max_length=16, num_heads=4, dff=48, dropout=0.0, N=2)


def build_model(seed: int = 0) -> GPT:
    model = adapterkit.inject(build_base(seed), ["mha_block", "ffn_block"], CONFIG)
    adapterkit.freeze(model, train=TRAIN)
    return model


def global_batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=g) for _ in range(steps)]


def lm_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    # Mean over the shard's tokens; shards hold equal token counts, so the mean over ranks
    # (what DDP and FSDP do to gradients) is the mean over the whole batch.
    logits = model(window[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    rank: int = 0,
    world: int = 1,
    steps: int = STEPS,
    on_step: Callable[[torch.Tensor], float] | None = None,
) -> list[float]:
    """Adam over ``params`` on shard ``rank`` of ``world`` of each global batch; the losses."""
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for window in global_batches(steps):
        loss = lm_loss(model, window.chunk(world)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(on_step(loss) if on_step else loss.item())
    return losses


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a sharded one (a collective: every rank must call it)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def mean_over_ranks(loss: torch.Tensor) -> float:
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def gathered(value: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# -- DDP ------------------------------------------------------------------------------------


def run_ddp(model: GPT, rank: int, world: int, report: dict) -> nn.Module:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    names = {id(p): n for n, p in model.named_parameters()}
    reduced: set[str] = set()

    def record(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations
        reduced.update(names[id(p)] for p in bucket.parameters())
        return default_hooks.allreduce_hook(None, bucket)  # what DDP does without a hook

    ddp = nn.parallel.DistributedDataParallel(model)  # no find_unused_parameters, no flags
    ddp.register_comm_hook(None, record)
    report["inject_error"] = _error(lambda: adapterkit.inject(ddp, ["cls"], name="late"))
    report["losses"] = train(ddp, adapterkit.trainable_parameters(model), rank, world,
                             on_step=mean_over_ranks)
    report["reduced"] = sorted(reduced)
    report["grads_equal_on_ranks"] = all(
        torch.equal(g, gathered(g)[0])
        for g in (p.grad for p in model.parameters() if p.grad is not None)
    )
    return ddp


def probe_failed_save(wrapped: nn.Module, out: Path, report: dict) -> None:
    """A save that fails on rank 0, which writes, must fail on every rank."""
    blocker = out / "a_file"
    if dist.get_rank() == 0:
        blocker.write_text("not a directory")
    dist.barrier()
    try:
        adapterkit.save_adapters(wrapped, blocker, include=[])
        error = None
    except Exception as err:  # recorded for the test to judge
        error = f"{type(err).__name__}: {err}"
    report["failed_save"] = gathered(error)


# -- FSDP2 ----------------------------------------------------------------------------------


def shard(model: GPT) -> GPT:
    from torch.distributed.fsdp import fully_shard

    for block in model.decoder_blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def run_fsdp(model: GPT, rank: int, world: int, report: dict) -> nn.Module:
    shard(model)
    report["classes"] = [type(model).__name__, type(model.decoder_blocks[0]).__name__]
    report["sharded"] = sorted(
        n for n, p in model.named_parameters() if type(p.data).__name__ == "DTensor"
    )
    report["losses"] = train(model, adapterkit.trainable_parameters(model), rank, world,
                             on_step=mean_over_ranks)
    return model


def probe_fsdp_lifecycle(model: GPT, out: Path, report: dict) -> None:
    """What the lifecycle verbs do on the sharded model; run after the weights are saved."""
    window = global_batches(1)[0][:, :-1]
    report["adapters_keys"] = sorted(adapterkit.adapters(model))
    report["freeze_trainable"] = adapterkit.freeze(model, train=TRAIN).trainable
    report["inject_error"] = _error(lambda: adapterkit.inject(model, ["cls"], name="late"))
    report["load_error"] = _error(lambda: adapterkit.load_adapters(model, out / "adapters"))
    base_model = build_base()  # the frozen backbone, with the head as trained
    base_model.cls.load_state_dict({k: full(v) for k, v in model.cls.state_dict().items()})
    with torch.no_grad():
        with adapterkit.disabled(model):
            off = model(window)
        base = base_model(window)
        adapterkit.eject(model)
        ejected = model(window)
    report["disabled_is_base"] = float((off - base).abs().max())
    report["ejected_is_base"] = float((ejected - base).abs().max())
    report["ejected_keys_are_base"] = list(model.state_dict()) == list(build_base().state_dict())

    # fully_shard on an adapted module itself: two class swaps on one object.
    inner = build_model()
    for block in inner.decoder_blocks:
        shard_module(block.mha_block)
    shard_module(inner)
    with torch.no_grad():
        before = inner(window)
        report["inner_eject_error"] = _error(lambda: adapterkit.eject(inner))
        report["inner_unchanged"] = bool(torch.equal(inner(window), before)) and len(
            adapterkit.adapters(inner)) == 4
        report["inner_class"] = type(inner.decoder_blocks[0].mha_block).__name__
    saved = adapterkit.save_adapters(inner, out / "inner_adapters", include=[])
    report["inner_saved_class"] = json.loads((saved / "adapter_config.json").read_text())[
        "base"]["class"]


def shard_module(module: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module)


def _error(action: Callable[[], object]) -> str | None:
    try:
        action()
    except ValueError as err:
        return str(err)
    return None


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # A short timeout: a rank that is stuck fails the test instead of blocking CI.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    run(args.mode, args.out)
    # Nothing may hold the process group when it goes: with gloo, a group that a DDP or FSDP
    # object (or a DTensor) still references at interpreter exit sometimes aborts the
    # process ("terminate called without an active exception"). run() has returned, so
    # its models are garbage; collect their reference cycles now.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run(mode: str, out: Path) -> None:
    """Train, save and probe; rank 0 writes what it saw under ``out``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    report: dict = {"world": world, "trainable": sorted(
        n for n, p in model.named_parameters() if p.requires_grad)}
    wrapped = (run_ddp if mode == "ddp" else run_fsdp)(model, rank, world, report)
    report["frozen_with_grad"] = sorted({
        n for names in gathered([n for n, p in model.named_parameters()
                                 if not p.requires_grad and p.grad is not None])
        for n in names
    })
    weights = {n: full(p) for n, p in model.named_parameters() if p.requires_grad}
    # Save through the wrapper users hold: the DDP object, the sharded model itself.
    adapterkit.save_adapters(wrapped, out / "adapters", include=["cls"])
    # Every rank returned from save_adapters after rank 0 wrote: the files are there.
    report["files_seen"] = gathered((out / "adapters" / "adapter_config.json").is_file())
    if mode == "ddp":
        probe_failed_save(wrapped, out, report)
    if mode == "fsdp":
        probe_fsdp_lifecycle(model, out, report)
    if rank == 0:
        save_file({n: t.contiguous() for n, t in weights.items()},
                  str(out / "weights.safetensors"))
        (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
