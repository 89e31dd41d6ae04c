"""The activations that replace ReLU: CAReLU (``CompetitiveReLU``), MRePU and RePU.

Each is a functional form with a small ``nn.Module`` next to it, and a name registry (timm
style) builds a module from a config of :mod:`retrofit.config`; activations.md gives the math.

What the rest of the project may rely on:

* No ReLU in any spelling is computed here (``clamp``/``clamp_min`` instead), so a retrofitted
  graph has no ``aten.relu`` / ONNX ``Relu`` left for the rewriters to find.
* No Python control flow on tensor values: the modules run under ``torch.export``,
  ``torch.jit.script`` and the ONNX exporter (opset 13+). Branches depend only on strings,
  Python floats, the input's rank and its dtype, all fixed when a graph is captured.
* Finite inputs give finite outputs in float32, bfloat16 and float16. CAReLU measures the
  competition scale-invariantly; a result beyond the dtype's range *saturates* at its largest
  finite value instead of becoming inf. bfloat16/float16 inputs are computed in float32 and
  returned in their own dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import torch
from torch import nn

from retrofit.config import (
    CONFIGS,
    ActivationConfig,
    CompetitiveReLUConfig,
    MRePUConfig,
    RePUConfig,
)
from retrofit.errors import UsageError

MEASURES: tuple[str, ...] = ("energy", "l1", "count")
REDUCTIONS: tuple[str, ...] = ("auto", "sample", "channel", "last")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def _finite_max(dtype: torch.dtype) -> float:
    """The largest finite value of ``dtype``: the saturation bound of every output.

    Spelled out (== torch.finfo(dtype).max) because TorchScript can call neither torch.finfo
    nor read module-level floats."""
    if dtype == torch.float16:
        return 65504.0
    if dtype == torch.bfloat16:
        return 3.3895313892515355e38
    if dtype == torch.float32:
        return 3.4028234663852886e38
    return 1.7976931348623157e308


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (their range and 8-11 bit mantissas are too small for the
    sums and powers inside), the input's own dtype otherwise."""
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return torch.float32
    return dtype


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` that leaves no no-op cast in a captured graph when the dtype matches."""
    return x if x.dtype == dtype else x.to(dtype)


def _saturate(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp to ``dtype``'s finite range (inf becomes the largest finite value), then cast."""
    big = _finite_max(dtype)
    return _cast(y.clamp(-big, big), dtype)


# ---------------------------------------------------------------------------------------------
# CAReLU


def competition_axes(ndim: int, reduce: str) -> List[int]:
    """The axes the competition ``p(z)`` sums over, for an input of rank ``ndim``.

    ``sample``: all non-batch axes. ``channel``: the spatial axes of each (sample, channel)
    for rank >= 3; a 2-D ``(N, C)`` input has no spatial axes (each channel would compete with
    itself only), so it falls back to ``sample``. ``last``: the last axis (tokens of a sequence
    are independent). ``auto``: ``last`` for 3-D inputs, ``sample`` otherwise. A 0-D or 1-D
    input is a single sample: every axis. The ONNX rewrite uses the same axes.
    """
    if ndim <= 1:
        return list(range(ndim))
    if reduce == "auto":
        reduce = "last" if ndim == 3 else "sample"
    if reduce == "sample" or (reduce == "channel" and ndim == 2):
        return list(range(1, ndim))
    if reduce == "channel":
        return list(range(2, ndim))
    if reduce == "last":
        return [ndim - 1]
    raise UsageError("unknown reduce " + reduce + "; choose one of: auto, sample, channel, last")


def _competition(z: torch.Tensor, measure: str, eps: float, reduce: str) -> torch.Tensor:
    dims = competition_axes(z.dim(), reduce)
    acc = _compute_dtype(z.dtype)
    if measure == "count":
        return (z > 0).to(acc).mean(dims, keepdim=True)
    # u = z / m has |u| <= 1, so its squares and sums cannot overflow. With the eps term
    # rescaled (eps/m^2 for energy, eps/m for L1) the ratio is *identical* to the formula on z
    # for any m > 0: the result equals the formula to rounding, and m needs no gradient.
    m = _cast(z.detach().abs().amax(dims, keepdim=True), acc).clamp_min(1.0)
    u = _cast(z, acc) / m
    positive = u.clamp_min(0.0)
    if measure == "energy":
        both = (u * u).sum(dims, keepdim=True) + eps / (m * m)
        return (positive * positive).sum(dims, keepdim=True) / both
    if measure == "l1":
        return positive.sum(dims, keepdim=True) / (u.abs().sum(dims, keepdim=True) + eps / m)
    raise UsageError("unknown measure " + measure + "; choose one of: energy, l1, count")


def competition(
    z: torch.Tensor, measure: str = "energy", eps: float = 1e-6, reduce: str = "auto"
) -> torch.Tensor:
    """The competition result ``p(z)`` in [0, 1]: the positive side's share of ``z``.

    ``measure`` is ``energy`` (share of sum z^2), ``l1`` (share of sum |z|) or ``count`` (share
    of positive entries; no gradient flows through it). ``reduce`` picks the axes, see
    :func:`competition_axes`. The result keeps those axes with size 1, so it broadcasts against
    ``z``; it is float32 for half inputs and ``z``'s dtype otherwise.
    """
    _check_choice(measure, MEASURES, "measure")
    _check_choice(reduce, REDUCTIONS, "reduce")
    return _competition(z, measure, eps, reduce)


def _competitive_relu(
    z: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    k: float,
    eps: float,
    measure: str,
    reduce: str,
) -> torch.Tensor:
    # Positional core: TorchScript rejects keyword-only arguments with defaults.
    p = _competition(z, measure, eps, reduce)
    s = k * torch.tanh(alpha * p + beta)
    # max(s*z, 0) as a clamp, never a relu; the upper bound turns an overflow of |s| > 1
    # into the dtype's largest finite value.
    return _cast((s * _cast(z, p.dtype)).clamp(0.0, _finite_max(z.dtype)), z.dtype)


def competitive_relu(
    z: torch.Tensor,
    alpha: torch.Tensor | float,
    beta: torch.Tensor | float,
    *,
    k: float = 2.0,
    eps: float = 1e-6,
    measure: str = "energy",
    reduce: str = "auto",
) -> torch.Tensor:
    """CAReLU: ``max(s * z, 0)`` with ``s = k * tanh(alpha * p(z) + beta)``, one ``s`` per group.

    ``s`` lies in (-k, k) and may be negative: then the negative side passes, sign-flipped.
    Output has ``z``'s dtype (half inputs are computed in float32) and saturates at its largest
    finite value.
    """
    _check_choice(measure, MEASURES, "measure")
    _check_choice(reduce, REDUCTIONS, "reduce")
    # Python floats work as alpha/beta too; the annotation is TorchScript's.
    return _competitive_relu(
        z, alpha, beta, float(k), float(eps), measure, reduce  # type: ignore[arg-type]
    )


class CompetitiveReLU(nn.Module):
    """CAReLU with trainable scalars ``alpha`` and ``beta`` (0-dim parameters).

    Built from a :class:`CompetitiveReLUConfig`, optionally with keyword overrides of its fields
    (``CompetitiveReLU(measure="l1")``). The default config is the identity retrofit: alpha=0,
    beta=atanh(1/K), so ``s`` is 1 for every input (exactly in float32, to 1e-16 in float64)
    and the module computes ReLU. ``device``/``dtype`` place the parameters; pass
    ``dtype=torch.float64`` for a float64 model rather than calling ``.double()``, which keeps
    beta's float32 rounding (|s - 1| ~ 1.5e-8), or call :meth:`reset_parameters` afterwards.
    """

    def __init__(
        self,
        config: Optional[CompetitiveReLUConfig] = None,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        config = config if config is not None else CompetitiveReLUConfig()
        if not isinstance(config, CompetitiveReLUConfig):
            raise UsageError(f"CompetitiveReLU needs a CompetitiveReLUConfig, got {config!r}")
        if overrides:
            config = dataclasses.replace(config, **overrides)
        _check_choice(config.measure, MEASURES, "measure")
        _check_choice(config.reduce, REDUCTIONS, "reduce")
        self.config = config
        self.measure: str = config.measure
        self.reduce: str = config.reduce
        self.k: float = float(config.k)
        self.eps: float = float(config.eps)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty((), **factory))
        self.beta = nn.Parameter(torch.empty((), **factory))
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: CompetitiveReLUConfig, **kwargs: Any) -> "CompetitiveReLU":
        return cls(config, **kwargs)

    def reset_parameters(self) -> None:
        """Set alpha and beta to the config's start values, rounded once in their own dtype."""
        with torch.no_grad():
            self.alpha.fill_(float(self.config.alpha_init))
            self.beta.fill_(float(self.config.beta))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _competitive_relu(
            z, self.alpha, self.beta, self.k, self.eps, self.measure, self.reduce
        )

    def extra_repr(self) -> str:
        return f"measure={self.measure}, reduce={self.reduce}, k={self.k}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------
# MRePU and RePU


def _mrepu(x: torch.Tensor, p: float, c: float) -> torch.Tensor:
    return x * (x + c).clamp_min(0.0).pow(p)


def mrepu(x: torch.Tensor, p: float = 2.0, c: float = 1.0) -> torch.Tensor:
    """MRePU ``x * max(0, x + c)^p``. It grows like |x|^(p+1), so half inputs are computed in
    float32, and results beyond the dtype's range saturate at its largest finite value."""
    return _saturate(_mrepu(_cast(x, _compute_dtype(x.dtype)), p, c), x.dtype)


def blended_mrepu(x: torch.Tensor, blend: float, p: float = 2.0, c: float = 1.0) -> torch.Tensor:
    """``(1 - blend) * max(x, 0) + blend * mrepu(x)``: the walk from ReLU (0) to MRePU (1).

    ``blend`` is a Python float, so the end points compute only their own term and the branch
    is fixed in an exported graph.
    """
    if blend == 1.0:
        return mrepu(x, p, c)
    if blend == 0.0:
        return x.clamp_min(0.0)
    xa = _cast(x, _compute_dtype(x.dtype))
    return _saturate((1.0 - blend) * xa.clamp_min(0.0) + blend * _mrepu(xa, p, c), x.dtype)


def repu(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """RePU ``max(0, x)^p``, computed like :func:`mrepu` (float32 for halves, saturating)."""
    return _saturate(_cast(x, _compute_dtype(x.dtype)).clamp_min(0.0).pow(p), x.dtype)


class MRePU(nn.Module):
    """MRePU blended with ReLU: ``(1 - blend) * ReLU(x) + blend * x * max(0, x + c)^p``.

    ``blend`` (lam) is a plain float attribute that a fine-tuning schedule may set at any time;
    it is not a parameter and not saved in the state dict. ``config`` is the config the module
    was built from (its ``blend`` is the start value).
    """

    def __init__(self, config: Optional[MRePUConfig] = None, **overrides: Any) -> None:
        super().__init__()
        config = config if config is not None else MRePUConfig()
        if not isinstance(config, MRePUConfig):
            raise UsageError(f"MRePU needs an MRePUConfig, got {config!r}")
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.p: float = float(config.p)
        self.c: float = float(config.c)
        self.blend: float = float(config.blend)

    @classmethod
    def from_config(cls, config: MRePUConfig, **kwargs: Any) -> "MRePU":
        return cls(config, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blended_mrepu(x, self.blend, self.p, self.c)

    def extra_repr(self) -> str:
        return f"p={self.p}, c={self.c}, blend={self.blend}"


class RePU(nn.Module):
    """RePU ``max(0, x)^p``: for comparison experiments (deep RePU stacks do not train)."""

    def __init__(self, config: Optional[RePUConfig] = None, **overrides: Any) -> None:
        super().__init__()
        config = config if config is not None else RePUConfig()
        if not isinstance(config, RePUConfig):
            raise UsageError(f"RePU needs a RePUConfig, got {config!r}")
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.p: float = float(config.p)

    @classmethod
    def from_config(cls, config: RePUConfig, **kwargs: Any) -> "RePU":
        return cls(config, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return repu(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---------------------------------------------------------------------------------------------
# Registry

ACTIVATIONS: dict[str, type[nn.Module]] = {
    CompetitiveReLUConfig.name: CompetitiveReLU,
    MRePUConfig.name: MRePU,
    RePUConfig.name: RePU,
}
"""Activation name (``config.name``, the CLI's ``--to``) -> module class."""

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = tuple(ACTIVATIONS.values())
"""Every module class this file defines: what a retrofitted model holds instead of ReLU."""


def make_activation(
    config: ActivationConfig | str,
    *,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """A new activation module for one site, built from a config (or a name, with defaults).

    ``device``/``dtype`` place the module's parameters (CAReLU only has any); creating them in
    the model's dtype keeps the identity init exact in float64.
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise UsageError(f"unknown activation {config!r}; choose one of: {', '.join(CONFIGS)}")
        config = CONFIGS[config]()
    name = getattr(config, "name", None)
    if name not in ACTIVATIONS:
        raise UsageError(f"no activation for config {config!r}; known: {', '.join(ACTIVATIONS)}")
    if isinstance(config, CompetitiveReLUConfig):
        return CompetitiveReLU.from_config(config, device=device, dtype=dtype)
    module = ACTIVATIONS[name].from_config(config)  # type: ignore[attr-defined]
    return module.to(device) if device is not None else module
