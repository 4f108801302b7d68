"""Training loops: plain training, evaluation, and two-phase training (workflow B)."""

from __future__ import annotations

import math

import pytest
import torch

import adapterkit
from adapterkit.training import (
    TwoPhaseResult,
    bits,
    cosine_schedule,
    evaluate,
    lm_loss,
    train,
    train_two_phase,
)
from tests.conftest import assert_same, make_gpt, snapshot


def _batches(n: int, vocab: int = 61, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, vocab, (4, 13), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def _adapted(seed: int = 0) -> torch.nn.Module:
    model = make_gpt(seed)
    return adapterkit.inject(model, ["mha_block", "ffn_block"],
                             adapterkit.AdapterConfig(bottleneck=4, dropout=0.0))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_phase_changes_only_adapters_and_head_after_the_switch() -> None:
    model = _adapted()
    before = _state(model)
    at_switch: dict[str, torch.Tensor] = {}
    steps_seen: list[int] = []

    def on_step(step: int, _loss: float) -> None:
        steps_seen.append(step)
        if step == 3:
            at_switch.update(_state(model))

    result = train_two_phase(model, _batches(8), warmup_steps=3, adapt_steps=5,
                             freeze_spec={"train": ["adapters", "cls"]}, lr=1e-2,
                             on_step=on_step)
    after = _state(model)
    assert steps_seen == list(range(1, 9))
    assert isinstance(result, TwoPhaseResult)
    assert (len(result.warmup_losses), len(result.adapt_losses), len(result.losses)) == (3, 5, 8)

    # warm-up trained everything: every base tensor moved (adapters' down stays at its
    # init only while up is zero, so look at the base and at up)
    for key in before:
        if ".adapterkit." not in key or ".up." in key:
            assert not torch.equal(before[key], at_switch[key]), f"{key} did not train"
    # after the switch: adapters and head moved, everything else is bit-for-bit the same
    for key in after:
        trainable = ".adapterkit." in key or key.startswith("cls.")
        if trainable and key.endswith("weight"):
            assert not torch.equal(at_switch[key], after[key]), f"{key} did not train"
        if not trainable:
            assert torch.equal(at_switch[key], after[key]), f"{key} changed after the switch"
    trainable_now = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_now == {k for k in after if ".adapterkit." in k or k.startswith("cls.")}
    assert result.freeze_report.trainable == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_two_phase_defaults_to_adapters_only() -> None:
    model = _adapted()
    result = train_two_phase(model, _batches(2), warmup_steps=1, adapt_steps=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapterkit." in n for n in trainable)
    assert result.freeze_report.spec.train == ("adapters",)


def test_two_phase_checks_the_spec_before_training() -> None:
    model = make_gpt()  # no adapters: "adapters" selects nothing
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no adapters yet"):
        train_two_phase(model, _batches(4), warmup_steps=2, adapt_steps=2)
    assert_same(model, snap)
    with pytest.raises(ValueError, match="no module or parameter matches 'clss'; closest: cls"):
        train_two_phase(_adapted(), _batches(4), warmup_steps=2, adapt_steps=2,
                        freeze_spec={"train": ["adapters", "clss"]})


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_two_phase_refuses_bad_step_counts(bad: object) -> None:
    model = _adapted()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        train_two_phase(model, _batches(4), warmup_steps=bad, adapt_steps=2)  # type: ignore[arg-type]
    assert_same(model, snap)


def test_two_phase_reports_batches_that_run_out() -> None:
    with pytest.raises(ValueError, match="batches ran out"):
        train_two_phase(_adapted(), _batches(3), warmup_steps=2, adapt_steps=2)


def test_train_updates_only_trainable_parameters_and_lowers_the_loss() -> None:
    model = _adapted()
    adapterkit.freeze(model, train=["adapters", "cls"])
    before = _state(model)
    data = _batches(1) * 40  # one batch, over and over: the loss must fall
    losses = train(model, data, 40, lr=1e-2)
    assert len(losses) == 40 and losses[-1] < 0.8 * losses[0]
    after = _state(model)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(".adapterkit." in k or k.startswith("cls.") for k in changed)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_train_refuses_a_fully_frozen_model() -> None:
    model = make_gpt()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, _batches(1), 1)


def test_train_applies_the_schedule() -> None:
    model = make_gpt()
    seen: list[float] = []
    opt_lrs = cosine_schedule(10, ramp=4, floor=0.5)
    train(model, _batches(10), 10, lr=1.0, schedule=lambda s: seen.append(opt_lrs(s)) or 0.0)
    assert seen == [opt_lrs(s) for s in range(10)]
    assert seen[:4] == [0.25, 0.5, 0.75, 1.0] and math.isclose(seen[-1], 0.5)


def test_evaluate_restores_the_mode_and_takes_no_gradient() -> None:
    model = make_gpt().train()
    batches = _batches(3)
    value = evaluate(model, batches)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    manual = sum(lm_loss(model.eval(), b).item() for b in batches) / 3
    assert math.isclose(value, manual, rel_tol=1e-6)
    # an untrained model over 61 symbols is close to uniform: about log2(61) bits
    assert abs(bits(value) - math.log2(61)) < 0.5
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [])
