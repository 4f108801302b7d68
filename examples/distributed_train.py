"""Adapter training on several processes with torch.distributed: DDP or FSDP2, by flag.

    torchrun --nproc_per_node 2 examples/distributed_train.py --mode ddp
    torchrun --nproc_per_node 2 examples/distributed_train.py --mode fsdp --out runs/fsdp

The reference GPT, byte-level, on the demo's data (``adapterkit.apps.data``): corpus A, the code
of Python's standard library, makes the base; corpus B, its docstrings and comments, is what
the adapters learn (the seed's workflow A: a trained base, frozen, plus adapters).

Each step draws one global batch of ``--batch`` windows; rank r trains on the r-th slice,
and DDP or FSDP2 averages the gradients, so the run computes what one process would on the
whole batch. On CPU the backend is gloo; with CUDA, nccl and one GPU per process (see
docs/distributed.md). Rank 0 writes ``<out>/adapters`` (``save_adapters``; every rank calls
it) and ``<out>/base.safetensors``, then reloads both into a plain, unsharded model and
checks that it scores what the distributed model scored.
"""

from __future__ import annotations

import argparse
import gc
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit
from adapterkit.apps.data import as_tokens, default_corpora, random_windows
from adapterkit.models.gpt import GPT


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    p.add_argument("--out", type=Path, default=Path("distributed-run"))
    p.add_argument("--steps", type=int, default=100, help="adapter training steps")
    p.add_argument("--warmup-steps", type=int, default=200,
                   help="base training steps on corpus A when no --base is given")
    p.add_argument("--base", type=Path, help="a GPT state_dict (.safetensors) to adapt")
    p.add_argument("--batch", type=int, default=16, help="global batch, split over ranks")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="of the base and the adapters; 0 makes the run equal one process's")
    p.add_argument("--cache-dir", type=Path, help="where the corpora are cached "
                   "(default: $ADAPTERKIT_CACHE_DIR, else ~/.cache/adapterkit)")
    return p.parse_args()


def setup() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)  # one GPU per process, before any collective
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def corpora(cache_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corpus A (train) and corpus B (train, validation) as byte tokens, extracted once."""
    cache = cache_dir or Path(os.environ.get("ADAPTERKIT_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapterkit")
    if dist.get_rank() == 0:
        default_corpora(cache)  # the other ranks wait, then read rank 0's cache
    dist.barrier()
    a, b = default_corpora(cache)
    return as_tokens(a.train), as_tokens(b.train), as_tokens(b.val)


def make_gpt(args: argparse.Namespace) -> GPT:
    return GPT(vocab_size=256, d_model=64, max_length=args.context, num_heads=4, dff=128,
               dropout=args.dropout, N=2)


def global_batches(tokens: torch.Tensor, args: argparse.Namespace, seed: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches on every rank: one seed, one generator each."""
    return random_windows(tokens, args.batch, args.context, torch.Generator().manual_seed(seed))


def my_slice(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal share of a global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return batch[0].chunk(world)[rank], batch[1].chunk(world)[rank]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
            ) -> torch.Tensor:
    x, y = (t.to(device) for t in batch)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # mean: shards average


def base_model(args: argparse.Namespace, tokens_a: torch.Tensor, device: torch.device) -> GPT:
    """The base every rank starts from: loaded, or warmed up on A, then rank 0's everywhere."""
    torch.manual_seed(args.seed)
    model = make_gpt(args).to(device)
    if args.base is not None:
        model.load_state_dict(load_file(str(args.base)))
    elif args.warmup_steps:
        # Replicated, not distributed: every rank runs the same steps. A real run loads a
        # pretrained base instead (--base).
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batches = global_batches(tokens_a, args, seed=args.seed + 1)
        for _, batch in zip(range(args.warmup_steps), batches, strict=False):
            loss = loss_of(model, batch, device)
            opt.zero_grad()
            loss.backward()
            opt.step()
        log(f"base warmed up on corpus A for {args.warmup_steps} steps: loss {loss.item():.3f}")
    # DDP broadcasts rank 0's weights when it wraps; fully_shard keeps each rank's own.
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    return model


def wrap(model: GPT, mode: str, device: torch.device) -> nn.Module:
    """After inject and freeze: the wrapper sees the adapters and which parameters train."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.decoder_blocks:
        fully_shard(block)  # one all-gather per block: the adapters shard with their block
    fully_shard(model)  # the rest: embeddings and the head
    return model


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: torch.device) -> torch.Tensor:
    """Mean loss over ``batches``; under FSDP every rank must call it on as many batches."""
    model.eval()
    total = sum(loss_of(model, b, device) for b in batches) / len(batches)
    model.train()
    return total


def main() -> None:
    args = parse_args()
    device = setup()
    train(args, device)
    # With gloo, a process group that a DDP or FSDP object still references when the
    # interpreter exits can abort the process; train() has returned, so collect its models.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> None:
    """Base, adapters, wrapper, training, save: the whole run on this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # Our loss does no in-place op on the logits, the case this FSDP2 warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
    tokens_a, tokens_b, val_b = corpora(args.cache_dir)
    log(f"{args.mode} on {world} processes ({dist.get_backend()}), global batch {args.batch}")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of processes "
                         f"{world}: equal shards average to the whole batch")

    model = base_model(args, tokens_a, device)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
                  str(args.out / "base.safetensors"))
    # Inject and freeze on the plain model, then wrap: never the other way round.
    adapterkit.inject(model, ["mha_block", "ffn_block"], adapterkit.AdapterConfig(
        dropout=args.dropout))
    report = adapterkit.freeze(model, train=["adapters", "cls"])
    log(f"trainable {report.trainable} of {report.total} parameters")
    torch.manual_seed(args.seed + 1 + rank)  # each rank its own dropout masks
    wrapped = wrap(model, args.mode, device)
    # Right after wrapping, before any forward: fully_shard has swapped in the sharded
    # parameters, and a forward may leave the root's unsharded ones registered for a while.
    opt = torch.optim.AdamW(adapterkit.trainable_parameters(model), lr=args.lr)

    val = [b for _, b in zip(range(4), global_batches(val_b, args, seed=7), strict=False)]
    mine = [my_slice(b) for b in val]
    log(f"validation loss on B before: {mean_over_ranks(evaluate(wrapped, mine, device)):.3f}")
    batches = global_batches(tokens_b, args, seed=args.seed + 2)
    for step, batch in zip(range(1, args.steps + 1), batches, strict=False):
        loss = loss_of(wrapped, my_slice(batch), device)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps:
            log(f"step {step}: loss {mean_over_ranks(loss):.3f}")
    trained_val = mean_over_ranks(evaluate(wrapped, mine, device))
    log(f"validation loss on B after: {trained_val:.3f}")

    # Every rank calls save_adapters (sharded tensors are gathered); rank 0 writes.
    where = adapterkit.save_adapters(wrapped, args.out / "adapters", include=["cls"])
    if rank == 0:
        check_reload(args, where, val, trained_val)


def check_reload(args: argparse.Namespace, where: Path, val: list, trained_val: float) -> None:
    """One process, no wrapper, whole batches: the saved base and adapters score the same."""
    plain = make_gpt(args)
    plain.load_state_dict(load_file(str(args.out / "base.safetensors")))
    adapterkit.load_adapters(plain, where)
    reloaded = evaluate(plain, val, torch.device("cpu")).item()
    print(f"saved {where}; reloaded into one unsharded model: validation loss {reloaded:.3f}",
          flush=True)
    if abs(reloaded - trained_val) > 1e-4:
        raise SystemExit(f"the reloaded model scores {reloaded}, the trained one {trained_val}")


if __name__ == "__main__":
    main()
