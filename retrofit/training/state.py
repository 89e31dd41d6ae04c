"""Where a fine-tuning run stands, epoch by epoch, and the checkpoint that holds it: with it, a
resumed run reaches the weights an uninterrupted one does."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from retrofit.activations.modules import CompetitiveReLU, MRePU
from retrofit.errors import BadInputError, UsageError, first_line
from retrofit.training.checkpoint import load_checkpoint, rng_state, set_rng_state
from retrofit.training.config import FinetuneConfig, changed_settings
from retrofit.training.schedule import Schedule


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of history. Accuracies in percent.

    ``lr``/``activation_lr`` are the rates of the epoch's last step (``activation_lr`` None when
    the model has no activation parameters); ``samples_per_second`` counts training only (0 when
    a resumed run had nothing left of the epoch). ``blend`` is MRePU's lam at the end of the
    epoch (None without MRePU); ``activations`` maps each activation module's name to its values
    then: ``{"alpha": .., "beta": ..}`` for CompetitiveReLU, ``{"lam": .., "gain_in": ..,
    "gain_out": ..}`` for MRePU.
    ``val_top1`` is None without validation data.
    """

    epoch: int
    steps: int
    train_loss: float
    train_top1: float
    val_top1: float | None
    lr: float
    activation_lr: float | None
    samples_per_second: float
    blend: float | None
    activations: dict[str, dict[str, float]]


def activation_values(model: nn.Module) -> dict[str, dict[str, float]]:
    """Each activation module's current values by module name: CompetitiveReLU alpha/beta,
    MRePU lam and its gains."""
    values: dict[str, dict[str, float]] = {}
    for name, module in model.named_modules():
        if isinstance(module, CompetitiveReLU):
            values[name] = {"alpha": module.alpha.item(), "beta": module.beta.item()}
        elif isinstance(module, MRePU):
            values[name] = {"lam": float(module.blend), "gain_in": module.gain_in.item(),
                            "gain_out": module.gain_out.item()}
    return values


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of the weights, which later steps do not change (the best epoch's state)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _no_totals() -> list[float]:
    return [0.0, 0.0, 0.0]


@dataclass
class RunState:
    """Where the run stands: the step and epoch, the current epoch's totals (loss sum, correct,
    samples), the history, and the best state so far (on rank 0 only: the others hold None)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    totals: list[float] = field(default_factory=_no_totals)
    history: list[EpochRecord] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    best_epoch: int = 0
    best_val: float | None = None
    start_val: float | None = None

    def position(self) -> str:
        """Where the run stands, in words, for messages."""
        if self.batch_in_epoch:
            return f"at epoch {self.epoch + 1}, step {self.step}"
        return f"at the end of epoch {self.epoch}" if self.epoch else "before the first step"


def checkpoint_state(run: RunState, *, config: FinetuneConfig, world_size: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer, schedule: Schedule,
                     train_size: int) -> dict[str, Any]:
    """What a checkpoint holds: the run, the settings it must be resumed with, the weights, the
    optimizer and the random generators."""
    return {
        "config": config.as_dict(),
        "world_size": world_size,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {"step": run.step, "train_size": train_size,
                     **dataclasses.asdict(schedule)},
        "epoch": run.epoch,
        "batch_in_epoch": run.batch_in_epoch,
        "epoch_totals": list(run.totals),
        "rng": rng_state(),
        "best": {"state": run.best_state, "epoch": run.best_epoch, "val_top1": run.best_val},
        "start_val_top1": run.start_val,
        "history": [dataclasses.asdict(record) for record in run.history],
    }


def resume_run(path: str | os.PathLike[str], *, config: FinetuneConfig, world_size: int,
               is_main: bool, model: nn.Module, optimizer: torch.optim.Optimizer,
               train_size: int) -> RunState:
    """Load the checkpoint at ``path`` into ``model``, ``optimizer`` and the random generators,
    and return the run it stood at. A checkpoint written with other settings, another process
    count or another training set is refused: resuming it would not give the same weights."""
    path = Path(path)
    state = load_checkpoint(path)
    changed = changed_settings(config, state["config"])
    if changed:
        raise UsageError(f"checkpoint {path} was written with other settings "
                         f"({'; '.join(changed)}); resume with the same settings")
    if state["world_size"] != world_size:
        raise UsageError(f"checkpoint {path} was written by {state['world_size']} "
                         f"process(es); resume with the same number")
    schedule = state["schedule"]
    if schedule["train_size"] != train_size:
        raise BadInputError(f"checkpoint {path} was written for a training set "
                            f"of {schedule['train_size']} samples, this one has {train_size}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise BadInputError(f"checkpoint {path} does not fit this model: "
                            f"{first_line(error)}") from error
    set_rng_state(state["rng"])
    best = state["best"]
    return RunState(
        step=schedule["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
        totals=list(state["epoch_totals"]) if is_main else _no_totals(),
        history=[EpochRecord(**record) for record in state["history"]],
        best_state=best["state"] if is_main else None, best_epoch=best["epoch"],
        best_val=best["val_top1"], start_val=state["start_val_top1"])
