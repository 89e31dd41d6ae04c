"""How to fine-tune: :class:`FinetuneConfig`, its choices and their checks, and which settings a
resumed run must keep."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

from retrofit.errors import UsageError

OptimizerName = Literal["adamw", "sgd"]
AmpMode = Literal["auto", "bf16", "off"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
AMP_MODES: tuple[str, ...] = get_args(AmpMode)

_NOT_COMPARED_ON_RESUME = ("device", "num_workers", "checkpoint", "resume")
"""Config fields a resumed run may change: they do not change what is computed."""


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Every field that changes the result is stored in the checkpoint, and a
    resumed run must use the same values.

    - ``lr``: the peak learning rate of the weights; ``activation_lr`` that of the new
      activations' parameters (CAReLU alpha/beta), None for the same as ``lr``.
    - ``weight_decay`` applies to weights of 2 or more dimensions only: never to biases,
      normalisation scales or activation parameters.
    - ``warmup_fraction``: the LR rises linearly over this fraction of all steps, then follows a
      cosine to zero (see :func:`~retrofit.training.schedule.warmup_cosine`).
    - ``grad_clip``: maximal gradient norm, 0 for none.
    - ``deterministic``: also ask torch for deterministic kernels (the data order is always
      seeded). On CUDA this sets ``CUBLAS_WORKSPACE_CONFIG`` unless it is set already.
    - ``amp``: ``auto`` is bf16 autocast on a CUDA GPU that has bf16 and off elsewhere.
    - ``blend_ramp_fraction``: MRePU's lam goes linearly from 0 to 1 over this fraction of all
      steps (0: MRePU from the first step); None takes the MRePU config's ``ramp_fraction``.
    - ``batch_size`` is per process: under torchrun with N processes the step sees N*B samples.
    - ``checkpoint``: written at every epoch end and on interruption; ``resume`` continues it.
      Without ``resume`` an existing file is an error rather than silently replaced.
    - ``exact_batches``: every step and every validation batch has exactly ``batch_size``
      samples (per process), for a model whose batch size is fixed. Each epoch leaves out the
      last ``n % batch_size`` samples of its shuffled order (another set each epoch); validation
      pads its last batch and drops the padding's outputs.
    """

    epochs: int = 3
    batch_size: int = 64
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-4
    activation_lr: float | None = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    deterministic: bool = False
    amp: AmpMode = "auto"
    blend_ramp_fraction: float | None = None
    device: str = "auto"
    num_workers: int = 0
    checkpoint: str | os.PathLike[str] | None = None
    resume: bool = False
    exact_batches: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one "
             f"of: {', '.join(OPTIMIZERS)}"),
            (0 < self.lr < math.inf,
             f"the learning rate must be a finite positive number, got {self.lr}"),
            (self.activation_lr is None or 0 <= self.activation_lr < math.inf,
             f"the activation learning rate must be a finite number, 0 or more, got "
             f"{self.activation_lr}"),
            (0 <= self.weight_decay < math.inf,
             f"weight decay must be a finite number, 0 or more, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
            (0 <= self.warmup_fraction <= 1,
             f"warmup fraction must lie in [0, 1], got {self.warmup_fraction}"),
            (0 <= self.grad_clip < math.inf,
             f"gradient clip must be 0 (off) or a finite positive number, got {self.grad_clip}"),
            (self.amp in AMP_MODES, f"unknown amp mode {self.amp!r}; choose one of: "
             f"{', '.join(AMP_MODES)}"),
            (self.blend_ramp_fraction is None or 0 <= self.blend_ramp_fraction <= 1,
             f"blend ramp fraction must lie in [0, 1], got {self.blend_ramp_fraction}"),
            (self.num_workers >= 0, f"num_workers must be 0 or more, got {self.num_workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def as_dict(self) -> dict[str, Any]:
        """Plain values only (the checkpoint path as a string), for checkpoints and reports."""
        values = dataclasses.asdict(self)
        if self.checkpoint is not None:
            values["checkpoint"] = os.fspath(self.checkpoint)
        return values


def changed_settings(config: FinetuneConfig, stored: dict[str, Any]) -> list[str]:
    """``"key old -> new"`` for each setting that changes the result and differs from the
    checkpoint's (``stored``); a field added since the checkpoint was written counts at its
    default."""
    defaults = FinetuneConfig().as_dict()
    return [f"{key} {stored.get(key, defaults[key])!r} -> {value!r}"
            for key, value in config.as_dict().items()
            if key not in _NOT_COMPARED_ON_RESUME and stored.get(key, defaults[key]) != value]
