"""The eager CAReLU and MRePU kernels: fewer passes over memory, and a lean autograd record.

What :mod:`retrofit.activations.functional` calls outside graph capture, with the numbers it
fixed for the call in a plan. The competition is reduced over a contiguous ``(rows, D)`` view
(PyTorch's multi-axis ``amax`` is ~100x slower on CPU than a last-axis one), work buffers are
reused in place, and under autograd a custom ``torch.autograd.Function`` saves only the input and
a few numbers per row and recomputes the elementwise terms in backward (the plain formulas keep
three or four input-sized tensors per call). The backwards are not themselves differentiable
(no double backward). Eager only: ``x.to(dtype)`` returns ``x`` itself when the dtype matches.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

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


class _CAReLUStats:
    """Per-row numbers the forward computes and the backward reuses (shapes (R, 1))."""

    __slots__ = ("s", "p", "m", "den")

    def __init__(self, s: torch.Tensor, p: torch.Tensor, m: Optional[torch.Tensor],
                 den: Optional[torch.Tensor]) -> None:
        self.s, self.p, self.m, self.den = s, p, m, den


def _carelu_rows(rows: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, plan: CAReLUPlan
                 ) -> tuple[torch.Tensor, _CAReLUStats]:
    """CAReLU of each row of ``rows`` (R, D) in the compute dtype, without autograd.

    Passes over the data: two read-only reductions (max, min) for the scale m, one scaled copy
    u = z/m, one norm, an in-place clamp, one norm, and the output written into u's buffer and
    clamped in place. The result is a new tensor; ``rows`` is never written.
    """
    k, eps, big = plan.k, plan.eps, plan.big
    if plan.measure == "count":
        work = torch.gt(rows, 0.0, out=torch.empty_like(rows))  # 1.0 / 0.0, summed below
        p = work.sum(1, keepdim=True).div_(rows.shape[1])
        s = torch.addcmul(beta, alpha, p).tanh_().mul_(k)
        y = torch.mul(rows, s, out=work)
        return y.clamp_(0.0, big), _CAReLUStats(s, p, None, None)
    # The same scale-invariant measurement as the formula: |u| <= 1 cannot overflow.
    m = torch.maximum(rows.amax(1, keepdim=True), rows.amin(1, keepdim=True).neg_())
    m = m.clamp_min_(1.0)
    u = rows / m
    if plan.measure == "energy":
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


def _carelu_rows_backward(rows: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor,
                          plan: CAReLUPlan, stats: _CAReLUStats
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
    grad_rows = work.clamp(0.0, plan.big).eq_(work)  # 1.0 where clamp passes the gradient
    grad_rows.mul_(grad)
    slope = (1.0 - (s / plan.k) ** 2).mul_(plan.k)  # d s / d t
    # sum_j g_j [kept_j] u_j into the spare buffer (vecdot would allocate a third one)
    g_u = torch.div(rows, m, out=work).mul_(grad_rows).sum(1, keepdim=True).mul_(slope)
    dt = g_u * m
    grad_rows.mul_(s)
    if plan.measure != "count":
        assert den is not None
        q = alpha * g_u / den
        if plan.measure == "energy":
            u = torch.div(rows, m, out=work)
            grad_rows.addcmul_(u, (-2.0) * q * p)
            grad_rows.addcmul_(u.clamp_min_(0.0), 2.0 * q)
        else:
            grad_rows.addcmul_(torch.ge(rows, 0.0, out=work), q)
            grad_rows.addcmul_(torch.sign(rows, out=work), -q * p)
    # d L / d alpha per row: (g_u * p) * m, finite factors, so inf at worst, never NaN
    return grad_rows, dt, (g_u * p).mul_(m)


def _carelu_rows_inference(rows: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                           plan: CAReLUPlan, inplace: bool) -> Optional[torch.Tensor]:
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
    order = 2.0 if plan.measure == "energy" else 1.0
    norm = torch.linalg.vector_norm(rows, order, 1, keepdim=True)
    if not bool((norm * plan.k < plan.big).all()):  # also False for NaN
        return None
    overwrite = inplace and bool(torch.minimum(beta, alpha + beta) >= 0)
    positive = rows.clamp_min_(0.0) if overwrite else rows.clamp_min(0.0)
    part = torch.linalg.vector_norm(positive, order, 1, keepdim=True).double()
    total = norm.double()
    if plan.measure == "energy":
        part, total = part.square_(), total.square_()
    p = part.div_(total.add_(plan.eps)).to(rows.dtype)
    s = torch.addcmul(beta, alpha, p).tanh_().mul_(plan.k)
    if overwrite:  # s >= 0 in exact arithmetic; no rounding may send a row down the z path
        s.clamp_min_(0.0)
    negative = s < 0
    if bool(negative.any()):  # those rows turn into max(-z, 0) = max(z, 0) - z, exactly
        positive.addcmul_(rows, negative.to(rows.dtype), value=-1.0)
    return positive.mul_(s.abs())


class CompetitiveReLUFunction(torch.autograd.Function):
    """CAReLU with a lean autograd record: saves z, alpha and four numbers per row (instead of
    z, u = z/m, max(u, 0) and s*z), and recomputes the elementwise terms in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, plan: CAReLUPlan
    ) -> torch.Tensor:
        rows = z.reshape(-1, plan.length).to(plan.acc)
        y, stats = _carelu_rows(rows, alpha, beta, plan)
        ctx.save_for_backward(z, alpha, stats.s, stats.p, stats.m, stats.den)
        ctx.plan = plan
        return y.to(z.dtype).view(z.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        z, alpha, s, p, m, den = ctx.saved_tensors
        plan: CAReLUPlan = ctx.plan
        rows = z.reshape(-1, plan.length).to(plan.acc)
        grad = grad_y.reshape(-1, plan.length).to(plan.acc)
        stats = _CAReLUStats(s, p, m, den)
        grad_rows, dt, dt_p = _carelu_rows_backward(rows, grad, alpha, plan, stats)
        grad_z = grad_rows.to(z.dtype).view(z.shape) if ctx.needs_input_grad[0] else None
        grad_alpha = grad_beta = None
        if ctx.needs_input_grad[1]:
            grad_alpha = dt_p.sum().to(alpha.dtype).reshape(alpha.shape)
        if ctx.needs_input_grad[2]:
            grad_beta = dt.sum().to(alpha.dtype).reshape(alpha.shape)
        return grad_z, grad_alpha, grad_beta, None


def eager_competitive_relu(z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                           plan: CAReLUPlan, inplace: bool = False) -> torch.Tensor:
    """CAReLU of ``z`` with 0-dim ``alpha`` and ``beta`` of one dtype: the autograd Function
    where a gradient is needed, else the no-grad row kernels.

    ``inplace`` means what it means for ``nn.ReLU``: the caller no longer needs ``z``, so CPU
    inference on a contiguous input of the compute dtype may write the result into its memory.
    """
    if torch.is_grad_enabled() and (z.requires_grad or alpha.requires_grad or beta.requires_grad):
        return CompetitiveReLUFunction.apply(z, alpha, beta, plan)
    rows = z.reshape(-1, plan.length).to(plan.acc)
    y = None
    if z.device.type == "cpu" and plan.measure != "count":  # its checks read values: no GPU syncs
        in_place = inplace and rows.dtype == z.dtype and z.is_contiguous()  # rows is z's memory
        y = _carelu_rows_inference(rows, alpha, beta, plan, in_place)
    if y is None:
        y, _ = _carelu_rows(rows, alpha, beta, plan)
    return y.to(z.dtype).view(z.shape)


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
        blend, big = plan.blend, plan.big
        xa = x.to(plan.compute)
        u = torch.mul(xa, gain_in.to(plan.compute))
        y = (u + plan.c).clamp_min_(0.0).pow_(plan.p).mul_(u).clamp_(-big, big)
        y.mul_(gain_out.to(plan.compute))
        if blend != 1.0:
            y.mul_(blend).add_(xa.clamp_min(0.0), alpha=1.0 - blend)
        return y.clamp_(-big, big).to(x.dtype)

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
