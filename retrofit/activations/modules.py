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

Each activation has two implementations of one formula, which agree to rounding:

* The plain tensor formulas (``_competitive_relu``, ``_mrepu``) are what graph capture sees:
  TorchScript, ``torch.jit.trace``, ``torch.export`` and the ONNX exporter record them as they
  are. Under ``torch.compile`` the competition is summed in float64 instead of rescaling by
  max|z| first, so Inductor needs one reduction pass and one pointwise pass per site.
* Eager calls take a fast path: the competition is reduced over a contiguous ``(rows, D)`` view
  (PyTorch's multi-axis ``amax`` is ~100x slower on CPU than a last-axis one), work buffers are
  reused in place, and under autograd a custom ``torch.autograd.Function`` saves only the input
  and a few numbers per row and recomputes the elementwise terms in backward (the plain formulas
  keep three or four input-sized tensors per call). Its backward is not itself differentiable
  (no double backward).

Which one runs is decided from the mode (tracing, compiling, exporting, grad enabled) and tensor
metadata, never from tensor values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from retrofit.config import (
    CONFIGS,
    MEASURES,
    REDUCTIONS,
    ActivationConfig,
    CompetitiveReLUConfig,
    MRePUConfig,
    RePUConfig,
    check_choice,
)
from retrofit.errors import UsageError


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


def _competition_wide(z: torch.Tensor, measure: str, eps: float, reduce: str) -> torch.Tensor:
    """``_competition`` for float32/half inputs with float64 sums instead of the max-abs scale:
    squares of any float32 value are finite in float64 (< 1.2e77) and none underflows, so one
    reduction pass suffices. What ``torch.compile`` fuses (it reads z once for the sums)."""
    dims = competition_axes(z.dim(), reduce)
    acc = _compute_dtype(z.dtype)
    if measure == "count" or z.dtype == torch.float64:
        return _competition(z, measure, eps, reduce)
    wide = z.to(torch.float64)
    positive = wide.clamp_min(0.0)
    if measure == "energy":
        share = (positive * positive).sum(dims, keepdim=True) / (
            (wide * wide).sum(dims, keepdim=True) + eps
        )
    else:
        share = positive.sum(dims, keepdim=True) / (wide.abs().sum(dims, keepdim=True) + eps)
    return share.to(acc)


def competition(
    z: torch.Tensor, measure: str = "energy", eps: float = 1e-6, reduce: str = "auto"
) -> torch.Tensor:
    """The competition result ``p(z)`` in [0, 1]: the positive side's share of ``z``.

    ``measure`` is ``energy`` (share of sum z^2), ``l1`` (share of sum |z|) or ``count`` (share
    of positive entries; no gradient flows through it). ``reduce`` picks the axes, see
    :func:`competition_axes`. The result keeps those axes with size 1, so it broadcasts against
    ``z``; it is float32 for half inputs and ``z``'s dtype otherwise.
    """
    check_choice(measure, MEASURES, "measure")
    check_choice(reduce, REDUCTIONS, "reduce")
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
    if torch.jit.is_scripting():
        p = _competition(z, measure, eps, reduce)
    elif _compiling_not_exporting():
        p = _competition_wide(z, measure, eps, reduce)
    else:
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
    check_choice(measure, MEASURES, "measure")
    check_choice(reduce, REDUCTIONS, "reduce")
    if _eager_carelu_applies(z, alpha, beta):
        return _eager_competitive_relu(z, alpha, beta, float(k), float(eps), measure, reduce)
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

    ``inplace`` means what it means for ``nn.ReLU``: the caller no longer needs the input, so
    eager inference (no autograd, CPU, a contiguous float32/float64 input, s >= 0 for every
    input) may write the result into the input's memory. Training and graph capture never do.
    The rewriters set it where the replaced ReLU was in-place.
    """

    def __init__(
        self,
        config: Optional[CompetitiveReLUConfig] = None,
        *,
        inplace: bool = False,
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
        check_choice(config.measure, MEASURES, "measure")
        check_choice(config.reduce, REDUCTIONS, "reduce")
        self.config = config
        self.measure: str = config.measure
        self.reduce: str = config.reduce
        self.k: float = float(config.k)
        self.eps: float = float(config.eps)
        self.inplace: bool = inplace
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
        if not torch.jit.is_scripting():  # TorchScript compiles only the plain formula
            if _eager_carelu_applies(z, self.alpha, self.beta):
                return _eager_competitive_relu(
                    z, self.alpha, self.beta, self.k, self.eps, self.measure, self.reduce,
                    self.inplace,
                )
        return _competitive_relu(
            z, self.alpha, self.beta, self.k, self.eps, self.measure, self.reduce
        )

    def extra_repr(self) -> str:
        inplace = ", inplace=True" if self.inplace else ""
        return f"measure={self.measure}, reduce={self.reduce}, k={self.k}, eps={self.eps}{inplace}"


# ---------------------------------------------------------------------------------------------
# MRePU and RePU


def _mrepu(x: torch.Tensor, p: float, c: float) -> torch.Tensor:
    return x * (x + c).clamp_min(0.0).pow(p)


Gain = float | torch.Tensor
"""An MRePU gain: a Python float, or a 0-dim tensor (a module's trainable parameter)."""


def mrepu(x: torch.Tensor, p: float = 2.0, c: float = 1.0, *, gain_in: Gain = 1.0,
          gain_out: Gain = 1.0, blend: float = 1.0) -> torch.Tensor:
    """``(1 - blend) * max(x, 0) + blend * gain_out * MRePU(gain_in * x)``, MRePU being
    ``u * max(0, u + c)^p``; with the defaults, the paper's MRePU.

    The gains are the calibrated swap's (activations.md §2): fitted so that a site that
    replaced a ReLU stays at ReLU's scale. ``blend`` (lam) is a Python float, so the end points
    compute only their own term and the branch is fixed in a captured graph. MRePU grows like
    |x|^(p+1): half inputs are computed in float32, and the MRePU term and the result saturate
    at the dtype's largest finite value (the term first, so a zero gain_out never meets inf).
    """
    gains = [g if isinstance(g, torch.Tensor) else torch.tensor(float(g), device=x.device)
             for g in (gain_in, gain_out)]
    return _gained_mrepu(x, gains[0], gains[1], float(blend), float(p), float(c))


def _gained_mrepu(x: torch.Tensor, gain_in: torch.Tensor, gain_out: torch.Tensor, blend: float,
                  p: float, c: float) -> torch.Tensor:
    """:func:`mrepu` with tensor gains, in a form TorchScript compiles."""
    if blend == 0.0:
        return x.clamp_min(0.0)
    if not torch.jit.is_scripting():
        if _eager_mrepu_applies(x, p):
            return _MRePUFunction.apply(x, gain_in, gain_out, blend, p, c)
    compute = _compute_dtype(x.dtype)
    big = _finite_max(x.dtype)
    xa = _cast(x, compute)
    y = _mrepu(xa * gain_in.to(compute), p, c).clamp(-big, big) * gain_out.to(compute)
    if blend != 1.0:
        y = blend * y + (1.0 - blend) * xa.clamp_min(0.0)
    return _saturate(y, x.dtype)


def repu(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """RePU ``max(0, x)^p``, computed like :func:`mrepu` (float32 for halves, saturating)."""
    return _saturate(_cast(x, _compute_dtype(x.dtype)).clamp_min(0.0).pow(p), x.dtype)


class MRePU(nn.Module):
    """MRePU with the calibrated swap's gains, blended with ReLU:
    ``(1 - blend) * ReLU(x) + blend * gain_out * MRePU(gain_in * x)``.

    ``gain_in`` and ``gain_out`` are trainable 0-dim parameters, 1 at construction (the
    paper's MRePU) and fitted to the ReLU a site replaced by :mod:`retrofit.pipeline.calibrate`.
    ``blend`` (lam) is a plain float attribute that a fine-tuning schedule may set at any time;
    it is not a parameter and not saved in the state dict. ``config`` is the config the module
    was built from (its ``blend`` is the start value).
    """

    def __init__(self, config: Optional[MRePUConfig] = None, *,
                 device: Optional[torch.device | str] = None,
                 dtype: Optional[torch.dtype] = None, **overrides: Any) -> None:
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
        self.gain_in = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self.gain_out = nn.Parameter(torch.ones((), device=device, dtype=dtype))

    @classmethod
    def from_config(cls, config: MRePUConfig, **kwargs: Any) -> "MRePU":
        return cls(config, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gained_mrepu(x, self.gain_in, self.gain_out, self.blend, self.p, self.c)

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
# Eager fast path: fewer passes over memory, and a lean autograd record


def _compiling_not_exporting() -> bool:
    """torch.compile (not torch.export): the graph is fused, not stored, so float64 sums, one
    reduction pass, are the cheaper spelling; exported graphs keep the portable scaled one."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() and not (exporting is not None and exporting())


def _capturing_graph() -> bool:
    """True while any tracer or compiler captures a graph: it gets the plain formulas."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or (exporting is not None and exporting())
        or torch.onnx.is_in_onnx_export()
    )


def _is_scalar_tensor_or_float(value: Any) -> bool:
    return isinstance(value, float) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _eager_carelu_applies(z: torch.Tensor, alpha: Any, beta: Any) -> bool:
    """Whether the fast CAReLU may run: eager, a real floating tensor, scalar alpha/beta.
    Decided on metadata only (dtype, size, mode), never on values."""
    return (
        not _capturing_graph()
        and z.is_floating_point()
        and z.numel() > 0
        and _is_scalar_tensor_or_float(alpha)
        and _is_scalar_tensor_or_float(beta)
    )


def _eager_mrepu_applies(x: torch.Tensor, p: float) -> bool:
    return not _capturing_graph() and x.is_floating_point() and x.numel() > 0 and p > 1.0


def _row_length(z: torch.Tensor, reduce: str) -> int:
    """D such that ``z.reshape(-1, D)`` has one competition group per row: the competition
    axes are always trailing, so the groups are contiguous runs of a contiguous tensor."""
    d = 1
    for axis in competition_axes(z.dim(), reduce):
        d *= z.shape[axis]
    return d


class _CAReLUStats:
    """Per-row numbers the forward computes and the backward reuses (shapes (R, 1))."""

    __slots__ = ("s", "p", "m", "den")

    def __init__(self, s: torch.Tensor, p: torch.Tensor, m: Optional[torch.Tensor],
                 den: Optional[torch.Tensor]) -> None:
        self.s, self.p, self.m, self.den = s, p, m, den


def _carelu_rows(
    rows: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    k: float,
    eps: float,
    measure: str,
    big: float,
) -> tuple[torch.Tensor, _CAReLUStats]:
    """CAReLU of each row of ``rows`` (R, D) in the compute dtype, without autograd.

    Passes over the data: two read-only reductions (max, min) for the scale m, one scaled copy
    u = z/m, one norm, an in-place clamp, one norm, and the output written into u's buffer and
    clamped in place. The result is a new tensor; ``rows`` is never written.
    """
    if measure == "count":
        work = torch.gt(rows, 0.0, out=torch.empty_like(rows))  # 1.0 / 0.0, summed below
        p = work.sum(1, keepdim=True).div_(rows.shape[1])
        s = torch.addcmul(beta, alpha, p).tanh_().mul_(k)
        y = torch.mul(rows, s, out=work)
        return y.clamp_(0.0, big), _CAReLUStats(s, p, None, None)
    # The same scale-invariant measurement as _competition: |u| <= 1 cannot overflow.
    m = torch.maximum(rows.amax(1, keepdim=True), rows.amin(1, keepdim=True).neg_())
    m = m.clamp_min_(1.0)
    u = rows / m
    if measure == "energy":
        den = torch.linalg.vector_norm(u, 2.0, 1, keepdim=True).square_()
        den.add_(eps / (m * m))
        p = torch.linalg.vector_norm(u.clamp_min_(0.0), 2.0, 1, keepdim=True).square_()
    else:
        den = torch.linalg.vector_norm(u, 1.0, 1, keepdim=True).add_(eps / m)
        p = u.clamp_min_(0.0).sum(1, keepdim=True)
    p.div_(den)
    s = torch.addcmul(beta, alpha, p).tanh_().mul_(k)
    y = torch.mul(rows, s, out=u)  # u is spent: its buffer takes the output
    return y.clamp_(0.0, big), _CAReLUStats(s, p, m, den)


def _carelu_rows_backward(
    rows: torch.Tensor,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    k: float,
    measure: str,
    big: float,
    stats: _CAReLUStats,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAReLU backward over rows: (dL/d rows, dL/dt and p * dL/dt per row), t = alpha*p + beta.

    y = clamp(s*z, 0, big) lets the gradient through where 0 <= s*z <= big (clamp's rule, also
    at z = 0). With u = z/m (|u| <= 1), G_u = sum_j g_j u_j [kept_j] and
    dt = dL/dt = k (1 - tanh^2) G_u m:
    dL/dz_j = s g_j [kept_j] + q * (energy: 2 (max(u_j, 0) - p u_j);
                                    l1: [u_j >= 0] - p sign u_j),  q = alpha k (1 - tanh^2) G_u / den
    (p is the same for any m, so m is a constant). Working in u keeps every intermediate finite:
    where dL/ds itself overflows, dt becomes inf but no 0 * inf turns a gradient into NaN.
    """
    # Two input-sized buffers, everything else in place: on CPU a fresh buffer costs more than
    # a pass (page faults), and torch.where with per-row operands is ~30x slower than a pass.
    s, p, m, den = stats.s, stats.p, stats.m, stats.den
    if m is None:  # count: the forward needed no scale
        m = torch.maximum(rows.amax(1, keepdim=True), rows.amin(1, keepdim=True).neg_())
        m = m.clamp_min_(1.0)
    work = torch.mul(rows, s)
    grad_rows = work.clamp(0.0, big).eq_(work)  # 1.0 where clamp passes the gradient, else 0.0
    grad_rows.mul_(grad)
    slope = (1.0 - (s / k) ** 2).mul_(k)  # d s / d t
    # sum_j g_j [kept_j] u_j into the spare buffer (vecdot would allocate a third one)
    g_u = torch.div(rows, m, out=work).mul_(grad_rows).sum(1, keepdim=True).mul_(slope)
    dt = g_u * m
    grad_rows.mul_(s)
    if measure != "count":
        assert den is not None
        q = alpha * g_u / den
        if measure == "energy":
            u = torch.div(rows, m, out=work)
            grad_rows.addcmul_(u, (-2.0) * q * p)
            grad_rows.addcmul_(u.clamp_min_(0.0), 2.0 * q)
        else:
            grad_rows.addcmul_(torch.ge(rows, 0.0, out=work), q)
            grad_rows.addcmul_(torch.sign(rows, out=work), -q * p)
    # d L / d alpha per row: (g_u * p) * m, finite factors, so inf at worst, never NaN
    return grad_rows, dt, (g_u * p).mul_(m)


def _as_param(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), dtype=dtype, device=device)


class _CompetitiveReLUFunction(torch.autograd.Function):
    """CAReLU with a lean autograd record: saves z, alpha and four numbers per row (instead of
    z, u = z/m, max(u, 0) and s*z), and recomputes the elementwise terms in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        k: float,
        eps: float,
        measure: str,
        reduce: str,
    ) -> torch.Tensor:
        acc = _compute_dtype(z.dtype)
        big = _finite_max(z.dtype)
        rows = _cast(z.reshape(-1, _row_length(z, reduce)), acc)
        y, stats = _carelu_rows(rows, alpha, beta, k, eps, measure, big)
        ctx.save_for_backward(z, alpha, stats.s, stats.p, stats.m, stats.den)
        ctx.setup = (k, measure, reduce, big, acc)
        return _cast(y, z.dtype).view(z.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        z, alpha, s, p, m, den = ctx.saved_tensors
        k, measure, reduce, big, acc = ctx.setup
        d = _row_length(z, reduce)
        rows = _cast(z.reshape(-1, d), acc)
        grad = _cast(grad_y.reshape(-1, d), acc)
        stats = _CAReLUStats(s, p, m, den)
        grad_rows, dt, dt_p = _carelu_rows_backward(rows, grad, alpha, k, measure, big, stats)
        grad_z = _cast(grad_rows, z.dtype).view(z.shape) if ctx.needs_input_grad[0] else None
        grad_alpha = grad_beta = None
        if ctx.needs_input_grad[1]:
            grad_alpha = _cast(dt_p.sum(), alpha.dtype).reshape(alpha.shape)
        if ctx.needs_input_grad[2]:
            grad_beta = _cast(dt.sum(), alpha.dtype).reshape(alpha.shape)
        return grad_z, grad_alpha, grad_beta, None, None, None, None


def _eager_competitive_relu(
    z: torch.Tensor,
    alpha: Any,
    beta: Any,
    k: float,
    eps: float,
    measure: str,
    reduce: str,
    inplace: bool = False,
) -> torch.Tensor:
    acc = _compute_dtype(z.dtype)
    a = _as_param(alpha, acc, z.device)
    b = _as_param(beta, acc, z.device)
    if b.dtype != a.dtype:  # the backward returns both gradients in alpha's dtype
        return _competitive_relu(z, a, b, k, eps, measure, reduce)
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or a.requires_grad or b.requires_grad)
    if needs_grad:
        return _CompetitiveReLUFunction.apply(z, a, b, k, eps, measure, reduce)
    rows = _cast(z.reshape(-1, _row_length(z, reduce)), acc)
    big = _finite_max(z.dtype)
    y = None
    if z.device.type == "cpu" and measure != "count":  # its checks read values: no GPU syncs
        in_place = inplace and rows.dtype == z.dtype and z.is_contiguous()  # rows is z's memory
        y = _carelu_rows_inference(rows, a, b, k, eps, measure, big, in_place)
    if y is None:
        y, _ = _carelu_rows(rows, a, b, k, eps, measure, big)
    return _cast(y, z.dtype).view(z.shape)


def _carelu_rows_inference(
    rows: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    k: float,
    eps: float,
    measure: str,
    big: float,
    inplace: bool = False,
) -> Optional[torch.Tensor]:
    """CAReLU (energy or l1) of each row of ``rows`` (R, D) for inference: four passes.

    ``max(z, 0)`` is the output's buffer; the measure is the ratio of two norms, one of the rows
    and one of that buffer, formed in float64 from the (R, 1) norms; then the buffer is scaled
    in place: ``max(s*z, 0) = |s|*max(sign(s)*z, 0)``, rounded once as the formula is. Without
    the max|z| rescaling of :func:`_carelu_rows` this is only exact while the norms and
    ``k * norm`` stay below the dtype's range, so it returns None otherwise (NaN, Inf or huge
    inputs) and the caller falls back to the scaled path. A norm that underflows to 0 changes
    nothing: eps dominates then.
    ``inplace``: ``rows`` may be overwritten, which is done only when the parameters alone show
    that s >= 0 in every row (beta >= 0 and alpha + beta >= 0, as p lies in [0, 1]).
    """
    order = 2.0 if measure == "energy" else 1.0
    norm = torch.linalg.vector_norm(rows, order, 1, keepdim=True)
    if not bool((norm * k < big).all()):  # also False for NaN
        return None
    overwrite = inplace and bool(torch.minimum(beta, alpha + beta) >= 0)
    positive = rows.clamp_min_(0.0) if overwrite else rows.clamp_min(0.0)
    part = torch.linalg.vector_norm(positive, order, 1, keepdim=True).double()
    total = norm.double()
    if measure == "energy":
        part, total = part.square_(), total.square_()
    p = part.div_(total.add_(eps)).to(rows.dtype)
    s = torch.addcmul(beta, alpha, p).tanh_().mul_(k)
    if overwrite:  # s >= 0 in exact arithmetic; no rounding may send a row down the z path
        s.clamp_min_(0.0)
    negative = s < 0
    if bool(negative.any()):  # those rows turn into max(-z, 0) = max(z, 0) - z, exactly
        positive.addcmul_(rows, negative.to(rows.dtype), value=-1.0)
    return positive.mul_(s.abs())


class _MRePUFunction(torch.autograd.Function):
    """:func:`mrepu` with work buffers reused in place; saves only x (and tensor gains) and
    recomputes the derivatives in backward. With ``u = a*x``, ``t = max(u + c, 0)`` and
    ``f(u) = u*t^p``: ``dy/dx = lam*b*a*f'(u) + (1-lam)*[x >= 0]``, ``dy/da = lam*b*x*f'(u)``,
    ``dy/db = lam*f(u)``, ``f'(u) = t^(p-1)*(t + p*u)``; each is zero where the value it passes
    through saturated."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, gain_in: torch.Tensor, gain_out: torch.Tensor, blend: float,
        p: float, c: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, gain_in, gain_out)
        ctx.setup = (blend, p, c)
        compute = _compute_dtype(x.dtype)
        big = _finite_max(x.dtype)
        xa = _cast(x, compute)
        u = torch.mul(xa, gain_in.to(compute))
        y = (u + c).clamp_min_(0.0).pow_(p).mul_(u).clamp_(-big, big)
        y.mul_(gain_out.to(compute))
        if blend != 1.0:
            y.mul_(blend).add_(xa.clamp_min(0.0), alpha=1.0 - blend)
        return _cast(y.clamp_(-big, big), x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        x, gain_in, gain_out = ctx.saved_tensors
        blend, p, c = ctx.setup
        compute = _compute_dtype(x.dtype)
        big = _finite_max(x.dtype)
        xa = _cast(x, compute)
        a, b = gain_in.to(compute), gain_out.to(compute)
        u = xa * a
        t = (u + c).clamp_min_(0.0)
        power = t.pow(p - 1.0)  # t^(p-1); 0 where t = 0 since p > 1
        slope = torch.add(t, u, alpha=p).mul_(power)  # f'(u)
        term = power.mul_(t).mul_(u)  # f(u)
        inner = term.abs() > big
        term.clamp_(-big, big)
        y = term * b
        if blend != 1.0:
            y.mul_(blend).add_(xa.clamp_min(0.0), alpha=1.0 - blend)
        grad = _cast(grad_y, compute).masked_fill(y.abs_() > big, 0.0)
        # masked_fill, not a product: f' may be inf where f(u) saturated
        through = (grad * slope).masked_fill_(inner, 0.0).mul_(blend)  # d y / d f(u) * f'(u)
        needs = ctx.needs_input_grad
        grad_a = grad_b = None
        if needs[1]:
            grad_a = (through * xa).mul_(b).sum().to(gain_in.dtype)
        if needs[2]:
            grad_b = (grad * term).sum().mul_(blend).to(gain_out.dtype)
        grad_x = None
        if needs[0]:
            grad_x = through.mul_(a * b)
            if blend != 1.0:
                grad_x.add_(grad.mul_(xa >= 0.0), alpha=1.0 - blend)
            grad_x = _cast(grad_x, x.dtype)
        return grad_x, grad_a, grad_b, None, None, None


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

    ``device``/``dtype`` place the module's parameters (CAReLU's alpha/beta, MRePU's gains); creating them in
    the model's dtype keeps the identity init exact in float64.
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise UsageError(f"unknown activation {config!r}; choose one of: {', '.join(CONFIGS)}")
        config = CONFIGS[config]()
    name = getattr(config, "name", None)
    if name not in ACTIVATIONS:
        raise UsageError(f"no activation for config {config!r}; known: {', '.join(ACTIVATIONS)}")
    if isinstance(config, (CompetitiveReLUConfig, MRePUConfig)):
        return ACTIVATIONS[name].from_config(config, device=device, dtype=dtype)
    module = ACTIVATIONS[name].from_config(config)  # type: ignore[attr-defined]
    return module.to(device) if device is not None else module
