"""Training-step time, inference overhead and peak memory, side by side with AdapterHub and PEFT.

BERT-base and GPT-2 small, built from their configs, batch 8 x 128, a 2-class head on the
first token trained in every variant. Variants, interleaved in one process:

- ``full``: full fine-tuning (the base model for inference);
- ``adapterkit``: ``inject(model, "auto", AdapterConfig(reduction_factor=16))`` (Houlsby,
  bottleneck 48), adapters and head trained; SiLU and no dropout, as AdapterHub's config;
- ``adapterhub``: AdapterHub ``adapters``, ``DoubleSeqBnConfig(reduction_factor=16)``;
- ``hand``: the minimal hand edit: each adapted sub-layer's output projection replaced by a
  module that runs it and then the same adapter, no hooks, no dispatch;
- ``peft_lora``: PEFT LoRA r=8 on PEFT's default targets, as a reference.

Ratios are medians of per-round ratios: step time / full fine-tuning's, inference forward time /
the base model's. Peak RSS is taken in a fresh process per variant (all libraries imported in
each, then the peak reset), over a few training steps.

Runs in the peers' environment, which holds adapterkit too (see benchmarks/peers_env.sh):

    bash benchmarks/peers_env.sh
    .venv-peers/bin/python benchmarks/runtime.py --model bert    # writes its section
    .venv-peers/bin/python benchmarks/runtime.py --model gpt2
    .venv-peers/bin/python benchmarks/runtime.py --quick         # tiny configs, writes nothing
    .venv-peers/bin/python benchmarks/runtime.py --render        # sections from saved results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import common  # first: it sets OMP_WAIT_POLICY before torch is imported
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit

DATA = common.ROOT / "benchmarks" / "results"
VARIANTS = ("full", "adapterkit", "adapterhub", "hand", "peft_lora")
ADAPTED = VARIANTS[1:]
REDUCTION = 16
LORA_R = 8
TARGETS = {"step vs full": 0.60, "inference vs base": 1.03}
PHASE_STEPS = 3  # steps per variant timed by phase, after the interleaved rounds
SHARED = (" (the machine was shared with other jobs: expect the lead's re-run on a quiet "
          "machine to be faster and tighter)")
PEERS_DOC = """\
The comparison with AdapterHub and PEFT runs in a virtual environment of its own, because
AdapterHub `adapters` 1.3.0 pins transformers ~= 4.57 while adapterkit's `hf` extra allows
newer releases. adapterkit's own dependencies do not change for it. From the repository root:

```sh
bash benchmarks/peers_env.sh          # creates .venv-peers/ (git-ignored), a few minutes
.venv-peers/bin/python benchmarks/runtime.py --model bert   # about 5-10 min on 2 cores
.venv-peers/bin/python benchmarks/runtime.py --model gpt2
.venv-peers/bin/python benchmarks/runtime.py --quick        # tiny configs, a smoke test
python benchmarks/plots.py            # docs/param_counts.png, docs/runtime.png (matplotlib)
```

`peers_env.sh` installs `torch==2.13.0` first (pinned, so that no peer's loose `torch`
requirement pulls a CUDA build), then `adapters==1.3.0`, `transformers~=4.57.0`,
`peft==0.21.2` and `safetensors`, then this checkout with `pip install --no-deps -e .`, so
every variant runs in one process, interleaved. `VENV=path` and `PYTHON=python3.X` override
the location and the interpreter. The other benchmarks (`param_counts.py`,
`injection_cost.py`, `overhead.py`, `plots.py`) run in adapterkit's own environment
(`pip install -e '.[hf,cli]'`).
"""


@dataclass(frozen=True)
class ModelDef:
    title: str
    config: Callable[[bool], object]  # quick -> transformers config
    model_class: str
    vocab: int
    hand_targets: tuple[str, ...]  # output projections the hand edit wraps, per block
    lora_targets: tuple[str, ...]  # PEFT's defaults for the architecture


def _bert_config(quick: bool) -> object:
    import transformers

    if quick:
        return transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=256)
    return transformers.BertConfig()  # the defaults are BERT-base


def _gpt2_config(quick: bool) -> object:
    import transformers

    if quick:
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2Config()  # the defaults are GPT-2 small


MODELS = {
    "bert": ModelDef("BERT-base", _bert_config, "BertModel", 30522,
                     ("attention.output.dense", "output.dense"), ("query", "value")),
    "gpt2": ModelDef("GPT-2 small", _gpt2_config, "GPT2Model", 50257,
                     ("attn.c_proj", "mlp.c_proj"), ("c_attn",)),
}


class HandAdapter(nn.Module):
    """The hand edit: a sub-layer's output projection, then a zero-initialised adapter."""

    def __init__(self, proj: nn.Module, d: int, bottleneck: int) -> None:
        super().__init__()
        self.proj = proj
        self.down = nn.Linear(d, bottleneck)
        self.up = nn.Linear(bottleneck, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h + self.up(F.silu(self.down(h)))


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.encoder.layer if hasattr(model, "encoder") else model.h


def base_model(spec: ModelDef, quick: bool) -> nn.Module:
    import transformers

    torch.manual_seed(0)  # every variant starts from the same base weights
    return getattr(transformers, spec.model_class)(spec.config(quick))


def build(spec: ModelDef, variant: str, quick: bool) -> nn.Module:
    """The model of one variant, with only what that variant trains left trainable."""
    model = base_model(spec, quick)
    d = model.config.hidden_size
    torch.manual_seed(1)
    if variant == "full":
        return model
    if variant == "adapterkit":
        config = adapterkit.AdapterConfig(reduction_factor=REDUCTION, activation="silu",
                                          dropout=0.0)
        adapterkit.inject(model, "auto", config)
        adapterkit.freeze(model, train=["adapters"])
    elif variant == "adapterhub":
        import adapters

        adapters.init(model)
        model.add_adapter("bn", config=adapters.DoubleSeqBnConfig(reduction_factor=REDUCTION))
        model.train_adapter("bn")  # freezes the base, activates the adapter
    elif variant == "hand":
        model.requires_grad_(False)
        for block in blocks(model):
            for path in spec.hand_targets:
                parent_path, _, leaf = path.rpartition(".")
                parent = block.get_submodule(parent_path)
                setattr(parent, leaf, HandAdapter(getattr(parent, leaf), d, d // REDUCTION))
    elif variant == "peft_lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_R, lora_alpha=2 * LORA_R, target_modules=list(spec.lora_targets),
            fan_in_fan_out=spec.model_class == "GPT2Model"))
    else:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    return model


def hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state


class Trainer:
    """One variant's model, its 2-class head and its optimizer; ``step()`` is one update."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.model, self.ids, self.labels = model.train(), ids, labels
        torch.manual_seed(2)
        self.head = nn.Linear(model.config.hidden_size, 2)
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW([*params, *self.head.parameters()], lr=1e-4)

    def step(self) -> None:
        logits = self.head(hidden(self.model, self.ids)[:, 0])
        loss = F.cross_entropy(logits, self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def phases(self) -> tuple[float, float, float]:
        """One step, timed by phase: (forward and loss, backward, optimizer), CPU seconds."""
        t0 = time.process_time()
        loss = F.cross_entropy(self.head(hidden(self.model, self.ids)[:, 0]), self.labels)
        t1 = time.process_time()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.process_time()
        self.opt.step()
        return t1 - t0, t2 - t1, time.process_time() - t2


def batch(spec: ModelDef, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    T = 32 if quick else 128
    return torch.randint(0, spec.vocab, (8, T), generator=g), torch.randint(0, 2, (8,),
                                                                           generator=g)


def identity_gap(spec: ModelDef, quick: bool, ids: torch.Tensor) -> dict[str, float]:
    """max |adapted - base| of the final hidden states at initialisation, eval mode."""
    with torch.no_grad():
        base = hidden(base_model(spec, quick).eval(), ids)
        return {v: (hidden(build(spec, v, quick).eval(), ids) - base).abs().max().item()
                for v in ADAPTED}


def adapter_flops_share(model: nn.Module, T: int) -> float:
    """Adapters' multiply-adds per token over the base forward's (matmuls only, estimated).

    Base: 2 per weight of the blocks, plus attention's scores and weighted sum, 4*T*d a layer.
    Adapters: down and up, 2 * (2*d*b) each.
    """
    d, layers = model.config.hidden_size, len(blocks(model))
    weights = sum(p.numel() for p in blocks(model).parameters() if p.dim() == 2)
    base = 2 * weights + 4 * T * d * layers
    return 2 * layers * 4 * d * (d // REDUCTION) / base


def call_overhead(spec: ModelDef, rounds: int = 30) -> dict[str, float]:
    """CPU microseconds one forward of the tiny config costs beyond the hand edit, per adapter.

    At full size the adapters' Python dispatch is lost in the noise of a multi-second step; on
    a 2-layer d=64 config (4 adapters) it is what separates the variants, so it is measured
    there, on one thread, interleaved.
    """
    torch.set_num_threads(1)
    ids, _ = batch(spec, quick=True)
    models = {v: build(spec, v, quick=True).eval() for v in ("hand", "adapterkit", "adapterhub")}
    n = 2 * len(blocks(models["hand"]))

    def forward(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for _ in range(5):
                    hidden(m, ids)
        return run

    for m in models.values():
        forward(m)()
    _, cpu = common.interleaved_clocks({v: forward(m) for v, m in models.items()}, rounds)
    torch.set_num_threads(2)
    med = {v: statistics.median(t) / 5 for v, t in cpu.items()}
    return {v: 1e6 * (med[v] - med["hand"]) / n for v in ("adapterkit", "adapterhub")}


def child(spec: ModelDef, variant: str, quick: bool, steps: int) -> None:
    """Run one variant in this fresh process; print its peak RSS in MiB."""
    import adapters  # noqa: F401  (every process imports the same libraries)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    torch.set_num_threads(2)
    ids, labels = batch(spec, quick)
    before = common.reset_peak_rss()
    trainer = Trainer(build(spec, variant, quick), ids, labels)
    for _ in range(steps):
        trainer.step()
    print(json.dumps({"peak_mib": common.peak_rss_mib(), "import_mib": before}))


def peak_rss(model: str, variant: str, quick: bool, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", model,
           "--rss-steps", str(steps)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(model: str, rounds: int, rss_steps: int, quick: bool) -> dict:
    spec = MODELS[model]
    torch.set_num_threads(2)
    ids, labels = batch(spec, quick)
    start, load = time.perf_counter(), os.getloadavg()[0]
    gaps = identity_gap(spec, quick, ids)
    trainers = {v: Trainer(build(spec, v, quick), ids, labels) for v in VARIANTS}
    for t in trainers.values():  # warm-up: first calls allocate and fill caches
        t.step()
    steps, steps_cpu = common.interleaved_clocks({v: t.step for v, t in trainers.items()}, rounds)
    print(f"  training rounds done in {time.perf_counter() - start:.0f} s", flush=True)
    by_phase = {v: [trainers[v].phases() for _ in range(PHASE_STEPS)]
                for v in ("full", "adapterkit", "hand")}
    by_phase = {v: [statistics.median(p) for p in zip(*runs, strict=True)]
                for v, runs in by_phase.items()}

    def forward(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                hidden(m, ids)
        return run

    for t in trainers.values():
        t.model.eval()
    infer, infer_cpu = common.interleaved_clocks({("base" if v == "full" else v): forward(t.model)
                                    for v, t in trainers.items()}, rounds)
    print(f"  inference rounds done in {time.perf_counter() - start:.0f} s", flush=True)
    memory = {v: peak_rss(model, v, quick, rss_steps) for v in VARIANTS}
    overhead = call_overhead(spec)
    print(f"  fresh processes done in {time.perf_counter() - start:.0f} s", flush=True)
    return {
        "model": spec.title, "rounds": rounds, "rss_steps": rss_steps,
        "trainable": {v: t.trainable for v, t in trainers.items()},
        "step_s": steps, "infer_s": infer, "step_cpu_s": steps_cpu, "infer_cpu_s": infer_cpu,
        "identity": gaps, "memory": memory, "seconds": time.perf_counter() - start,
        "call_overhead_us": overhead, "load": [load, os.getloadavg()[0]],
        "versions": versions(), "argv": sys.argv,
        "adapters": 2 * len(blocks(trainers["full"].model)), "phases_s": by_phase,
        "flops_share": adapter_flops_share(trainers["full"].model, ids.shape[1]),
        **ratios(steps, infer, ""), **ratios(steps_cpu, infer_cpu, "_cpu"),
    }


def ratios(steps: dict, infer: dict, suffix: str) -> dict:
    return {
        "step_ratio" + suffix: {v: common.median_ratio(steps, v, "full") for v in VARIANTS},
        "infer_ratio" + suffix: {v: common.median_ratio(infer, v, "base") for v in ADAPTED},
        "vs_adapterkit" + suffix: {v: common.median_ratio(steps, "adapterkit", v)
                                   for v in ADAPTED},
    }


def versions() -> str:
    import adapters
    import peft
    import transformers

    return (f"transformers {transformers.__version__}, adapters {adapters.__version__}, "
            f"peft {peft.__version__}, adapterkit {adapterkit.__version__}")


def _spread(times: dict, num: str, den: str) -> str:
    """Median of per-round ratios, and their range: how far one round can be trusted."""
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return f"{statistics.median(per_round):.3f} ({min(per_round):.2f}-{max(per_round):.2f})"


def _per_round(times: dict, num: str, den: str) -> list[float]:
    return [a / b for a, b in zip(times[num], times[den], strict=True)]


def _verdict(per_round: list[float], bound: float) -> str:
    """Met on the median; a miss that some rounds meet is within the noise of this run."""
    if statistics.median(per_round) <= bound:
        return "yes"
    if min(per_round) <= bound:
        return f"no, within noise (rounds {min(per_round):.3f}-{max(per_round):.3f})"
    return "no"


def targets(r: dict) -> list[tuple[str, str, str, str]]:
    """Issue #6's targets for adapterkit: (target, wall-clock value, CPU-time value, met)."""
    steps, infer = r["step_s"], r["infer_s"]
    rows = [
        ("step time <= AdapterHub's (adapterkit / adapterhub)", "vs_adapterkit", "adapterhub",
         _per_round(steps, "adapterkit", "adapterhub"), 1.0),
        ("step time <= hand-written's (adapterkit / hand)", "vs_adapterkit", "hand",
         _per_round(steps, "adapterkit", "hand"), 1.0),
    ]
    if r["model"] == "BERT-base":
        rows.append(("step time <= 0.60 of full fine-tuning", "step_ratio", "adapterkit",
                     _per_round(steps, "adapterkit", "full"), TARGETS["step vs full"]))
    rows.append(("inference forward <= 1.03 of the base", "infer_ratio", "adapterkit",
                 _per_round(infer, "adapterkit", "base"), TARGETS["inference vs base"]))
    out = [(name, f"{r[key][v]:.3f}", f"{r[key + '_cpu'][v]:.3f}", _verdict(per_round, bound))
           for name, key, v, per_round, bound in rows]
    ours, hub = r["memory"]["adapterkit"]["peak_mib"], r["memory"]["adapterhub"]["peak_mib"]
    out.append(("peak RSS <= AdapterHub's (MiB)", f"{ours:.0f} vs {hub:.0f}", "",
                "yes" if ours <= hub else "no"))
    return out


def render(r: dict) -> str:
    ms = {v: 1000 * statistics.median(t) for v, t in r["step_s"].items()}
    inf = {v: 1000 * statistics.median(t) for v, t in r["infer_s"].items()}
    mem = r["memory"]
    timing = []
    for v in VARIANTS:
        inf_key = "base" if v == "full" else v
        timing.append((
            v, f"{r['trainable'][v]:,}", f"{ms[v]:.0f}",
            _spread(r["step_s"], v, "full"), f"{r['step_ratio_cpu'][v]:.3f}",
            f"{inf[inf_key]:.0f}",
            _spread(r["infer_s"], v, "base") if v != "full" else "1 (the base)",
            f"{r['infer_ratio_cpu'][v]:.3f}" if v != "full" else "",
        ))
    memory = [(v, f"{mem[v]['peak_mib']:.0f}", f"{mem[v]['peak_mib'] - mem[v]['import_mib']:.0f}",
               f"{r['identity'][v]:.3g}" if v != "full" else "(the base)") for v in VARIANTS]
    return (
        f"{r['model']} from its config, batch 8 x 128, `torch.set_num_threads(2)`, AdamW over "
        f"the trainable parameters plus a 2-class head on the first token (trained in every "
        f"variant; not counted below); {r['rounds']} interleaved rounds of one training step, "
        "then of one inference forward (eval, `no_grad`), after a warm-up step. Peers: "
        f"{r.get('versions') or versions()}. `python` in the command above is "
        "`.venv-peers/bin/python` (see "
        f"\"Peers' environment\"); the run took {r['seconds'] / 60:.1f} min, with a load "
        f"average of {r['load'][0]:.1f} at its start and {r['load'][1]:.1f} at its end on "
        f"{os.cpu_count()} cores{SHARED if max(r['load']) > 2.5 else ''}.\n\n"
        + common.table(["variant", "trainable (model)", "step (ms)",
                        "step / full (range)", "step / full, CPU", "forward (ms)",
                        "forward / base (range)", "forward / base, CPU"], timing)
        + "\n\nRatios are medians of per-round ratios (range over rounds in brackets), on the "
        "wall clock and, beside them, on this process's CPU time, which counts work done "
        "rather than waiting for a core: where the two agree, load from elsewhere hit every "
        "variant alike.\n\n"
        f"Peak RSS of a fresh process per variant over {r['rss_steps']} training steps, all "
        "libraries imported in each before the peak is reset (growth: what the model, "
        "activations, gradients and optimizer state added), and the largest difference "
        "between the adapted and the base model's final hidden states at initialisation "
        "(eval mode):\n\n"
        + common.table(["variant", "peak RSS (MiB)", "growth (MiB)", "max abs diff at init"],
                       memory)
        + "\n\nadapterkit against its targets (met: on the wall clock):\n\n"
        + common.table(["target", "wall clock", "CPU time", "met"], targets(r))
        + "\n\n" + floor_note(r) + "\n\n" + overhead_note(r)
        + "\n\n![Step time, inference and memory per variant, both models](runtime.png)"
    )


def floor_note(r: dict) -> str:
    """Why adapters-only training and inference cost what they cost: the method's floor."""
    ph = {v: [1000 * x for x in p] for v, p in r["phases_s"].items()}
    (ff, bf, of), (fa, ba, oa), (fh, bh, oh) = ph["full"], ph["adapterkit"], ph["hand"]
    return (
        "Where the step time goes (CPU ms of forward / backward / optimizer, median of "
        f"{PHASE_STEPS} steps each): full fine-tuning {ff:.0f} / {bf:.0f} / {of:.0f}, "
        f"adapterkit {fa:.0f} / {ba:.0f} / {oa:.0f}, hand edit {fh:.0f} / {bh:.0f} / {oh:.0f}. "
        "Training adapters alone saves the weight gradients of the frozen layers (about half "
        f"of their backward: {ba / bf:.2f} of full's here), the embedding gradient and the "
        "optimizer update of the whole model; it keeps the forward and the input gradients "
        "through every layer above the first adapter, which sits in layer 0. That gives "
        f"(forward + backward + optimizer) {(fa + ba + oa) / (ff + bf + of):.2f} of full "
        "fine-tuning for adapterkit and "
        f"{(fh + bh + oh) / (ff + bf + of):.2f} for the hand edit: the floor of the method on "
        "this model and batch, which AdapterHub and PEFT LoRA meet too, not a cost adapterkit "
        "adds. In inference the adapters' matmuls are "
        f"{100 * r['flops_share']:.1f}% of the base forward's ({r['adapters']} x 4*d*b "
        "multiply-adds a token against the blocks' weights and attention), plus their "
        "activation and residual add: the hand edit, which adds nothing else, pays the same."
    )


def overhead_note(r: dict) -> str:
    us = r["call_overhead_us"]
    per_forward_ms = us["adapterkit"] * r["adapters"] / 1000
    base_ms = 1000 * statistics.median(r["infer_s"]["base"])
    return (
        "Python dispatch: adapterkit runs the same operations as the hand edit (down, "
        "activation, up, residual add on the same tensor), so the only difference is Python "
        "dispatch: the class-swapped forward, the slot, the `Adapter` and its `Dropout(0)` "
        f"modules. Measured on the same architecture at 2 layers, d=64 (one thread, CPU "
        f"time), that is {us['adapterkit']:.1f} us per adapter call over the hand edit "
        f"(AdapterHub: {us['adapterhub']:.1f} us); times {r['adapters']} adapters, "
        f"{per_forward_ms:.2f} ms per forward, {100 * per_forward_ms / base_ms:.3f}% of this "
        "model's base forward. Differences between adapterkit and the hand edit larger than "
        "that, either way, are the machine's noise (see the ranges)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), action="append",
                    help="bert, gpt2, or both (repeat the flag); default: both")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rss-steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny configs, writes nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--peers-doc", action="store_true",
                    help="only (re)write the docs section on the peers' environment")
    ap.add_argument("--render", action="store_true",
                    help="rewrite the docs sections from benchmarks/results/, measuring nothing")
    args = ap.parse_args()
    models = args.model or sorted(MODELS)
    if args.peers_doc:
        return write_peers_doc()
    if args.child:
        return child(MODELS[models[0]], args.child, args.quick, args.rss_steps)
    if args.render:
        return rerender(models)
    if args.quick:
        args.rounds = 2
    for model in models:
        print(f"{MODELS[model].title}:", flush=True)
        result = measure(model, args.rounds, args.rss_steps, args.quick)
        body = render(result)
        print(body, flush=True)
        if not args.quick:
            DATA.mkdir(parents=True, exist_ok=True)
            (DATA / f"runtime_{model}.json").write_text(json.dumps(result, indent=1) + "\n")
            common.write_section(f"Runtime vs peers: {result['model']} (benchmarks/runtime.py)",
                                 body)
            write_peers_doc()


def rerender(models: list[str]) -> None:
    """Rewrite each model's section from its saved results, stamped with the command that
    measured them (a change to the report's wording needs no new measurement)."""
    for model in models:
        path = DATA / f"runtime_{model}.json"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run --model {model} first")
        result = json.loads(path.read_text())
        sys.argv = result.get("argv") or [__file__, "--model", model]
        common.write_section(f"Runtime vs peers: {result['model']} (benchmarks/runtime.py)",
                             render(result))
        print(f"rewrote the {result['model']} section from {path.name}")


def write_peers_doc() -> None:
    common.write_section("Peers' environment (benchmarks/peers_env.sh)",
                         PEERS_DOC + f"\nInstalled now: {versions()}.",
                         command="bash benchmarks/peers_env.sh")


if __name__ == "__main__":
    main()
