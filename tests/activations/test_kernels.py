"""Tests for retrofit/activations/kernels.py: the eager fast paths (custom autograd Functions
and no-grad row kernels) agree with the plain formulas in values and gradients, in float64 and
every half type, keep little for backward (MRePU its input; CAReLU its output and a 2-byte copy
of its input), and stay out of captured graphs."""

from __future__ import annotations

import itertools

import pytest
import torch

import retrofit.activations.kernels as kernels
from retrofit.activations.functional import _competitive_relu, competition, competitive_relu
from retrofit.activations.kernels import (
    CAReLUPlan,
    CompetitiveReLUFunction,
    MRePUFunction,
    MRePUPlan,
)
from retrofit.activations.modules import CompetitiveReLU, MRePU
from tests.activations.reference import (
    HALF_AND_SINGLE,
    MEASURES,
    REDUCTIONS,
    SCALES,
    SHAPES,
    away_from_zero,
    gained,
    plain_carelu,
    plain_mrepu,
)

F64_MAX = torch.finfo(torch.float64).max


def grads_of(fn, z, module, weight):
    z = z.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = fn(z, module)
    (out * weight).sum().backward()
    return out.detach(), [z.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("measure", MEASURES)
def test_kernels_gradcheck_from_a_plan_alone(measure):
    """The Functions need nothing but their plan: the row view, the bound, the compute dtype."""
    z = away_from_zero((3, 2, 4), torch.Generator().manual_seed(9)).requires_grad_()
    a = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.2, dtype=torch.float64, requires_grad=True)
    plan = CAReLUPlan(2.0, 1e-6, measure, 8, F64_MAX, torch.float64)  # one group per sample
    assert torch.autograd.gradcheck(lambda *t: CompetitiveReLUFunction.apply(*t, plan), (z, a, b))
    x = torch.where((z + 1).abs() < 0.1, z + 0.3, z).detach().requires_grad_()  # off x = -c
    plan = MRePUPlan(0.5, 2.0, 1.0, F64_MAX, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: MRePUFunction.apply(*t, plan), (x, a, b))


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_fast_carelu_matches_the_plain_formula_in_float64_values_and_gradients(measure, reduce):
    g = torch.Generator().manual_seed(5)
    for shape, (alpha, beta) in itertools.product(((4, 7), (2, 3, 5, 5), (2, 6, 8), (9,)), SCALES):
        module = CompetitiveReLU(measure=measure, reduce=reduce, alpha_init=alpha,
                                 beta_init=beta, dtype=torch.float64)
        z = torch.randn(shape, generator=g, dtype=torch.float64) * 3
        weight = torch.randn(shape, generator=g, dtype=torch.float64)
        fast, fast_grads = grads_of(lambda x, m: m(x), z, module, weight)
        plain, plain_grads = grads_of(plain_carelu, z, module, weight)
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
        for got, want in zip(fast_grads, plain_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("measure", ("energy", "l1"))
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_inference_carelu_matches_the_plain_formula(measure, reduce):
    """The no-grad CPU path measures with unscaled norms; it must agree with the scaled formula
    for every sign of the scale, and hand rows whose norms overflow to the scaled path."""
    g = torch.Generator().manual_seed(8)
    for shape, (alpha, beta) in itertools.product((*SHAPES, (9,)), SCALES):
        for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            module = CompetitiveReLU(measure=measure, reduce=reduce, alpha_init=alpha,
                                     beta_init=beta, dtype=dtype)
            z = torch.randn(shape, generator=g, dtype=dtype) * 3
            z.view(-1)[0] = 1e25  # its square overflows float32: energy falls back to scaling
            with torch.no_grad():
                got, want = module(z), plain_carelu(z, module)
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("measure", ("energy", "l1"))
@pytest.mark.parametrize("batch", (4, 1))  # rows as tensors, a single row in Python floats
def test_inplace_inference_writes_into_the_input_only_where_that_is_exact(measure, batch):
    z = torch.randn(batch, 3, 5, 5)
    settings = {"measure": measure, "alpha_init": 1.3, "beta_init": 0.4}
    want = plain_carelu(z, CompetitiveReLU(**settings))
    module = CompetitiveReLU(**settings, inplace=True)
    x = z.clone()
    with torch.no_grad():
        y = module(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # autograd, a scale that can turn negative, a non-contiguous (also one whose rows view
    # shares memory: an expanded batch) or half input: out of place
    negative = CompetitiveReLU(measure=measure, alpha_init=-2.5, beta_init=0.3, inplace=True)
    expanded = z[:1].clone().expand(2, -1, -1, -1)
    for run, x in ((module, z.clone().requires_grad_()), (negative, z.clone()),
                   (module, z.clone().transpose(2, 3)), (module, expanded),
                   (module, z.clone().half())):
        before = x.detach().clone()
        with torch.set_grad_enabled(x.requires_grad):
            run(x)
        assert torch.equal(x.detach(), before)


def refuse(*args, **kwargs):
    raise AssertionError("the fast no-grad path should have served this call")


# batch 1 (one row: Python floats), a 1-D input, one token, 2-D, 3-D (rows are tokens), 4-D
INFERENCE_SHAPES = ((1, 7), (1, 3, 5, 5), (9,), (1, 1, 8), (5, 8), (3, 4, 6), (2, 3, 4, 4))


@pytest.mark.parametrize("measure", ("energy", "l1"))
@pytest.mark.parametrize("inplace", (False, True), ids=("out_of_place", "inplace"))
def test_no_grad_fast_path_matches_the_plain_formula_for_every_shape_and_sign(
        measure, inplace, monkeypatch):
    monkeypatch.setattr(kernels, "_carelu_rows", refuse)  # no call may fall back
    g = torch.Generator().manual_seed(11)
    for shape, (alpha, beta) in itertools.product(INFERENCE_SHAPES, SCALES):
        for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            module = CompetitiveReLU(measure=measure, alpha_init=alpha, beta_init=beta,
                                     inplace=inplace, dtype=dtype)
            z = torch.randn(shape, generator=g, dtype=dtype) * 3
            z.view(-1)[:3] = torch.tensor([0.0, -1.0, 1.0])  # z = 0 itself, both signs
            with torch.no_grad():
                want = plain_carelu(z, module)
                got = module(z.clone())
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
            for row in (torch.zeros(shape, dtype=dtype), -z.abs()):  # p = 0: only eps, no sign
                with torch.no_grad():
                    torch.testing.assert_close(module(row.clone()), plain_carelu(row, module),
                                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("measure", ("energy", "l1"))
def test_no_grad_fast_path_at_the_identity_init_is_relu_bit_for_bit_in_float32(
        measure, monkeypatch):
    """s = k * tanh(atanh(1/k)) rounds to exactly 1 in float32, so a retrofitted model keeps
    its outputs bit for bit (an in-place ReLU whose input is read again relies on it)."""
    monkeypatch.setattr(kernels, "_carelu_rows", refuse)
    for shape in INFERENCE_SHAPES:
        z = torch.randn(shape) * 3
        with torch.no_grad():
            assert torch.equal(CompetitiveReLU(measure=measure)(z), z.clamp_min(0.0)), shape


@pytest.mark.parametrize("measure", ("energy", "l1"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_no_grad_fast_path_holds_up_to_its_range_and_falls_back_beyond_it(
        measure, dtype, monkeypatch):
    """Without the max|z| scale the per-row sums (energy: their squares) and k * total must
    stay finite: up to there the fast path serves the call, beyond it (huge, inf, NaN) the
    scaled kernel does; both give the formula."""
    big = torch.finfo(dtype).max
    within = (big ** 0.5) / 100 if measure == "energy" else big / 4  # k = 2
    beyond = (big ** 0.5) * 4 if measure == "energy" else big / 1.5
    scaled_calls = []
    scaled = kernels._carelu_rows

    def counted(*args, **kwargs):
        scaled_calls.append(1)
        return scaled(*args, **kwargs)

    monkeypatch.setattr(kernels, "_carelu_rows", counted)
    for shape, (alpha, beta) in itertools.product(((1, 8), (3, 8), (2, 2, 2, 2)), SCALES):
        module = CompetitiveReLU(measure=measure, alpha_init=alpha, beta_init=beta, dtype=dtype)
        for value, fast in ((within, True), (beyond, False), (-beyond, False),
                            (float("inf"), False), (float("nan"), False)):
            z = torch.randn(shape, dtype=dtype)
            z.view(-1)[0] = value
            with torch.no_grad():
                got, want = module(z.clone()), plain_carelu(z, module)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
            assert len(scaled_calls) == (0 if fast else 1), (shape, alpha, beta, value)
            scaled_calls.clear()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_no_grad_fast_path_on_half_and_strided_inputs_leaves_the_input_untouched(
        dtype, monkeypatch):
    """Their rows are a float32 (or contiguous) copy, which the kernel may overwrite; the
    input itself stays as it was, inplace or not."""
    monkeypatch.setattr(kernels, "_carelu_rows", refuse)
    for shape, (alpha, beta), inplace in itertools.product(((1, 3, 4, 4), (4, 3, 4, 4)), SCALES,
                                                           (False, True)):
        module = CompetitiveReLU(alpha_init=alpha, beta_init=beta, inplace=inplace)
        for z, tolerance in (((torch.randn(shape) * 3).to(dtype), {}),
                             (torch.randn(shape).transpose(1, 3), {"rtol": 1e-5, "atol": 1e-5})):
            before = z.clone()
            with torch.no_grad():
                got = module(z)
            torch.testing.assert_close(got, plain_carelu(z, module).detach(), **tolerance)
            assert got.dtype == z.dtype and torch.equal(z, before)


@pytest.mark.parametrize("dtype", (torch.float64, *HALF_AND_SINGLE), ids=str)
def test_no_grad_mrepu_matches_the_plain_formula_for_any_gains_also_when_saturated(
        dtype, monkeypatch):
    monkeypatch.setattr(MRePUFunction, "apply", refuse)
    big = torch.finfo(dtype).max
    edges = [-3.0, -1.0, -0.5, 0.0, 0.7, 2.0, big / 2, -big / 2, big ** 0.5]  # 3 saturate
    x = torch.cat([torch.tensor(edges, dtype=torch.float64),
                   torch.randn(12, dtype=torch.float64) * 2]).to(dtype).reshape(1, -1)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else (
        {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {})
    for (a, b), lam in itertools.product(
            ((1.0, 1.0), (0.6, 1.7), (0.6, 0.5), (-0.3, -2.0), (1.0, 0.0), (2.0, 1.0)),
            (1.0, 0.5)):
        module = MRePU(blend=lam, dtype=torch.float64 if dtype == torch.float64 else None)
        with torch.no_grad():
            module.gain_in.fill_(a)
            module.gain_out.fill_(b)
            got, want = module(x), plain_mrepu(x, module)
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **tolerance, msg=f"gains {a}, {b}, blend {lam}")


def test_eager_calls_take_the_fast_path_and_gradcheck_it():
    module = CompetitiveReLU(alpha_init=1.3, beta_init=0.4, dtype=torch.float64)
    z = away_from_zero((2, 3, 2, 2), torch.Generator().manual_seed(6)).requires_grad_()
    assert type(module(z).grad_fn).__name__.startswith("CompetitiveReLUFunction")
    a, b = module.alpha, module.beta
    for measure in MEASURES:
        fn = lambda z, a, b: competitive_relu(z, a, b, measure=measure)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z, a, b))
    x = away_from_zero((3, 4), torch.Generator().manual_seed(7), scale=2.0).requires_grad_()
    assert type(MRePU(blend=0.5)(x).grad_fn).__name__.startswith("MRePUFunction")
    x = torch.where((x + 1).abs() < 0.1, x + 0.3, x).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: MRePU(blend=0.5)(x), (x,))


def test_fast_carelu_passes_gradient_to_beta_when_the_scale_is_exactly_zero():
    # alpha = beta = 0 gives s = 0: clamp's rule passes the gradient at s*z = 0, so the
    # parameters still learn (a strict mask would freeze them).
    module = CompetitiveReLU(alpha_init=0.0, beta_init=0.0, dtype=torch.float64)
    z = torch.randn(3, 8, dtype=torch.float64)
    weight = torch.randn(3, 8, dtype=torch.float64)
    _, fast = grads_of(lambda x, m: m(x), z, module, weight)
    _, plain = grads_of(plain_carelu, z, module, weight)
    assert fast[2].abs().item() > 0
    for got, want in zip(fast, plain):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=str)
def test_fast_paths_match_the_plain_formulas_in_every_dtype(dtype):
    z = (torch.randn(4, 3, 6, 6) * 4).to(dtype)
    weight = torch.randn(4, 3, 6, 6).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for module in (CompetitiveReLU(alpha_init=1.3, beta_init=-0.4),
                   CompetitiveReLU(measure="l1", alpha_init=-1.0, beta_init=0.2)):
        fast, fast_grads = grads_of(lambda x, m: m(x), z, module, weight)
        plain, _ = grads_of(plain_carelu, z, module, weight)
        assert fast.dtype == dtype and fast_grads[0].dtype == dtype
        torch.testing.assert_close(fast, plain, **tolerance)
        # gradients against float32 (the plain formula rounds its half gradients more often)
        _, want_grads = grads_of(plain_carelu, z.float(), module, weight.float())
        for got, want in zip(fast_grads, want_grads):
            torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    for lam in (0.5, 1.0):
        module = gained(MRePU(blend=lam))
        x = (torch.randn(4, 3, 6, 6) * 2).to(dtype)
        fast, fast_grads = grads_of(lambda x, m: m(x), x, module, weight)
        plain, plain_grads = grads_of(plain_mrepu, x, module, weight)
        torch.testing.assert_close(fast, plain, **tolerance)
        torch.testing.assert_close(fast_grads[0], plain_grads[0], **tolerance)
        for got, want in zip(fast_grads[1:], plain_grads[1:]):  # sums over the whole input
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("lam", (0.25, 1.0))
def test_fast_mrepu_matches_the_plain_formula_in_float64_also_when_saturated(lam):
    x = torch.tensor([[-3.0, -1.0, -0.5, 0.0, 0.7, 2.0, 1e103, -1e103]], dtype=torch.float64)
    weight = torch.randn(1, 8, dtype=torch.float64)
    module = gained(MRePU(blend=lam, dtype=torch.float64))
    fast, fast_grads = grads_of(lambda x, m: m(x), x, module, weight)
    plain, plain_grads = grads_of(plain_mrepu, x, module, weight)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(fast_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fast_grads[0][0, 6] == 0  # saturated at the largest float64: no gradient, like clamp


def saved_for_backward(fn, *inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output of ``fn`` and the tensors autograd keeps for its backward."""
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(*inputs)
    return out, saved


def input_sized(saved: list[torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
    return [t for t in saved if t.numel() >= like.numel()]


def test_mrepu_keeps_only_its_input_for_backward():
    z = torch.randn(8, 16, 12, 12, requires_grad=True)
    for module in (MRePU(), MRePU(blend=0.5)):
        _, fast = saved_for_backward(module, z)
        _, plain = saved_for_backward(lambda x: plain_mrepu(x, module), z)
        assert len(input_sized(fast, z)) == 1, module  # x itself, plus the two gains
        assert sum(t.numel() for t in fast) < z.numel() + 8
        assert len(input_sized(plain, z)) >= 3, module


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("measure", MEASURES)
def test_carelu_keeps_relus_record_plus_a_two_byte_copy_of_the_input_not_a_float32_one(measure):
    """ReLU keeps its output (which the next layer keeps too); CAReLU keeps that same output, a
    bfloat16 copy of sign(s)*z and a few numbers per sample: no float32 copy of z."""
    z = torch.randn(8, 16, 12, 12, requires_grad=True)
    _, relu_saved = saved_for_backward(torch.relu, z)
    for alpha, beta in ((1.3, 0.4), (-2.5, 0.3)):  # every scale positive; most negative
        module = CompetitiveReLU(measure=measure, alpha_init=alpha, beta_init=beta)
        out, saved = saved_for_backward(module, z)
        large = input_sized(saved, z)
        assert [t.dtype for t in large] == [torch.float32, torch.bfloat16], (alpha, beta)
        assert large[0].data_ptr() == out.data_ptr()  # the output itself, not a copy
        assert nbytes(saved) <= nbytes(relu_saved) + 2 * z.numel() + 64 * 8
        _, plain = saved_for_backward(lambda x: plain_carelu(x, module), z)
        assert len(input_sized(plain, z)) >= (2 if measure == "count" else 3)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_editing_the_output_in_place_makes_backward_raise_as_for_relu(dtype):
    module = CompetitiveReLU(alpha_init=1.3, beta_init=0.4, dtype=torch.float64
                             if dtype == torch.float64 else torch.float32)
    for activation in (torch.relu, module):
        z = torch.randn(4, 6, dtype=dtype, requires_grad=True)
        y = activation(z)
        y.mul_(2.0)  # allowed: only a backward through the edited output is refused
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def mixed_scale_rows(generator: torch.Generator) -> torch.Tensor:
    """float64 rows away from zero: the first three mostly positive, the last three mostly
    negative, so alpha = 3, beta = -1.5 makes s > 0 in the first and s < 0 in the last."""
    z = away_from_zero((6, 5), generator)
    z[:3], z[3:] = z[:3].abs(), -z[3:].abs()
    z[:, 0] = -z[:, 0]
    return z


def scale_of(z: torch.Tensor, alpha: float, beta: float, measure: str, eps: float = 1e-6,
             k: float = 2.0) -> torch.Tensor:
    return k * torch.tanh(alpha * competition(z, measure, eps, "sample") + beta)


@pytest.mark.parametrize("measure", MEASURES)
def test_gradcheck_in_float64_with_positive_and_negative_scales(measure):
    z = mixed_scale_rows(torch.Generator().manual_seed(3)).requires_grad_()
    s = scale_of(z.detach(), 3.0, -1.5, measure).view(-1)
    assert (s[:3] > 0).all() and (s[3:] < 0).all(), s
    a = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    plan = CAReLUPlan(2.0, 1e-6, measure, 5, F64_MAX, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: CompetitiveReLUFunction.apply(*t, plan), (z, a, b))


@pytest.mark.parametrize("measure", MEASURES)
def test_exact_zeros_and_a_zero_scale_follow_clamps_rule_in_float64(measure):
    """Clamp passes the gradient where s*z = 0: at z = 0 (so s*g flows there) and over a whole
    row where s = 0 (there dL/ds = sum g z over every element, which y = 0 cannot tell). Row 6
    gets s = 0 exactly with alpha != 0 (eps = 0 and sums exact in binary: its p is exact)."""
    z = torch.cat([mixed_scale_rows(torch.Generator().manual_seed(4)),
                   torch.tensor([[2.0, 4.0, 4.0, -8.0, 0.0]], dtype=torch.float64)])
    z[0, 1] = z[2, 3] = z[4, 2] = z[5, 4] = 0.0
    p6 = {"energy": 36 / 100, "l1": 10 / 18, "count": 3 / 5}[measure]
    for alpha, beta, zero_row in ((3.0, -1.5, False), (1.0, -p6, True), (0.0, 0.0, True)):
        plan = CAReLUPlan(2.0, 0.0, measure, 5, F64_MAX, torch.float64)
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
        fast = lambda z, a, b: CompetitiveReLUFunction.apply(z, a, b, plan)  # noqa: E731
        plain = lambda z, a, b: _competitive_relu(z, a, b, 2.0, 0.0, measure, "sample")  # noqa: E731
        y = fast(z, a, b)
        assert (y[6] == 0).all() == zero_row  # both signs in row 6: only s = 0 zeroes it
        if not zero_row:  # at s = 0, y is not differentiable in s: clamp's rule picks both sides
            # nor at z = 0 in z, but alpha and beta are smooth there
            assert torch.autograd.gradcheck(lambda a, b: fast(z, a, b), (a, b))
        weight = torch.randn(z.shape, generator=torch.Generator().manual_seed(5),
                             dtype=torch.float64)
        got = torch.autograd.grad((fast(z.requires_grad_(), a, b) * weight).sum(), (z, a, b))
        want = torch.autograd.grad((plain(z, a, b) * weight).sum(), (z, a, b))
        z.requires_grad_(False)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        if zero_row:
            assert got[2].abs().item() > 0  # beta still learns through the s = 0 row(s)


@pytest.mark.parametrize("measure", MEASURES)
def test_float32_gradients_stay_within_the_bfloat16_copys_bound(measure):
    """The float32 backward reads z only through a bfloat16 copy (unit roundoff 2^-8), and only
    for the energy measure's competition term B_j = c w_j (c one number per row and side): so
    |grad32_j - grad64_j| <= 2^-8 |B_j| plus float32 rounding, and l1, count and the parameters'
    gradients are float32-exact, except in rows with |s| < 2^-100, whose dL/ds comes from the
    copy too. Reference: the float64 formula on the same float32 values."""
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(6, 3, 8, 8, generator=g) * 3).double()
    z[0, 0, 0, :4] = 0.0
    z[1, 2, 3, 1:3] = 0.0
    weight = torch.randn(z.shape, generator=g, dtype=torch.float64)
    copy_error = 2.0 ** -8 if measure == "energy" else 0.0
    for alpha, beta in (*SCALES, (3.0, -1.5), (0.0, 1e-20), (0.0, 1e-35)):  # |s| ~ 2^-65, 2^-115
        single = CompetitiveReLU(measure=measure, alpha_init=alpha, beta_init=beta)
        double = CompetitiveReLU(measure=measure, alpha_init=alpha, beta_init=beta,
                                 dtype=torch.float64)
        _, got = grads_of(lambda x, m: m(x), z.float(), single, weight.float())
        _, want = grads_of(plain_carelu, z, double, weight)
        s = scale_of(z, alpha, single.beta.item(), measure).double()
        relu_term = s * weight * (s * z >= 0)  # s g [kept]
        competition_term = want[0] - relu_term
        error = (got[0].double() - want[0]).abs()
        bound = (copy_error * competition_term.abs()
                 + 1e-5 * (relu_term.abs() + competition_term.abs()) + 1e-6)
        assert (error <= bound).all(), (alpha, beta, (error - bound).max())
        from_copy = 2.0 ** -8 if s.abs().min() < 2.0 ** -100 else 0.0
        dt_scale = 2.0 * (weight * z).abs().sum()  # |dL/dt| <= k sum |g z|
        for got_p, want_p in zip(got[1:], want[1:]):
            assert abs(got_p.item() - want_p.item()) <= (
                from_copy * dt_scale + 1e-4 * abs(want_p.item()) + 1e-5), (alpha, beta)


@pytest.mark.parametrize("measure", MEASURES)
def test_saturated_outputs_pass_no_gradient_and_the_rest_match_the_formula(measure):
    """Where s*z overflows float32 the output saturates and clamp passes no gradient there;
    the row is measured with the scaled sums and its other gradients follow the formula."""
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[big, 1.0, -2.0, 0.5], [big / 3, 2.0, -1.0, 0.25]])
    weight = torch.tensor([[1.0, -0.5, 2.0, 1.5], [0.5, 1.0, -1.0, 2.0]])
    for alpha, beta in ((0.0, 1.0), (0.5, 0.8), (-0.3, -1.0)):
        module = CompetitiveReLU(measure=measure, alpha_init=alpha, beta_init=beta)
        y, fast = grads_of(lambda x, m: m(x), x, module, weight)
        want, plain = grads_of(plain_carelu, x, module, weight)
        torch.testing.assert_close(y, want)
        for got, expected in zip(fast, plain):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, expected, rtol=2.0 ** -7, atol=1e-5)
        if scale_of(x.double(), alpha, module.beta.item(), measure)[0].item() * big > big:
            assert y[0, 0] == big


def test_a_huge_row_changes_nothing_in_the_other_rows():
    """A row whose sums reach float32's range is measured with the scaled sums, alone: every
    other row's output and gradient are what they are without it, bit for bit."""
    clean = torch.randn(3, 2, 6)
    huge = torch.cat([clean[:1] * 1e25, clean])
    weight = torch.randn(4, 2, 6)
    for measure in ("energy", "l1"):
        module = CompetitiveReLU(measure=measure, alpha_init=-2.5, beta_init=0.3, reduce="sample")
        y_clean, g_clean = grads_of(lambda x, m: m(x), clean, module, weight[1:])
        y_huge, g_huge = grads_of(lambda x, m: m(x), huge, module, weight)
        assert torch.equal(y_huge[1:], y_clean) and torch.equal(g_huge[0][1:], g_clean[0])
        assert all(torch.isfinite(grad).all() for grad in g_huge)


def test_no_grad_calls_and_graph_capture_use_no_autograd_function():
    module = CompetitiveReLU(alpha_init=1.3, beta_init=-0.4)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        assert module(z).grad_fn is None
    traced = torch.jit.trace(module, (z.detach(),))
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "prim::PythonOp" not in kinds, kinds
    torch.testing.assert_close(traced(z.detach()), module(z).detach())
    traced = torch.jit.trace(MRePU(blend=0.5), (z.detach(),))
    assert "prim::PythonOp" not in {node.kind() for node in traced.graph.nodes()}


def test_fast_path_reads_a_non_contiguous_input_and_leaves_it_untouched():
    z = torch.randn(3, 5, 4, 2).permute(0, 3, 1, 2)  # channels-last-like strides
    copy = z.clone()
    module = CompetitiveReLU(alpha_init=1.3, beta_init=-0.4)
    torch.testing.assert_close(module(z), plain_carelu(z, module).detach())
    assert torch.equal(z, copy)
    torch.testing.assert_close(MRePU()(z), plain_mrepu(z, MRePU()))
    assert torch.equal(z, copy)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fast_gradients_at_the_largest_finite_value_are_not_nan(dtype):
    # dL/ds overflows there; the backward works in u = z/m so no 0 * inf becomes NaN, and a
    # saturated MRePU output gets gradient 0 even where its slope is inf.
    x = torch.tensor([[torch.finfo(dtype).max, 1.0, -2.0, 0.5]], dtype=dtype)
    modules = [CompetitiveReLU(measure=m, alpha_init=a, beta_init=b)
               for m in MEASURES for a, b in ((0.0, None), (1.0, 0.5), (-1.0, -0.9))]
    for module in [*modules, MRePU(), MRePU(blend=0.5)]:
        z = x.clone().requires_grad_()
        module(z).float().sum().backward()
        for grad in (z.grad, *(p.grad for p in module.parameters())):
            assert not torch.isnan(grad).any(), module
    z = torch.tensor([1e30, -1e30, 1.0], requires_grad=True)
    MRePU()(z).sum().backward()
    assert z.grad.tolist() == [0.0, 0.0, 8.0]  # saturated, flat (x + c < 0), (x+1)^2 + 2x(x+1)


@pytest.mark.parametrize("measure", MEASURES)
def test_the_path_that_reads_no_values_back_matches_the_formula_too(monkeypatch, measure):
    """Off the CPU the Function reads no value back (no GPU sync): the scaled forward, and every
    correction in backward. Run here, it must agree with the formula just the same."""
    monkeypatch.setattr(kernels, "_reads_values", lambda tensor: False)
    big = torch.finfo(torch.float32).max
    z = mixed_scale_rows(torch.Generator().manual_seed(7))
    z[1, 2] = z[4, 0] = 0.0
    weight = torch.randn(z.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for alpha, beta in ((3.0, -1.5), (0.0, 0.0), (0.0, 1e-35), *SCALES):
        double = CompetitiveReLU(measure=measure, alpha_init=alpha, beta_init=beta,
                                 reduce="sample", dtype=torch.float64)
        fast, fast_grads = grads_of(lambda x, m: m(x), z, double, weight)
        plain, plain_grads = grads_of(plain_carelu, z, double, weight)
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
        for got, want in zip(fast_grads, plain_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    x = torch.tensor([[big, 1.0, -2.0, 0.5], [big / 3, 2.0, -1.0, 0.25]])
    single = CompetitiveReLU(measure=measure, alpha_init=0.0, beta_init=1.0)  # s*big overflows
    g = weight[:2, :4].float().clamp(-1.0, 1.0)  # g*y stays finite: only the flag tells
    y, fast_grads = grads_of(lambda x, m: m(x), x, single, g)
    want, plain_grads = grads_of(plain_carelu, x, single, g)
    torch.testing.assert_close(y, want)
    assert y[0, 0] == big
    for got, expected in zip(fast_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=2.0 ** -7, atol=1e-5)
