"""What :func:`~retrofit.training.loop.finetune` returns, and the errors that carry it when
training stops early."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from retrofit.errors import ExitCode, RetrofitError
from retrofit.training.state import EpochRecord


@dataclass
class FinetuneResult:
    """What :func:`~retrofit.training.loop.finetune` returns (or attaches to the error it raises).

    ``model`` holds the best weights: those of the epoch with the highest validation top-1 among
    epochs that ended with the blend ramp complete (ties: the later epoch), or of the last such
    epoch without validation data. ``best_epoch`` is 0 when no epoch qualified: the model then
    has the weights it was given. ``start_val_top1`` is the validation accuracy before the first
    step. ``stopped_early`` says why training ended before its last step (None when it did not);
    ``interrupted`` is True after Ctrl-C/SIGTERM. ``notes`` are remarks for the report.
    """

    model: nn.Module
    history: list[EpochRecord]
    best_epoch: int
    best_val_top1: float | None
    start_val_top1: float | None
    stopped_early: str | None
    interrupted: bool
    ramp_finished: bool
    steps: int
    total_steps: int
    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)


class TrainingDiverged(RetrofitError):
    """The training loss became NaN or infinite. ``result`` holds the model restored to its
    best state (see :class:`FinetuneResult`); the checkpoint on disk is the last good one."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, result: FinetuneResult) -> None:
        super().__init__(message)
        self.result = result


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was written (``checkpoint``, None
    when there is no checkpoint path or the interrupt came in the middle of a weight update, in
    which case the previous epoch's checkpoint stands). ``result`` holds the best state so far.
    A KeyboardInterrupt, so code that treats Ctrl-C as an exit keeps working."""

    def __init__(self, message: str, result: FinetuneResult, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.result = result
        self.checkpoint = checkpoint


def diverged_message(reason: str, best_epoch: int, best_val: float | None) -> str:
    """The one line of :class:`TrainingDiverged`: what happened, which weights were kept, and
    what to try."""
    if best_epoch == 0:
        kept = "kept the weights the model was given"
    elif best_val is None:
        kept = f"kept the weights of epoch {best_epoch}"
    else:
        kept = f"kept the weights of epoch {best_epoch} (validation top-1 {best_val:.2f}%)"
    return (f"{reason}; {kept}. Lower the learning rate, set a gradient clip, or check the "
            "data for extreme values")


def interrupted_message(where: str, saved: Path | None, checkpoint: Path | None) -> str:
    """The one line of :class:`TrainingInterrupted`: where training stopped, and what the
    checkpoint on disk holds (``saved``: the one written now, if any)."""
    if saved is not None:
        return f"training interrupted {where}; checkpoint saved to {saved}"
    if checkpoint is not None:
        return (f"training interrupted during a weight update {where}; the checkpoint "
                f"{checkpoint} holds the last epoch end")
    return f"training interrupted {where}; no checkpoint path was set"
