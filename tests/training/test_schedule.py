"""retrofit.training.schedule: warm-up then cosine, the MRePU blend ramp, and every step of a
fine-tune at the scheduled values."""

from __future__ import annotations

import math

import pytest
import torch

from retrofit.activations.modules import MRePU
from retrofit.training.loop import finetune
from retrofit.training.results import TrainingInterrupted
from retrofit.training.schedule import blend_at, ramp_fraction, warmup_cosine
from tests.training.conftest import TRAIN, VAL, config, conv_net


def test_warmup_then_cosine_lr_at_chosen_steps():
    assert warmup_cosine(0, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(1, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(2, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(9, 10, 2) == pytest.approx(0.5 * (1 + math.cos(7 / 8 * math.pi)))
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)


def test_blend_at_is_zero_first_then_linear_then_one():
    assert [blend_at(s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert blend_at(0, 0) == 1.0  # no ramp: MRePU from the start


def test_the_ramp_is_the_fine_tunes_setting_else_the_longest_mrepu_asks_for():
    mrepu = [MRePU(ramp_fraction=0.25), MRePU(ramp_fraction=0.5)]
    assert ramp_fraction(None, mrepu) == 0.5
    assert ramp_fraction(0.1, mrepu) == 0.1
    assert ramp_fraction(0.1, []) == 0.0  # nothing to ramp


def test_optimizer_uses_the_scheduled_lr_in_every_group(monkeypatch):
    used: list[dict[str, float]] = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        used.append({g["name"]: (g["lr"], g["weight_decay"]) for g in self.param_groups})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    # One step per epoch: 5 steps, 2 of warm-up.
    result = finetune(conv_net(), TRAIN, None, config(epochs=5, batch_size=256,
                                                       warmup_fraction=0.4, weight_decay=0.1))
    factors = [0.5, 1.0, 1.0, 0.75, 0.25]
    assert [u["weights"][0] for u in used] == pytest.approx([1e-2 * f for f in factors])
    assert [u["activation"][0] for u in used] == pytest.approx([2e-2 * f for f in factors])
    assert {u["weights"][1] for u in used} == {0.1}
    assert {u["activation"][1] for u in used} == {0.0}
    assert [r.lr for r in result.history] == pytest.approx([1e-2 * f for f in factors])


def test_mrepu_blend_ramps_from_relu_to_mrepu_and_ends_at_one(monkeypatch):
    seen: list[float] = []
    forward = MRePU.forward

    def spy(self, x):
        if torch.is_grad_enabled():  # training steps, not validation
            seen.append(self.blend)
        return forward(self, x)

    monkeypatch.setattr(MRePU, "forward", spy)
    result = finetune(conv_net(MRePU()), TRAIN, VAL,
                      config(epochs=8, batch_size=256, blend_ramp_fraction=0.5, lr=1e-3))
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    assert [r.blend for r in result.history] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 5)
    assert result.model[1].blend == 1.0 and result.ramp_finished
    assert result.best_epoch >= 4  # epochs validated at lam < 1 cannot be the best


def test_mrepu_ramp_defaults_to_the_activation_config_and_an_early_stop_says_so():
    blends = []

    def stop_after_first(record):
        blends.append(record.blend)
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as caught:
        finetune(conv_net(MRePU(ramp_fraction=0.25)), TRAIN, VAL,
                 config(epochs=8, batch_size=256, lr=1e-3), on_epoch=stop_after_first)
    assert blends == [0.5]  # 8 steps, ramp 2 steps: lam 1/2 after the first
    result = caught.value.result
    assert not result.ramp_finished and result.model[1].blend == 1.0
    assert any("ramp" in note for note in result.notes)
