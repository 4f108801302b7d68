"""Adapter training under torch.distributed equals training in one process.

Each mode launches ``tests/ecosystem/dist_worker.py`` the way users launch training
(``torchrun``, here ``python -m torch.distributed.run``) with 2 processes on the gloo backend;
each rank trains on its half of every global batch. The same model trained on the whole
batches in this process is the reference. A launch that hangs is killed and fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dist_worker as worker
import pytest
import torch
from safetensors.torch import load_file

import adapterkit

pytestmark = pytest.mark.slow  # a few seconds a launch: two processes each import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # the repository: adapterkit importable without an install
LAUNCH_TIMEOUT_S = 100


def launch(mode: str, out: Path) -> dict:
    """Run the worker on 2 ranks; its report, or a failure with the launcher's output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",  # a free port
           "--nproc_per_node", "2", str(HERE / "dist_worker.py"), "--mode", mode, "--out", str(out)]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"torchrun --mode {mode} hung for {LAUNCH_TIMEOUT_S}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"torchrun --mode {mode} failed:\n{output[-4000:]}"
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, the whole batch each step: what both modes must reproduce."""
    model = worker.build_model()
    losses = worker.train(model, adapterkit.trainable_parameters(model))
    return {"model": model.eval(), "losses": losses,
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}


def _launched(mode: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp(mode)
    return {"mode": mode, "out": out, "report": launch(mode, out),
            "weights": load_file(str(out / "weights.safetensors"))}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _launched("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _launched("fsdp", tmp_path_factory)


@pytest.fixture(params=["ddp", "fsdp"])
def run(request: pytest.FixtureRequest) -> dict:
    return request.getfixturevalue(request.param)


TOLERANCE = {"ddp": 1e-5, "fsdp": 1e-4}


def test_two_ranks_on_shards_equal_one_process_on_the_batch(run: dict, reference: dict) -> None:
    tol = TOLERANCE[run["mode"]]
    report = run["report"]
    assert report["world"] == 2
    assert report["losses"] == pytest.approx(reference["losses"], abs=tol)
    assert sorted(run["weights"]) == reference["trainable"]
    params = dict(reference["model"].named_parameters())
    for name, trained in run["weights"].items():
        torch.testing.assert_close(trained, params[name].detach(), atol=tol, rtol=0, msg=name)
    # several steps moved the adapters well beyond the tolerance, so equality means something
    fresh = dict(worker.build_model().named_parameters())
    moved = max((run["weights"][n] - fresh[n].detach()).abs().max().item() for n in run["weights"])
    assert moved > 100 * tol


def test_only_trainable_parameters_get_gradients_on_every_rank(run: dict, reference: dict) -> None:
    report = run["report"]
    assert report["trainable"] == reference["trainable"]
    assert report["frozen_with_grad"] == []
    assert len(report["trainable"]) < len(list(worker.build_base().parameters()))


def test_ddp_buckets_exactly_the_trainable_parameters(ddp: dict) -> None:
    report = ddp["report"]
    # Recorded by a comm hook from every bucket DDP reduced, with find_unused_parameters off.
    assert report["reduced"] == report["trainable"]
    assert report["grads_equal_on_ranks"] is True


def test_a_save_that_fails_on_rank_zero_fails_on_every_rank(ddp: dict) -> None:
    on_rank0, on_rank1 = ddp["report"]["failed_save"]
    assert on_rank0.startswith("FileExistsError: ") and "is not a directory" in on_rank0
    assert on_rank1 == "RuntimeError: save_adapters failed on rank 0, which writes the files: " + (
        on_rank0)


def test_fsdp_shards_frozen_and_trainable_parameters_in_one_group(fsdp: dict) -> None:
    report = fsdp["report"]
    assert report["classes"] == ["FSDPGPT", "FSDPGPTBlock"]
    every = sorted(n for n, _ in worker.build_model().named_parameters())
    assert report["sharded"] == every  # adapters sit in their block's group with frozen weights


def test_saved_adapters_are_whole_and_load_into_an_unsharded_model(
    run: dict, reference: dict
) -> None:
    tol = TOLERANCE[run["mode"]]
    where = run["out"] / "adapters"
    assert run["report"]["files_seen"] == [True, True]  # every rank returned after the write
    meta = json.loads((where / "adapter_config.json").read_text())
    assert meta["base"]["class"] == "GPT"  # not DistributedDataParallel, not FSDPGPT
    assert meta["targets"] == list(adapterkit.adapters(reference["model"]))
    saved = load_file(str(where / "adapter_model.safetensors"))
    full = {f"adapters.{k}.{n}": t.shape for k, a in adapterkit.adapters(reference["model"]).items()
            for n, t in a.state_dict().items()}
    full |= {f"modules.cls.{n}": t.shape for n, t in reference["model"].cls.state_dict().items()}
    assert {k: t.shape for k, t in saved.items()} == full  # gathered, not one rank's shard

    plain = adapterkit.load_adapters(worker.build_base(), where).eval()
    x = worker.global_batches(1)[0][:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), reference["model"](x), atol=tol, rtol=0)


def test_injecting_into_a_wrapped_model_is_refused(run: dict) -> None:
    message = run["report"]["inject_error"]
    wrapper = "DistributedDataParallel" if run["mode"] == "ddp" else "FSDPGPT"
    assert message is not None and f"already wrapped by torch.distributed ({wrapper})" in message
    assert "Inject and freeze first, then call fully_shard / DistributedDataParallel" in message


def test_lifecycle_verbs_on_a_sharded_model(fsdp: dict) -> None:
    report = fsdp["report"]
    assert report["adapters_keys"] == sorted(adapterkit.adapters(worker.build_model()))
    assert report["freeze_trainable"] == sum(
        p.numel() for p in adapterkit.trainable_parameters(worker.build_model()))
    assert "into a model that fully_shard has already sharded (at <root>, decoder_blocks.0, " \
        "decoder_blocks.1); call load_adapters on the unsharded model, then fully_shard it" in (
            report["load_error"])
    # fully_shard per block and at the root: disabled and eject give the base, keys restored
    assert report["disabled_is_base"] < 1e-5
    assert report["ejected_is_base"] < 1e-5
    assert report["ejected_keys_are_base"] is True
    # fully_shard on an adapted module itself: eject would drop FSDP's class, so it refuses
    assert report["inner_class"] == "FSDPMultiheadAttention"
    assert "its class was swapped again after injection (to FSDPMultiheadAttention" in (
        report["inner_eject_error"])
    assert report["inner_unchanged"] is True
    assert report["inner_saved_class"] == "GPT"  # FSDP's class swap seen through
