"""What every step's learning rate and MRePU blend are: functions of the step number alone, so a
resumed run and N processes follow the same schedule as one uninterrupted process."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from retrofit.activations.modules import MRePU


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): ``(step+1)/warmup_steps`` during
    warm-up, then ``0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))``,
    which starts at 1 and approaches 0 at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def blend_at(step: int, ramp_steps: int) -> float:
    """MRePU's lam for a forward pass after ``step`` optimizer steps: ``step / ramp_steps``
    (0 at the first step: the network still computes ReLU), 1 from ``ramp_steps`` on."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


def ramp_fraction(asked: float | None, mrepu: Sequence[MRePU]) -> float:
    """The fraction of all steps the blend ramps over: ``asked`` (the fine-tune's setting), else
    the longest ramp the MRePU configs ask for; 0 without MRePU, which has nothing to ramp."""
    if not mrepu:
        return 0.0
    if asked is not None:
        return asked
    return max(m.config.ramp_fraction for m in mrepu)


@dataclass(frozen=True)
class Schedule:
    """The step counts every schedule is a function of."""

    total_steps: int
    warmup_steps: int
    ramp_steps: int

    @classmethod
    def build(cls, total_steps: int, warmup_fraction: float, ramp_fraction: float) -> "Schedule":
        ramp = int(ramp_fraction * total_steps + 0.5)
        return cls(
            total_steps,
            int(warmup_fraction * total_steps + 0.5),
            max(ramp, 1) if ramp_fraction > 0 else 0,
        )

    def lr_factor(self, step: int) -> float:
        """The LR multiplier of step ``step`` (:func:`warmup_cosine`)."""
        return warmup_cosine(step, self.total_steps, self.warmup_steps)

    def blend(self, step: int) -> float:
        """MRePU's lam after ``step`` steps (:func:`blend_at`)."""
        return blend_at(step, self.ramp_steps)
