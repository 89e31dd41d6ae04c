"""What the activations' tests share: an independent float64 reference (numpy, written from
activations.md), the plain formulas the fast kernels must agree with, and test inputs."""

from __future__ import annotations

import math

import numpy as np
import torch

from retrofit.activations.functional import _competitive_relu, mrepu_term
from retrofit.activations.modules import CompetitiveReLU, MRePU

MEASURES = ("energy", "l1", "count")
REDUCTIONS = ("auto", "sample", "channel", "last")
SHAPES = ((4, 7), (2, 3, 5, 5), (2, 6, 8))
HALF_AND_SINGLE = (torch.float32, torch.bfloat16, torch.float16)
# (alpha, beta) pairs: identity, a positive scale > 1, and two that make s negative.
SCALES = ((0.0, math.atanh(0.5)), (1.3, 0.4), (0.0, -0.7), (-2.5, 0.3))


def ref_axes(ndim: int, reduce: str) -> tuple[int, ...]:
    if ndim <= 1:
        return tuple(range(ndim))
    if reduce == "auto":
        reduce = "last" if ndim == 3 else "sample"
    if reduce == "channel" and ndim == 2:
        reduce = "sample"
    return {
        "sample": tuple(range(1, ndim)),
        "channel": tuple(range(2, ndim)),
        "last": (ndim - 1,),
    }[reduce]


def ref_p(z: np.ndarray, measure: str, eps: float, reduce: str) -> np.ndarray:
    ax = ref_axes(z.ndim, reduce)
    pos = np.maximum(z, 0.0)
    if measure == "energy":
        return (pos**2).sum(ax, keepdims=True) / ((z**2).sum(ax, keepdims=True) + eps)
    if measure == "l1":
        return pos.sum(ax, keepdims=True) / (np.abs(z).sum(ax, keepdims=True) + eps)
    return (z > 0).mean(ax, keepdims=True)


def ref_carelu(z, alpha, beta, k=2.0, eps=1e-6, measure="energy", reduce="auto"):
    s = k * np.tanh(alpha * ref_p(z, measure, eps, reduce) + beta)
    return np.maximum(s * z, 0.0)


def ref_mrepu(x, p=2.0, c=1.0, lam=1.0, a=1.0, b=1.0):
    u = a * x
    return (1 - lam) * np.maximum(x, 0.0) + lam * b * u * np.maximum(u + c, 0.0) ** p


def away_from_zero(shape, generator, scale=1.5) -> torch.Tensor:
    """float64 values with |z| in [0.2, 0.2 + scale]: no element sits at the kink z = 0."""
    magnitude = 0.2 + scale * torch.rand(shape, generator=generator, dtype=torch.float64)
    sign = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
    return magnitude * sign


def huge_input(dtype: torch.dtype) -> torch.Tensor:
    big = torch.finfo(dtype).max
    values = [min(v, big) for v in (1e30, 3e38, 1e4)]
    row = [values[0], -values[0], values[1], -values[1], values[2], -values[2], 1.0, -0.5]
    return torch.tensor([row, row[::-1]], dtype=dtype).reshape(2, 2, 2, 2)


def gained(module: MRePU) -> MRePU:
    """Gains other than 1, as a calibrated swap leaves them, so graphs must carry them."""
    with torch.no_grad():
        module.gain_in.fill_(0.6)
        module.gain_out.fill_(1.7)
    return module


def plain_carelu(z: torch.Tensor, module: CompetitiveReLU) -> torch.Tensor:
    """The plain tensor formula that graph capture sees, with the module's parameters."""
    return _competitive_relu(
        z, module.alpha, module.beta, module.k, module.eps, module.measure, module.reduce
    )


def plain_mrepu(x: torch.Tensor, module: MRePU) -> torch.Tensor:
    xa = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
    big = torch.finfo(x.dtype).max
    a, b = module.gain_in.to(xa.dtype), module.gain_out.to(xa.dtype)
    term = mrepu_term(a * xa, module.p, module.c).clamp(-big, big) * b
    y = (1.0 - module.blend) * xa.clamp_min(0.0) + module.blend * term
    return y.clamp(-big, big).to(x.dtype)
