"""A stratified, seeded train/validation split of one dataset."""

from __future__ import annotations

import math

import torch

from retrofit.errors import BadInputError, UsageError
from retrofit.evaluation.datasets.base import ClassificationData, ClassificationSubset


def split_train_val(
    dataset: ClassificationData, val_fraction: float = 0.2, seed: int = 0
) -> tuple[ClassificationSubset, ClassificationSubset]:
    """Split into (train, val), stratified by class, the same for the same seed.

    Each class gives ``val_fraction`` of its samples to val (rounded, largest remainders
    first, so the total is ``len * val_fraction`` rounded half up), never its last sample, so a
    class with one sample stays in train only. Both parts list their samples in dataset order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    targets = dataset.targets
    n = len(targets)
    total_val = int(math.floor(n * val_fraction + 0.5))
    if total_val < 1 or total_val > n - 1:
        raise BadInputError(
            f"{dataset.source} has {n} samples, too few to split {val_fraction:.0%} off "
            "for validation"
        )
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(targets).tolist()
    members = [torch.nonzero(targets == c).flatten() for c in classes]
    exact = [len(m) * val_fraction for m in members]
    counts = [min(int(math.floor(e)), len(m) - 1) for e, m in zip(exact, members)]
    remainder = sorted(range(len(members)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in remainder:
        if sum(counts) >= total_val:
            break
        if counts[i] + 1 <= len(members[i]) - 1:
            counts[i] += 1
    val_parts = []
    for class_members, count in zip(members, counts):
        order = torch.randperm(len(class_members), generator=generator)
        val_parts.append(class_members[order[:count]])
    is_val = torch.zeros(n, dtype=torch.bool)
    if val_parts:
        is_val[torch.cat(val_parts)] = True
    train_indices = torch.nonzero(~is_val).flatten().tolist()
    val_indices = torch.nonzero(is_val).flatten().tolist()
    return (
        ClassificationSubset(dataset, train_indices, name="train"),
        ClassificationSubset(dataset, val_indices, name="val"),
    )
