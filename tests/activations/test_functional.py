"""Tests for retrofit/activations/functional.py: the functional forms against an independent
float64 reference, their gradients, the competition axes, saturation, the compiled spelling."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import retrofit.activations.functional as functional
from retrofit.activations.functional import (
    competition,
    competition_axes,
    competitive_relu,
    mrepu,
    repu,
)
from retrofit.activations.modules import CompetitiveReLU
from retrofit.errors import UsageError
from tests.activations.reference import (
    MEASURES,
    REDUCTIONS,
    SCALES,
    SHAPES,
    away_from_zero,
    huge_input,
    plain_carelu,
    ref_carelu,
    ref_mrepu,
    ref_p,
)

# --- CAReLU math ------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_carelu_matches_float64_reference_for_every_measure_and_reduction(measure, reduce):
    g = torch.Generator().manual_seed(0)
    for shape, (alpha, beta) in itertools.product(SHAPES, SCALES):
        z = torch.randn(shape, generator=g, dtype=torch.float64) * 3
        want_p = ref_p(z.numpy(), measure, 1e-6, reduce)
        got_p = competition(z, measure, 1e-6, reduce)
        assert got_p.shape == want_p.shape
        np.testing.assert_allclose(got_p.numpy(), want_p, rtol=1e-12, atol=1e-12)
        got = competitive_relu(
            z, torch.tensor(alpha, dtype=torch.float64), beta, measure=measure, reduce=reduce
        )
        want = ref_carelu(z.numpy(), alpha, beta, measure=measure, reduce=reduce)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_competition_axes_follow_the_reduce_rules():
    assert competition_axes(4, "auto") == [1, 2, 3]
    assert competition_axes(4, "channel") == [2, 3]
    assert competition_axes(3, "auto") == [2]
    assert competition_axes(3, "sample") == [1, 2]
    assert competition_axes(2, "channel") == [1]  # no spatial axes: falls back to sample
    assert competition_axes(2, "last") == [1]
    assert competition_axes(1, "sample") == [0]  # one sample
    assert competition_axes(0, "auto") == []


def test_energy_share_on_a_hand_made_sample():
    z = torch.tensor([[3.0, -4.0], [1.0, 0.0]], dtype=torch.float64)
    p = competition(z, "energy", 1e-6, "sample")
    assert p.shape == (2, 1)
    assert p[0, 0].item() == pytest.approx(9 / (25 + 1e-6), rel=1e-14)
    assert p[1, 0].item() == pytest.approx(1 / (1 + 1e-6), rel=1e-14)
    assert competition(torch.tensor([3.0, -4.0]), "count").shape == (1,)  # 1-D: one sample


def test_negative_scale_passes_the_negative_side_sign_flipped():
    z = torch.tensor([[1.0, -2.0, 3.0, -4.0]], dtype=torch.float64)
    # count: p = 0.5, so alpha*p + beta = -atanh(1/2) and s = 2 * (-1/2) = -1.
    out = competitive_relu(
        z, torch.tensor(2.0, dtype=torch.float64), -1.0 - math.atanh(0.5), measure="count"
    )
    np.testing.assert_allclose(out.numpy(), [[0.0, 2.0, 0.0, 4.0]], atol=1e-14)
    # energy with alpha = 0: s = 2 * tanh(-atanh(1/4)) = -1/2, whatever p is.
    module = CompetitiveReLU(alpha_init=0.0, beta_init=-math.atanh(0.25), dtype=torch.float64)
    np.testing.assert_allclose(module(z).detach().numpy(), [[0.0, 1.0, 0.0, 2.0]], atol=1e-14)


def test_huge_inputs_give_the_formula_to_rounding():
    z = torch.tensor([[1e30, -2e30, 5e29, -1e29], [3e38, -3e38, 1e38, 2.0]])
    want = ref_p(z.double().numpy(), "energy", 1e-6, "sample")
    np.testing.assert_allclose(competition(z, "energy").numpy(), want, rtol=1e-6)
    want = ref_p(z.double().numpy(), "l1", 1e-6, "sample")
    np.testing.assert_allclose(competition(z, "l1").numpy(), want, rtol=1e-6)


def test_unknown_measure_or_reduce_is_a_usage_error():
    z = torch.ones(2, 3)
    with pytest.raises(UsageError, match="reduce"):
        competition(z, reduce="tokens")
    with pytest.raises(UsageError, match="measure"):
        competition(z, measure="l2")
    with pytest.raises(UsageError, match="measure"):
        competitive_relu(z, 0.0, 0.5, measure="l2")
    with pytest.raises(UsageError, match="reduce"):
        competitive_relu(z, 0.0, 0.5, reduce="tokens")


# --- MRePU / RePU math ------------------------------------------------------------------------


def test_mrepu_and_repu_match_float64_reference():
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 2
    np.testing.assert_allclose(mrepu(x).numpy(), ref_mrepu(x.numpy()), rtol=1e-12, atol=1e-12)
    want = ref_mrepu(x.numpy(), 3.0, 0.5, 0.25, a=0.37, b=2.5)
    a, b = (torch.tensor(gain, dtype=torch.float64) for gain in (0.37, 2.5))
    got = mrepu(x, 3.0, 0.5, gain_in=a, gain_out=b, blend=0.25)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        repu(x, 3.0).numpy(), np.maximum(x.numpy(), 0) ** 3, rtol=1e-12, atol=1e-12
    )


def test_mrepu_with_a_zero_output_gain_stays_finite_where_mrepu_saturates():
    x = torch.tensor([1e30, -1e30, 3.0])
    for gain in (torch.tensor(0.0), 0.0):
        assert torch.isfinite(mrepu(x, gain_out=gain)).all()


def test_overflowing_results_saturate_at_the_largest_finite_value():
    x = torch.tensor([3e38, 1e30, -1e30])
    assert mrepu(x).tolist()[:2] == [torch.finfo(torch.float32).max] * 2
    assert mrepu(x)[2].item() == 0.0
    half = torch.tensor([300.0], dtype=torch.float16)  # 300 * 301^2 > 65504
    assert mrepu(half).item() == torch.finfo(torch.float16).max
    assert repu(half).item() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                         ids=str)
def test_finite_max_is_the_dtypes_largest_value(dtype):
    # spelled out for TorchScript; it must stay torch.finfo's number
    assert functional._finite_max(dtype) == torch.finfo(dtype).max


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_carelu_gradients_match_finite_differences(measure, reduce):
    g = torch.Generator().manual_seed(1)
    for shape, (alpha, beta) in zip(((3, 4), (2, 3, 2, 2), (2, 2, 3)), SCALES[1:]):
        z = away_from_zero(shape, g).requires_grad_()
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
        fn = lambda z, a, b: competitive_relu(z, a, b, measure=measure, reduce=reduce)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z, a, b))


def test_count_measure_has_no_gradient_through_p():
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert not competition(z, "count").requires_grad
    assert competition(z, "energy").requires_grad


@pytest.mark.parametrize("lam", (0.0, 0.5, 1.0))
def test_mrepu_gradients_match_finite_differences(lam):
    x = away_from_zero((3, 5), torch.Generator().manual_seed(2), scale=2.0)
    x = torch.where((x + 1).abs() < 0.1, x + 0.3, x).requires_grad_()  # off the kink x = -c
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mrepu(x, 2.0, 1.0, blend=lam), (x,))
    assert torch.autograd.gradcheck(lambda x: mrepu(x, 1.5, 0.5, blend=lam), (x,))
    assert torch.autograd.gradcheck(
        lambda x, a, b: mrepu(x, 2.0, 1.0, gain_in=a, gain_out=b, blend=lam), (x, a, b))


def test_repu_gradients_match_finite_differences():
    x = away_from_zero((3, 5), torch.Generator().manual_seed(3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: repu(x, 2.0), (x,))
    assert torch.autograd.gradcheck(lambda x: repu(x, 3.0), (x,))


# --- the compiled spelling --------------------------------------------------------------------


def test_compiled_spelling_sums_in_float64_and_matches_the_formula(monkeypatch):
    # Under torch.compile the competition is summed in float64 (one fused reduction pass, no
    # max-abs scale): the same formula, finite for any float32 input.
    z = torch.tensor([[1e30, -2e30, 5e29, -1e29], [3e38, -3e38, 1e38, 2.0], [0.0, 0.0, 0.0, 0.0]])
    for measure in ("energy", "l1"):
        want = ref_p(z.double().numpy(), measure, 1e-6, "sample")
        got = functional._competition_wide(z, measure, 1e-6, "sample")
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    monkeypatch.setattr(functional, "_compiling_not_exporting", lambda: True)
    module = CompetitiveReLU(alpha_init=1.3, beta_init=-0.4)
    x = torch.randn(4, 3, 5, 5) * 3
    wide = functional._competitive_relu(x, module.alpha, module.beta, 2.0, 1e-6, "energy", "auto")
    torch.testing.assert_close(wide, plain_carelu(x, module), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(functional._competitive_relu(
        huge_input(torch.float16), module.alpha, module.beta, 2.0, 1e-6, "l1", "auto")).all()


def test_an_onnx_export_in_progress_gets_the_plain_formulas(monkeypatch):
    """The eager kernels are skipped while an exporter records the graph, whichever exporter
    and however it is detected (the ONNX flag is read only once torch.onnx is loaded)."""
    import torch.onnx

    def refuse(*args, **kwargs):
        raise AssertionError("an eager kernel ran during an export")

    monkeypatch.setattr(functional, "eager_competitive_relu", refuse)
    monkeypatch.setattr(functional, "eager_mrepu", refuse)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    x = torch.randn(2, 3, 4)
    module = CompetitiveReLU(alpha_init=1.3, beta_init=-0.4)
    torch.testing.assert_close(module(x), plain_carelu(x, module))
    np.testing.assert_allclose(mrepu(x, gain_in=0.5).numpy(), ref_mrepu(x.numpy(), a=0.5),
                               rtol=1e-6, atol=1e-6)


def test_torch_jit_script_compiles_the_functional_forms():
    scripted = torch.jit.script(functional.gained_mrepu)
    x = torch.randn(3, 4, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(scripted(x, one, one, 1.0, 2.0, 1.0), mrepu(x))
    scripted = torch.jit.script(functional.carelu)
    alpha, beta = torch.tensor(1.3, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    torch.testing.assert_close(scripted(x, alpha, beta, 2.0, 1e-6, "l1", "auto", False),
                               competitive_relu(x, alpha, beta, measure="l1"))


def _conds(program: torch.export.ExportedProgram) -> int:
    return sum(node.target is torch.ops.higher_order.cond for node in program.graph.nodes)


def test_only_programs_captured_for_onnx_take_the_cond_form():
    """.pt2 programs keep the plain formula (tools watching the dispatcher cannot all run
    torch.cond); inside onnx_export_form the capture holds the emission's two conds."""
    module = CompetitiveReLU().eval()
    x = torch.randn(3, 4, 5)
    assert _conds(torch.export.export(module, (x,))) == 0
    with functional.onnx_export_form():
        captured = torch.export.export(module, (x,))
    assert _conds(captured) == 2
    torch.testing.assert_close(captured.module()(x), module(x))
