"""A small problem every fine-tuning test trains on: two classes of 1x6x6 images, and a conv net
with the activation under test."""

from __future__ import annotations

import torch
from torch import nn

from retrofit.activations.modules import CompetitiveReLU
from retrofit.evaluation.datasets.base import TensorClassificationData
from retrofit.training.config import FinetuneConfig


def separable(n: int, seed: int = 0) -> TensorClassificationData:
    """Two classes of 1x6x6 images: is the left half brighter than the right half?"""
    x = torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    y = (x[..., :3].mean((1, 2, 3)) > x[..., 3:].mean((1, 2, 3))).long()
    return TensorClassificationData(x, y, source=f"synthetic-{seed}", preprocessing={})


TRAIN = separable(192, seed=1)
VAL = separable(64, seed=2)


def conv_net(activation: nn.Module | None = None, *, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        activation if activation is not None else CompetitiveReLU(),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(144, 2),
    )


def config(**changes) -> FinetuneConfig:
    settings = dict(epochs=2, batch_size=32, lr=1e-2, activation_lr=2e-2, device="cpu")
    return FinetuneConfig(**{**settings, **changes})


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)
