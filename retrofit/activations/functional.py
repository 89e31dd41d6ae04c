"""The functional forms of CAReLU, MRePU and RePU, and the rules they share (activations.md).

What the rest of the project may rely on:

* No ReLU in any spelling is computed here (``clamp``/``clamp_min`` instead), so a retrofitted
  graph has no ``aten.relu`` / ONNX ``Relu`` left for the rewriters to find.
* No Python control flow on tensor values: the forms run under ``torch.export``,
  ``torch.jit.script`` and the ONNX exporter (opset 13+). Branches depend only on strings,
  Python floats, the input's rank and its dtype, all fixed when a graph is captured.
* Finite inputs give finite outputs in float32, bfloat16 and float16. CAReLU measures the
  competition scale-invariantly; a result beyond the dtype's range *saturates* at its largest
  finite value instead of becoming inf. bfloat16/float16 inputs are computed in float32 and
  returned in their own dtype.

Each activation has two implementations of one formula, which agree to rounding:

* The plain tensor formulas here are what graph capture sees: TorchScript, ``torch.jit.trace``
  and the TorchScript-based ONNX exporter record them as they are. Under ``torch.compile`` the
  competition is summed in float64 instead of rescaling by max|z| first, so Inductor needs one
  reduction pass and one pointwise pass per site. A program captured for ONNX (within
  :func:`onnx_export_form`) takes the sums on ``z`` itself, and ``torch.cond`` runs the rescaled
  measurement only where they left the safe range: the ONNX emission's form. Programs kept as
  ``.pt2`` have no ``torch.cond``, which tools that watch the dispatcher cannot all run.
* Eager calls take the fast kernels of :mod:`retrofit.activations.kernels`. Which one runs is
  decided here, from the mode (tracing, compiling, exporting) and tensor metadata, never from
  tensor values.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, List, Sequence

import torch

from retrofit.activations.kernels import (
    CAReLUPlan,
    MRePUPlan,
    eager_competitive_relu,
    eager_mrepu,
)
from retrofit.config import MEASURES, REDUCTIONS, check_choice

# ---------------------------------------------------------------------------------------------
# Dtypes and saturation


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
# Which path runs


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _compiling_not_exporting() -> bool:
    """torch.compile (not torch.export): the graph is fused, not stored, so float64 sums, one
    reduction pass, are the cheaper spelling; exported graphs keep the portable scaled one."""
    return torch.compiler.is_compiling() and not _is_exporting()


def _in_onnx_export() -> bool:
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _capturing_graph() -> bool:
    """True while any tracer or compiler captures a graph: it gets the plain formulas.

    Run on every eager call, so the cheap flags come first: ``is_compiling`` is also set by
    ``torch.export``, and ONNX's flag is read only once ``torch.onnx`` (imported lazily by
    torch) is loaded, as every ONNX export loads it."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or _is_exporting()
        or _in_onnx_export()
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


# ---------------------------------------------------------------------------------------------
# CAReLU


def competition_axes(ndim: int, reduce: str) -> List[int]:
    """The axes the competition ``p(z)`` sums over, for an input of rank ``ndim``.

    ``sample``: all non-batch axes. ``channel``: the spatial axes of each (sample, channel)
    for rank >= 3; a 2-D ``(N, C)`` input has no spatial axes (each channel would compete with
    itself only), so it falls back to ``sample``. ``last``: the last axis (tokens of a sequence
    are independent). ``auto``: ``last`` for 3-D inputs, ``sample`` otherwise. A 0-D or 1-D
    input is a single sample: every axis. The one rule for the torch forms and the ONNX
    emission; callers check ``reduce`` with :func:`retrofit.config.check_choice` first.
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
    raise ValueError("unknown reduce " + reduce)


def _row_length(shape: Sequence[int], reduce: str) -> int:
    """D such that ``z.reshape(-1, D)`` has one competition group per row: the competition
    axes are always trailing, so the groups are contiguous runs of a contiguous tensor."""
    d = 1
    for axis in competition_axes(len(shape), reduce):
        d *= shape[axis]
    return d


@functools.lru_cache(maxsize=1024)
def _carelu_plan(k: float, eps: float, measure: str, reduce: str, shape: torch.Size,
                 dtype: torch.dtype) -> CAReLUPlan:
    """The eager kernels' plan for a site's settings and an input's shape and dtype: built
    once per combination, as an eager call per layer and batch would otherwise spend on it a
    good part of what a small tensor's whole activation costs."""
    return CAReLUPlan(k, eps, measure, _row_length(shape, reduce), _finite_max(dtype),
                      _compute_dtype(dtype))


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
    raise ValueError("unknown measure " + measure)


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


_ONNX_FORM: ContextVar[bool] = ContextVar("cadrelu_onnx_form", default=False)


@contextmanager
def onnx_export_form() -> Iterator[None]:
    """Within it, ``torch.export`` records CompetitiveReLU in the form that onnxruntime runs in
    the fewest passes (:func:`_competitive_relu_exported`), for a program that is translated
    to ONNX and not kept."""
    token = _ONNX_FORM.set(True)
    try:
        yield
    finally:
        _ONNX_FORM.reset(token)


def _exporting_for_onnx() -> bool:
    return _ONNX_FORM.get() and _is_exporting()


def _competitive_relu_exported(z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                               k: float, eps: float, measure: str, reduce: str) -> torch.Tensor:
    """The energy and L1 formula as ``torch.export`` records it within
    :func:`onnx_export_form`, for the ONNX files written from torch: the pass structure of
    :mod:`retrofit.onnx_path.emission`, since onnxruntime runs each op as its own pass.

    The two sums of ``z`` itself, then ``torch.cond`` (an ONNX ``If`` on one element) twice:
    the max|z|-rescaled measurement only where a sum left the range below big / k (float16
    inputs cannot), and
    ``max(z, 0) * s`` as the output when every ``s`` is >= 0, which with the sums in range equals
    ``clamp(s * z, 0, big)`` without saturating.
    """
    dims = competition_axes(z.dim(), reduce)
    big = _finite_max(z.dtype)
    zc = _cast(z, _compute_dtype(z.dtype))
    if len(dims) > 1:  # rows of (groups, D), as the emission: no NCHWc-blocked square
        zc, dims = zc.flatten(dims[0]), [dims[0]]
    positive = zc.clamp_min(0.0)
    if measure == "energy":
        total = (zc * zc).sum(dims, keepdim=True)
        part = (positive * positive).sum(dims, keepdim=True)
    else:
        total = zc.abs().sum(dims, keepdim=True)
        part = positive.sum(dims, keepdim=True)
    if z.dtype == torch.float16:
        s = k * torch.tanh(alpha * (part / (total + eps)) + beta)
        return _cast((s * zc).clamp(0.0, big), z.dtype).reshape(z.shape)
    # every sum below big / k: none overflowed and |s * z| < big (False for inf and NaN,
    # which the rescaled form keeps)
    in_range = total.sum() < big / k
    p = torch.cond(in_range, lambda part, total, zc: part / (total + eps),
                   lambda part, total, zc: _competition(zc, measure, eps, reduce),
                   (part, total, zc))
    s = k * torch.tanh(alpha * p + beta)
    if zc.dtype != z.dtype:  # bfloat16: the cast back needs the saturation
        return _cast((s * zc).clamp(0.0, big), z.dtype).reshape(z.shape)
    same_sign = in_range & (s.clamp_max(0.0).sum() == 0)  # every s >= 0; True when empty
    y = torch.cond(same_sign, lambda positive, zc, s: positive * s,
                   lambda positive, zc, s: (s * zc).clamp(0.0, big), (positive, zc, s))
    return y.reshape(z.shape)


def _competitive_relu(z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, k: float,
                      eps: float, measure: str, reduce: str) -> torch.Tensor:
    """The plain CAReLU formula, what graph capture records."""
    if torch.jit.is_scripting():
        p = _competition(z, measure, eps, reduce)
    elif _compiling_not_exporting():
        p = _competition_wide(z, measure, eps, reduce)
    elif _exporting_for_onnx() and measure != "count":
        return _competitive_relu_exported(z, alpha, beta, k, eps, measure, reduce)
    else:
        p = _competition(z, measure, eps, reduce)
    s = k * torch.tanh(alpha * p + beta)
    # max(s*z, 0) as a clamp, never a relu; the upper bound turns an overflow of |s| > 1
    # into the dtype's largest finite value.
    return _cast((s * _cast(z, p.dtype)).clamp(0.0, _finite_max(z.dtype)), z.dtype)


def _as_param(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), dtype=dtype, device=device)


def carelu(z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, k: float, eps: float,
           measure: str, reduce: str, inplace: bool = False) -> torch.Tensor:
    """CAReLU with checked settings: the eager kernel where it applies, else the formula.

    Positional (TorchScript rejects keyword-only arguments with defaults); TorchScript
    compiles only the formula. ``inplace`` lets eager inference write into ``z``, see
    :func:`retrofit.activations.kernels.eager_competitive_relu`.
    """
    if not torch.jit.is_scripting():
        if _eager_carelu_applies(z, alpha, beta):
            plan = _carelu_plan(k, eps, measure, reduce, z.shape, z.dtype)
            a, b = _as_param(alpha, plan.acc, z.device), _as_param(beta, plan.acc, z.device)
            if a.dtype == b.dtype:  # the kernel returns both gradients in alpha's dtype
                return eager_competitive_relu(z, a, b, plan, inplace)
    return _competitive_relu(z, alpha, beta, k, eps, measure, reduce)


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
    # Python floats work as alpha/beta too; the annotation is TorchScript's.
    return carelu(z, alpha, beta, float(k), float(eps), measure, reduce)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# MRePU and RePU


def mrepu_term(x: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """The paper's MRePU ``x * max(0, x + c)^p``, unsaturated."""
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
    return gained_mrepu(x, gains[0], gains[1], float(blend), float(p), float(c))


def gained_mrepu(x: torch.Tensor, gain_in: torch.Tensor, gain_out: torch.Tensor, blend: float,
                 p: float, c: float) -> torch.Tensor:
    """:func:`mrepu` with tensor gains, in a form TorchScript compiles (the formula only)."""
    if blend == 0.0:
        return x.clamp_min(0.0)
    compute = _compute_dtype(x.dtype)
    big = _finite_max(x.dtype)
    if not torch.jit.is_scripting():
        if _eager_mrepu_applies(x, p):
            return eager_mrepu(x, gain_in, gain_out, MRePUPlan(blend, p, c, big, compute))
    xa = _cast(x, compute)
    y = mrepu_term(xa * gain_in.to(compute), p, c).clamp(-big, big) * gain_out.to(compute)
    if blend != 1.0:
        y = blend * y + (1.0 - blend) * xa.clamp_min(0.0)
    return _saturate(y, x.dtype)


def repu(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """RePU ``max(0, x)^p``, computed like :func:`mrepu` (float32 for halves, saturating)."""
    return _saturate(_cast(x, _compute_dtype(x.dtype)).clamp_min(0.0).pow(p), x.dtype)
