"""Fine-tune under torchrun and save what each process ends with (test_train's DDP test).

    python -m torch.distributed.run --nproc-per-node 2 --standalone tests/ddp_worker.py OUT

Writes ``OUT/weights-rank{r}.pt`` (final state dict), ``OUT/result-rank{r}.pt`` (best epoch and
validation accuracies) and, for every file a process writes through
:func:`retrofit.atomic.write_bytes_atomic`, a line in ``OUT/writes-rank{r}.txt``. The checkpoint goes
to ``OUT/checkpoint.pt``. :func:`tiny_problem` and :data:`CONFIG` are shared with the test, which
runs the single-process equivalent (batch size x 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit.activations.modules import CompetitiveReLU
from retrofit.evaluation.datasets.base import TensorClassificationData

BATCH_PER_PROCESS = 8
TRAIN_SIZE = 97
"""Not a multiple of 2 x 8: the last global batch holds one sample, so one process gets none."""

CONFIG: dict[str, Any] = dict(
    epochs=2, optimizer="sgd", lr=5e-2, activation_lr=1e-1, weight_decay=0.05, warmup_fraction=0.2,
    grad_clip=5.0, seed=3, device="cpu",
)


def tiny_problem() -> tuple[nn.Module, TensorClassificationData, TensorClassificationData]:
    """A small conv net with a CompetitiveReLU (no BatchNorm, no dropout: those are per process)
    and a separable two-class problem."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TRAIN_SIZE + 32, 1, 6, 6, generator=generator)
    y = (x[..., :3].mean((1, 2, 3)) > x[..., 3:].mean((1, 2, 3))).long()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), CompetitiveReLU(), nn.Flatten(), nn.Linear(144, 2)
    )

    def part(a: int, b: int) -> TensorClassificationData:
        return TensorClassificationData(x[a:b], y[a:b], source="synthetic", preprocessing={})

    return model, part(0, TRAIN_SIZE), part(TRAIN_SIZE, TRAIN_SIZE + 32)


def main(out: Path) -> None:
    import retrofit.training.checkpoint
    from retrofit.training.config import FinetuneConfig
    from retrofit.training.loop import finetune

    rank = int(os.environ["RANK"])
    original = retrofit.training.checkpoint.write_bytes_atomic

    def logged(path: Any, data: bytes) -> None:
        with open(out / f"writes-rank{rank}.txt", "a", encoding="utf-8") as log:
            log.write(f"{path}\n")
        original(path, data)

    retrofit.training.checkpoint.write_bytes_atomic = logged  # type: ignore[assignment]
    model, train, val = tiny_problem()
    config = FinetuneConfig(
        batch_size=BATCH_PER_PROCESS, checkpoint=out / "checkpoint.pt", **CONFIG
    )
    result = finetune(model, train, val, config, progress=False)
    torch.save(result.model.state_dict(), out / f"weights-rank{rank}.pt")
    torch.save(
        {"best_epoch": result.best_epoch, "val": [r.val_top1 for r in result.history]},
        out / f"result-rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
