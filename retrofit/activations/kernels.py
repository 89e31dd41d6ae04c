"""The eager CAReLU and MRePU kernels: fewer passes over memory, and a lean autograd record.

What :mod:`retrofit.activations.functional` calls outside graph capture, with the numbers it
fixed for the call in a plan. The competition is reduced over a contiguous ``(rows, D)`` view
(PyTorch's multi-axis ``amax`` is ~100x slower on CPU than a last-axis one), work buffers are
reused in place, and under autograd a custom ``torch.autograd.Function`` saves little and
recomputes the elementwise terms in backward (the plain formulas keep three or four input-sized
tensors per call): MRePU its input, CAReLU its output (which the next layer keeps anyway, as for
ReLU), a 2-byte copy of its input and a few numbers per row. The backwards are not themselves differentiable
(no double backward). Eager only: ``x.to(dtype)`` returns ``x`` itself when the dtype matches.

Inference on the CPU (no autograd) takes leaner kernels still, which read values where that
saves work (CAReLU's parameters and per-row totals, MRePU's gains): there a call on a small
tensor (an MLP layer, a batch of one) costs more in per-op dispatch than in passes, so they count
ops as well as passes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch.autograd.function import once_differentiable


class CAReLUPlan(NamedTuple):
    """What one eager CAReLU call runs with: the site's settings and what the input's dtype and
    shape fix."""

    k: float
    eps: float
    measure: str
    length: int
    """D: the input is viewed as (rows, D), one competition group per row."""
    big: float
    """The input dtype's largest finite value: where the output saturates."""
    acc: torch.dtype
    """The compute dtype (float32 for half inputs)."""


class MRePUPlan(NamedTuple):
    """What one eager MRePU call runs with (``big`` and ``compute`` as in :class:`CAReLUPlan`)."""

    blend: float
    p: float
    c: float
    big: float
    compute: torch.dtype


# ---------------------------------------------------------------------------------------------
# CAReLU


def _reads_values(tensor: torch.Tensor) -> bool:
    """Whether the training kernels may read values back to skip work: free on CPU; on a GPU
    it would wait for the device, so there every correction runs instead."""
    return tensor.device.type == "cpu"


class _CAReLUStats(NamedTuple):
    """Per-row numbers the forward computes and the backward reuses (shapes (R, 1)); ``m``,
    ``den``, ``top`` and ``bottom`` are None for the count measure, which needs no scale."""

    s: torch.Tensor
    p: torch.Tensor
    m: Optional[torch.Tensor]
    den: Optional[torch.Tensor]
    top: Optional[torch.Tensor]
    """max_j z_j"""
    bottom: Optional[torch.Tensor]
    """min_j z_j"""


def _carelu_rows(rows: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, plan: CAReLUPlan,
                 out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, _CAReLUStats]:
    """CAReLU of each row of ``rows`` (R, D) in the compute dtype, without autograd.

    The result is ``out`` (R, D) when given, else a new tensor; ``rows`` is never written.
    Energy and l1 on CPU take :func:`_carelu_rows_unscaled` (four passes), elsewhere
    :func:`_carelu_rows_scaled`; count is three passes and a clamp.
    """
    k, big = plan.k, plan.big
    work = torch.empty_like(rows) if out is None else out
    if plan.measure == "count":
        torch.gt(rows, 0.0, out=work)  # 1.0 / 0.0, summed below
        p = work.sum(1, keepdim=True).div_(rows.shape[1])
        s = torch.addcmul(beta, alpha, p).tanh_().mul_(k)
        y = torch.mul(rows, s, out=work)
        return y.clamp_(0.0, big), _CAReLUStats(s, p, None, None, None, None)
    if _reads_values(rows):
        return _carelu_rows_unscaled(rows, alpha, beta, plan, work)
    return _carelu_rows_scaled(rows, alpha, beta, plan, work)


def _carelu_rows_scaled(rows: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                        plan: CAReLUPlan, work: torch.Tensor
                        ) -> tuple[torch.Tensor, _CAReLUStats]:
    """Energy or l1 with the formula's scale-invariant measurement (|u| <= 1 cannot overflow),
    the output in ``work``. Passes: two read-only reductions (max, min) for the scale m, one
    scaled copy u = z/m, one reduction, an in-place clamp, one reduction, and the output
    written into u's buffer and clamped in place."""
    k, eps, big = plan.k, plan.eps, plan.big
    top, bottom = rows.amax(1, keepdim=True), rows.amin(1, keepdim=True)
    m = torch.maximum(top, bottom.neg()).clamp_min_(1.0)
    u = torch.div(rows, m, out=work)
    if plan.measure == "energy":
        den = torch.linalg.vector_norm(u, 2.0, 1, keepdim=True).square_()
        den.add_(eps / (m * m))
        p = torch.linalg.vector_norm(u.clamp_min_(0.0), 2.0, 1, keepdim=True).square_()
    else:  # sum |u| = 2 sum max(u, 0) - sum u: two plain sums instead of the slower 1-norm
        total = u.sum(1, keepdim=True)
        p = u.clamp_min_(0.0).sum(1, keepdim=True)
        den = (2.0 * p).sub_(total).add_(eps / m)
    p.div_(den)
    s = torch.addcmul(beta, alpha, p).tanh_().mul_(k)
    y = torch.mul(rows, s, out=u)  # u is spent: its buffer takes the output
    return y.clamp_(0.0, big), _CAReLUStats(s, p, m, den, top, bottom)


def _carelu_rows_unscaled(rows: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                          plan: CAReLUPlan, work: torch.Tensor
                          ) -> tuple[torch.Tensor, _CAReLUStats]:
    """Energy or l1 measured on z itself: one norm or sum of the rows, ``max(z, 0)`` into
    ``work`` and its norm or sum, then the output written over it as
    ``|s| * max(sign(s) * z, 0)``, which is ``clamp(s*z, 0, big)`` exactly. Rows whose sums
    reach the dtype's range (NaN, Inf or huge inputs) are redone by
    :func:`_carelu_rows_scaled`, alone, so no row's result depends on another's. The scale m
    returned is the row's norm (>= max |z|); den is on u = z/m's scale, as there.
    """
    k, eps, big = plan.k, plan.eps, plan.big
    if plan.measure == "energy":
        total = torch.linalg.vector_norm(rows, 2.0, 1, keepdim=True)
        bad = ~(total < math.sqrt(big / k))  # also for NaN
        den = total.square().add_(eps)
        positive = torch.clamp_min(rows, 0.0, out=work)
        p = torch.linalg.vector_norm(positive, 2.0, 1, keepdim=True).square_().div_(den)
        m = total.clamp_min_(1.0)
        den.div_(m * m)
    else:  # sum |z| = 2 sum max(z, 0) - sum z
        signed = rows.sum(1, keepdim=True)
        positive = torch.clamp_min(rows, 0.0, out=work)
        p = positive.sum(1, keepdim=True)
        den = (2.0 * p).sub_(signed).add_(eps)
        bad = ~(den < big / k)
        p.div_(den)
        m = (den - eps).clamp_min_(1.0)
        den.div_(m)
    s = torch.addcmul(beta, alpha, p).tanh_().mul_(k)
    negative = s < 0
    if bool(negative.any()):  # those rows turn into max(-z, 0) = max(z, 0) - z, exactly
        positive.addcmul_(rows, negative.to(rows.dtype), value=-1.0)
    y = positive.mul_(s.abs())
    if bool(bad.any()):
        redo = bad.view(-1).nonzero().view(-1)
        y_bad, fixed = _carelu_rows_scaled(rows[redo], alpha, beta, plan, y[redo])
        y[redo] = y_bad
        for mine, theirs in zip((s, p, m, den), fixed):
            mine[redo] = theirs
    return y, _CAReLUStats(s, p, m, den, None, None)


class _CAReLUSaved(NamedTuple):
    """What the backward reads besides the output y and the gradient: per-row tensors (R, 1)
    and ``side`` (R, D)."""

    s: torch.Tensor
    p: torch.Tensor
    m: torch.Tensor
    den: Optional[torch.Tensor]
    sign: torch.Tensor
    """+1 or -1, with the sign of s (also of s = ±0)."""
    side: torch.Tensor
    """sign * z: kept_j is side_j >= 0. bfloat16 for float32 inputs, exact otherwise."""
    overflow: Optional[torch.Tensor]
    """Rows where some s*z_j overflows (there y_j == big no longer tells s*z_j == big); None
    where the forward found no row whose |s| m could reach big."""
    unusual: bool
    """Whether some row may overflow or has |s| < _TINY_SCALE (always True off the CPU)."""


_TINY_SCALE = 2.0 ** -100
"""Below this |s| even products s*z_j of |z_j| >= 2^-26 may be subnormal: y no longer carries
s*z to working precision (above it, only elements that small lose precision, by 2^-150)."""
_BFLOAT16_MAX = 3.3895313892515355e38


def _side_dtype(dtype: torch.dtype) -> torch.dtype:
    """The copy of sign*z kept for backward: bfloat16 (float32's range, 2 bytes) for float32
    inputs, whose output y carries s*z exactly where the gradient needs it; exact otherwise
    (float64 for gradcheck, and a half input is its own 2-byte copy)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def _keep_where_side_nonnegative(work: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """``work * [side >= 0]`` in place, in one pass (ReLU's own backward kernel): the threshold
    is the negative number closest to zero in side's dtype, so side = 0 (z = 0) is kept."""
    info = torch.finfo(side.dtype)
    threshold = -info.smallest_normal * info.eps
    return torch.ops.aten.threshold_backward.grad_input(work, side, threshold, grad_input=work)


def _kept_sum(grad: torch.Tensor, wide: torch.Tensor, saved: _CAReLUSaved,
              saturated: Optional[torch.Tensor]) -> torch.Tensor:
    """sum_j g_j u_j [kept_j] per row from ``wide`` = sign*z in the compute dtype: kept where
    sign*z >= 0 (all of a row where s = 0, since then s*z = 0), not where y saturated."""
    work = torch.mul(wide, saved.sign / saved.m).mul_(grad)  # g_j u_j
    everywhere = work.sum(1, keepdim=True)
    _keep_where_side_nonnegative(work, wide)
    if saturated is not None:
        work.masked_fill_(saturated, 0.0)
    return torch.where(saved.s == 0, everywhere, work.sum(1, keepdim=True))


def _carelu_rows_backward(y: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor,
                          plan: CAReLUPlan, saved: _CAReLUSaved, rows_needed: bool = True
                          ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """CAReLU backward over rows: (dL/d rows or None, dL/dt and p * dL/dt per row),
    t = alpha*p + beta, from the output y, the copy ``side`` = sign*z and per-row numbers.

    y = clamp(s*z, 0, big) lets the gradient through where 0 <= s*z <= big (clamp's rule): where
    side >= 0 (z = 0 and s = 0 included), except where y saturated in an overflow row. With
    u = z/m (|u| <= 1), G_u = sum_j g_j u_j [kept_j] and dt = dL/dt = k (1 - tanh^2) G_u m:
    dL/dz_j = s g_j [kept_j] + q * (energy: 2 (max(u_j, 0) - p u_j);
                                    l1: [u_j >= 0] - p sign u_j),  q = alpha k (1 - tanh^2) G_u / den.
    In side's terms (w = sign*z, P = p where sign > 0, else 1 - p: the winning side's share):
    energy: [w >= 0] (s g + 2q w/m) - 2q P w/m;  l1: [w >= 0] (s g + q) - q P sign w.
    G_u comes from y (kept u_j = y_j / (s m), exact); rows where y cannot tell it (s = 0 or
    tiny, overflow, half outputs) take it from side. Only the energy term reads side's values:
    a bfloat16 side bounds its error by 2^-8 of that term. Work stays finite: where dL/ds itself
    overflows, dt becomes inf but no 0 * inf turns a gradient into NaN.
    """
    # Two input-sized buffers, everything else in place and in one dtype: on CPU a fresh buffer
    # costs more than a pass (page faults), and an op on mixed dtypes makes a hidden one.
    s, p, m, sign, side = saved.s, saved.p, saved.m, saved.sign, saved.side
    slope = (1.0 - (s / plan.k) ** 2).mul_(plan.k)  # d s / d t
    g_u: Optional[torch.Tensor] = None
    settled = False
    if y.dtype == grad.dtype:
        wide = torch.mul(grad, y)  # scratch until side is decoded into it
        g_u = wide.sum(1, keepdim=True).div_(m).div_(s)  # sum_j g_j y_j / (s m)
        settled = not saved.unusual and bool(g_u.isfinite().all())
        wide = side if side.dtype == grad.dtype else wide.copy_(side)
    else:  # a half output is s*z rounded: side (exact there) answers for every row
        wide = side.to(grad.dtype)
    saturated = None
    if not settled:
        if saved.overflow is not None:
            saturated = (y == plan.big) & saved.overflow
        from_side = _kept_sum(grad, wide, saved, saturated)
        if g_u is None:
            g_u = from_side
        else:
            doubtful = (s.abs() < _TINY_SCALE) | ~g_u.isfinite()
            if saved.overflow is not None:
                doubtful |= saved.overflow
            g_u = torch.where(doubtful, from_side, g_u)
    dt_m = slope.mul_(g_u)  # (dL/dt) / m, finite
    dt, dt_p = dt_m * m, (dt_m * p).mul_(m)  # finite factors, so inf at worst, never NaN
    if not rows_needed:
        return None, dt, dt_p
    work = torch.mul(grad, s)
    if saturated is not None:
        work.masked_fill_(saturated, 0.0)
    if plan.measure == "count":
        return _keep_where_side_nonnegative(work, wide), dt, dt_p
    assert saved.den is not None
    q = (alpha * dt_m).div_(saved.den)
    share = torch.where(sign > 0, p, 1.0 - p)
    if plan.measure == "energy":
        c = q.mul_(2.0).div_(m)  # 2q/m
        work.addcmul_(wide, c)
        _keep_where_side_nonnegative(work, wide)
        work.addcmul_(wide, c.mul_(share).neg_())
    else:
        _keep_where_side_nonnegative(work.add_(q), wide)
        signs = torch.sign(wide) if wide is side else wide.sign_()  # side itself stays intact
        work.addcmul_(signs, q.mul_(share).neg_())
    return work, dt, dt_p


_ROOT_OF_MAX = {dtype: torch.finfo(dtype).max ** 0.5 / 2
                for dtype in (torch.float32, torch.float64)}
"""Below this a square, and a sum of squares plus eps, is finite in the dtype (with room for
the rounding of two norms of the same numbers)."""


def _carelu_inference(z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                      plan: CAReLUPlan, inplace: bool) -> Optional[torch.Tensor]:
    """CAReLU (energy or l1) of ``z`` for CPU inference in four passes, or None where the
    scaled kernel must do it: ``max(z, 0)`` is the output's buffer; the measure is the ratio
    of two per-group sums, one of ``z`` and one of that buffer (energy: 2-norms, squared; l1:
    sum max(z, 0) and sum |z| = 2 sum max(z, 0) - sum z); then the buffer is scaled in place:
    ``max(s*z, 0) = |s|*max(sign(s)*z, 0)``, rounded once as the formula is.

    Without the max|z| rescaling of :func:`_carelu_rows` this is only exact while the per-group
    totals, their squares (energy) and ``k * total`` stay inside the dtype's range, so it
    returns None otherwise (NaN, Inf or huge inputs), with ``z`` unwritten. A total that
    underflows to 0 changes nothing: eps dominates then.

    The buffer may be the input's own memory (``inplace``, contiguous, the compute dtype) or
    the call's float32 copy of a half input, but only when the parameters alone show that
    s >= 0 in every group (beta >= 0 and alpha + beta >= 0, as p lies in [0, 1]): groups with
    s < 0 need the input after ``max(z, 0)`` is formed. Made for small tensors as much as for
    large ones, so every op counts: a single group (batch 1) is reduced as a whole and its
    numbers are Python floats; several groups are rows of a (R, D) view.
    """
    x = z if z.dtype == plan.acc else z.to(plan.acc)
    a, b = alpha.item(), beta.item()  # CPU: no device sync
    if not (math.isfinite(a) and math.isfinite(b) and plan.eps > 0.0):
        return None  # (so that no NaN or inf is made below, where NumPy would warn of it)
    nonnegative = b >= 0.0 and a + b >= 0.0
    overwrite = nonnegative and (x is not z or (inplace and z.is_contiguous()))
    bound = plan.big / plan.k  # outputs are at most k * max|z| <= k * total
    if plan.measure == "energy":
        bound = min(bound, _ROOT_OF_MAX[plan.acc])
    if plan.length == z.numel():
        y = _carelu_group_inference(x, a, b, plan, bound, overwrite, nonnegative)
    else:
        rows = x if x.dim() == 2 and x.shape[1] == plan.length else x.reshape(-1, plan.length)
        # a copy made by reshape (a strided input) is the call's own, like x's
        overwrite = nonnegative and (overwrite or rows.data_ptr() != x.data_ptr())
        y = _carelu_rows_inference(rows, a, b, plan, bound, overwrite, nonnegative)
        if y is not None and y.dim() != z.dim():
            y = y.view_as(z)  # (view(z.shape) costs three times as much)
    if y is None or y.dtype == z.dtype:
        return y
    return y.to(z.dtype)


def _carelu_rows_inference(rows: torch.Tensor, a: float, b: float, plan: CAReLUPlan,
                           bound: float, overwrite: bool, nonnegative: bool
                           ) -> Optional[torch.Tensor]:
    """:func:`_carelu_inference` of each row of ``rows`` (R, D). The per-row numbers are
    worked in place in the (R, 1) norm buffers through NumPy views of them: a torch op on so
    few numbers costs 1-2 us of dispatch (and one more to convert each Python scalar), a
    NumPy ufunc a fraction of that, and the scale ends in a tensor that multiplies the rows."""
    if plan.measure == "energy":
        total = torch.linalg.vector_norm(rows, 2.0, 1, keepdim=True)
        t = total.numpy()
        if not t.max() < bound:  # also for NaN
            return None
        positive = rows.clamp_min_(0.0) if overwrite else rows.clamp_min(0.0)
        scale = torch.linalg.vector_norm(positive, 2.0, 1, keepdim=True)
        s = scale.numpy()
        s *= s
        t *= t
    else:  # l1: vector_norm(ord=1) is several times slower than two sums on CPU
        positive = rows.clamp_min(0.0)  # the check needs both sums: rows stay intact until then
        scale = positive.sum(1, keepdim=True)
        total = rows.sum(1, keepdim=True).neg_().add_(scale, alpha=2.0)  # may overflow: torch
        s, t = scale.numpy(), total.numpy()
        if not t.max() < bound:
            return None
    t += plan.eps
    s /= t  # p
    s *= a
    s += b
    np.tanh(s, out=s, dtype=np.float64)  # rounded once: NumPy's float32 tanh is 1 ulp off
    s *= plan.k
    if nonnegative:  # s >= 0 in exact arithmetic; no rounding may send a row down the z path
        np.maximum(s, 0.0, out=s)
    elif not s.min() >= 0.0:  # those rows turn into max(-z, 0) = max(z, 0) - z, exactly
        positive.addcmul_(rows, torch.from_numpy(s < 0.0).to(rows.dtype), value=-1.0)
        np.abs(s, out=s)
    if overwrite and positive is not rows:
        return torch.mul(positive, scale, out=rows)
    return positive.mul_(scale)


def _carelu_group_inference(x: torch.Tensor, a: float, b: float, plan: CAReLUPlan,
                            bound: float, overwrite: bool, nonnegative: bool
                            ) -> Optional[torch.Tensor]:
    """:func:`_carelu_inference` of ``x`` as one group, of any shape: reduced as a whole,
    its numbers in Python floats (float64: as exact as tensor ops in the compute dtype)."""
    if plan.measure == "energy":
        total = torch.linalg.vector_norm(x).item()
        if not total < bound:
            return None
        positive = x.clamp_min_(0.0) if overwrite else x.clamp_min(0.0)
        scale = torch.linalg.vector_norm(positive)
        part = scale.item()
        p = part * part / (total * total + plan.eps)
    else:
        positive = x.clamp_min(0.0)
        scale = positive.sum()
        part = scale.item()
        total = 2.0 * part - x.sum().item()
        if not total < bound:
            return None
        p = part / (total + plan.eps)
    # s goes into a 0-dim tensor (rounded to the dtype, as the formula's is): a Python float
    # would be wrapped and converted by every multiplication
    s = plan.k * math.tanh(a * p + b)
    if nonnegative:
        s = max(s, 0.0)
    elif s < 0.0:  # max(s*z, 0) = -s * max(-z, 0) and max(-z, 0) = max(z, 0) - z, exactly
        return positive.sub_(x).mul_(scale.fill_(-s))
    if overwrite and positive is not x:
        return torch.mul(positive, scale.fill_(s), out=x)
    return positive.mul_(scale.fill_(s))


class CompetitiveReLUFunction(torch.autograd.Function):
    """CAReLU with a lean autograd record: saves its output y (which the next layer keeps
    anyway, as ReLU saves its own), a copy of sign*z (2 bytes per element for float32 inputs)
    and a few numbers per row, instead of z, u = z/m, max(u, 0) and s*z. The output is a tensor
    of its own, not a view: editing it in place makes backward raise, as for ReLU."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, plan: CAReLUPlan
    ) -> torch.Tensor:
        flat = z.reshape(-1, plan.length)
        rows = flat.to(plan.acc)
        out = torch.empty(z.shape, dtype=plan.acc, device=z.device)
        _, stats = _carelu_rows(rows, alpha, beta, plan, out.view(-1, plan.length))
        s, m, top, bottom = stats.s, stats.m, stats.top, stats.bottom
        if m is None:  # count: the forward needed no scale
            top, bottom = rows.amax(1, keepdim=True), rows.amin(1, keepdim=True)
            m = torch.maximum(top, bottom.neg()).clamp_min_(1.0)
        cpu = _reads_values(z)
        sign = torch.ones_like(s).copysign_(s)
        dtype = _side_dtype(z.dtype)  # one dtype per op: on CPU mixed ones copy their input
        if not cpu or bool((s < 0).any()):
            side = torch.mul(flat, sign.to(dtype)) if flat.dtype == dtype else (
                flat.to(dtype).mul_(sign.to(dtype)))
        else:
            side = flat.to(dtype, copy=True)
        # m >= max |z| and |s| < k: below big/k no s*z overflows
        limit = min(plan.big / plan.k, _BFLOAT16_MAX)
        unusual = not cpu or bool(((m > limit) | (s.abs() < _TINY_SCALE)).any())
        overflow = None
        if unusual:
            if top is None or bottom is None:
                top, bottom = rows.amax(1, keepdim=True), rows.amin(1, keepdim=True)
            overflow = torch.maximum(s * top, s * bottom) > plan.big  # each row's largest s*z
            if dtype != z.dtype:
                side.clamp_(-_BFLOAT16_MAX, _BFLOAT16_MAX)  # float32 beyond it rounds to inf
        out = out.to(z.dtype)
        ctx.save_for_backward(out, side, alpha, s, stats.p, m, stats.den, sign, overflow)
        ctx.plan, ctx.unusual = plan, unusual
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        out, side, alpha, s, p, m, den, sign, overflow = ctx.saved_tensors
        plan: CAReLUPlan = ctx.plan
        y = out.reshape(-1, plan.length)
        grad = grad_y.reshape(-1, plan.length).to(plan.acc)
        saved = _CAReLUSaved(s, p, m, den, sign, side, overflow, ctx.unusual)
        needs = ctx.needs_input_grad
        grad_rows, dt, dt_p = _carelu_rows_backward(y, grad, alpha, plan, saved, needs[0])
        grad_z = grad_rows.to(out.dtype).view(out.shape) if grad_rows is not None else None
        grad_alpha = dt_p.sum().to(alpha.dtype).reshape(alpha.shape) if needs[1] else None
        grad_beta = dt.sum().to(alpha.dtype).reshape(alpha.shape) if needs[2] else None
        return grad_z, grad_alpha, grad_beta, None


def eager_competitive_relu(z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                           plan: CAReLUPlan, inplace: bool = False) -> torch.Tensor:
    """CAReLU of ``z`` with 0-dim ``alpha`` and ``beta`` of one dtype: the autograd Function
    where a gradient is needed, else the no-grad kernels.

    ``inplace`` means what it means for ``nn.ReLU``: the caller no longer needs ``z``, so CPU
    inference on a contiguous input of the compute dtype may write the result into its memory.
    """
    if torch.is_grad_enabled() and (z.requires_grad or alpha.requires_grad or beta.requires_grad):
        return CompetitiveReLUFunction.apply(z, alpha, beta, plan)
    if z.is_cpu and plan.measure != "count":  # its checks read values: no GPU syncs
        y = _carelu_inference(z, alpha, beta, plan, inplace)
        if y is not None:
            return y
    y, _ = _carelu_rows(z.reshape(-1, plan.length).to(plan.acc), alpha, beta, plan)
    return y.to(z.dtype).view_as(z)


# ---------------------------------------------------------------------------------------------
# MRePU


class MRePUFunction(torch.autograd.Function):
    """The gained, blended MRePU with work buffers reused in place; saves only x and the gains
    and recomputes the derivatives in backward. With ``u = a*x``, ``t = max(u + c, 0)`` and
    ``f(u) = u*t^p``: ``dy/dx = lam*b*a*f'(u) + (1-lam)*[x >= 0]``, ``dy/da = lam*b*x*f'(u)``,
    ``dy/db = lam*f(u)``, ``f'(u) = t^(p-1)*(t + p*u)``; each is zero where the value it passes
    through saturated."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, gain_in: torch.Tensor, gain_out: torch.Tensor, plan: MRePUPlan
    ) -> torch.Tensor:
        ctx.save_for_backward(x, gain_in, gain_out)
        ctx.plan = plan
        return _mrepu_forward(x, gain_in, gain_out, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        x, gain_in, gain_out = ctx.saved_tensors
        plan: MRePUPlan = ctx.plan
        blend, p, big = plan.blend, plan.p, plan.big
        xa = x.to(plan.compute)
        a, b = gain_in.to(plan.compute), gain_out.to(plan.compute)
        u = xa * a
        t = (u + plan.c).clamp_min_(0.0)
        power = t.pow(p - 1.0)  # t^(p-1); 0 where t = 0 since p > 1
        slope = torch.add(t, u, alpha=p).mul_(power)  # f'(u)
        term = power.mul_(t).mul_(u)  # f(u)
        inner = term.abs() > big
        term.clamp_(-big, big)
        y = term * b
        if blend != 1.0:
            y.mul_(blend).add_(xa.clamp_min(0.0), alpha=1.0 - blend)
        grad = grad_y.to(plan.compute).masked_fill(y.abs_() > big, 0.0)
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
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a, grad_b, None


def _mrepu_forward(x: torch.Tensor, gain_in: torch.Tensor, gain_out: torch.Tensor,
                   plan: MRePUPlan, gains: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """The gained, blended MRePU of ``x``, work buffers reused in place. ``gains`` are the
    gains' values where they may be read (CPU inference): then a gain of 1 costs no pass, and
    the result is saturated a second time only where it can overflow (an output gain above 1
    in magnitude, or a blend). The term always saturates before the output gain multiplies it,
    so a zero gain never meets inf."""
    big = plan.big
    a, b = gains if gains is not None else (None, None)
    xa = x.to(plan.compute)
    u = xa if a == 1.0 else torch.mul(xa, gain_in.to(plan.compute))
    y = torch.add(u, plan.c).clamp_min_(0.0).pow_(plan.p).mul_(u).clamp_(-big, big)
    if b != 1.0:
        y.mul_(gain_out.to(plan.compute))
    if plan.blend != 1.0:
        y.mul_(plan.blend).add_(xa.clamp_min(0.0), alpha=1.0 - plan.blend)
    if b is None or plan.blend != 1.0 or not abs(b) <= 1.0:  # also for NaN
        y.clamp_(-big, big)
    return y.to(x.dtype)


def eager_mrepu(x: torch.Tensor, gain_in: torch.Tensor, gain_out: torch.Tensor, plan: MRePUPlan
                ) -> torch.Tensor:
    """The gained, blended MRePU of ``x`` with 0-dim gains: :class:`MRePUFunction` where a
    gradient is needed or off the CPU (its gains stay tensors: no device sync), else the
    no-grad kernel."""
    if x.is_cpu and not (torch.is_grad_enabled() and (
            x.requires_grad or gain_in.requires_grad or gain_out.requires_grad)):
        # CPU: reading the gains costs no device sync
        return _mrepu_forward(x, gain_in, gain_out, plan, (gain_in.item(), gain_out.item()))
    return MRePUFunction.apply(x, gain_in, gain_out, plan)
