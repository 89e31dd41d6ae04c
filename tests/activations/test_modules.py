"""Tests for retrofit/activations/modules.py: the math against an independent float64 reference,
gradients, the identity retrofit, numerical safety, the registry and graph export."""

from __future__ import annotations

import io
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from retrofit.activations.modules import (  # noqa: I001
    _competitive_relu,
    _mrepu,
    ACTIVATION_MODULES,
    ACTIVATIONS,
    CompetitiveReLU,
    MRePU,
    RePU,
    competition,
    competition_axes,
    competitive_relu,
    make_activation,
    mrepu,
    repu,
)
from retrofit.config import CONFIGS, CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.errors import UsageError

MEASURES = ("energy", "l1", "count")
REDUCTIONS = ("auto", "sample", "channel", "last")
SHAPES = ((4, 7), (2, 3, 5, 5), (2, 6, 8))
HALF_AND_SINGLE = (torch.float32, torch.bfloat16, torch.float16)
# (alpha, beta) pairs: identity, a positive scale > 1, and two that make s negative.
SCALES = ((0.0, math.atanh(0.5)), (1.3, 0.4), (0.0, -0.7), (-2.5, 0.3))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # every test sees the same random inputs


# --- independent float64 reference (numpy), written from activations.md ---------------------


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


def test_module_computes_the_functional_form_with_its_parameters():
    module = CompetitiveReLU(
        measure="l1", reduce="channel", k=3.0, alpha_init=0.7, beta_init=-0.2, dtype=torch.float64
    )
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = ref_carelu(z.numpy(), 0.7, -0.2, k=3.0, measure="l1", reduce="channel")
    np.testing.assert_allclose(module(z).detach().numpy(), want, rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("measure", MEASURES)
def test_identity_init_computes_relu(measure):
    config = CompetitiveReLUConfig(measure=measure)
    assert config.is_identity_init
    x32 = torch.randn(8, 4, 6, 6) * 5
    torch.testing.assert_close(CompetitiveReLU(config)(x32), torch.relu(x32), rtol=1e-6, atol=0)
    x64 = torch.randn(3, 5, 9, dtype=torch.float64) * 5
    identity64 = make_activation(config, dtype=torch.float64)
    torch.testing.assert_close(identity64(x64), torch.relu(x64), rtol=1e-12, atol=0)


def test_huge_inputs_give_the_formula_to_rounding():
    z = torch.tensor([[1e30, -2e30, 5e29, -1e29], [3e38, -3e38, 1e38, 2.0]])
    want = ref_p(z.double().numpy(), "energy", 1e-6, "sample")
    np.testing.assert_allclose(competition(z, "energy").numpy(), want, rtol=1e-6)
    want = ref_p(z.double().numpy(), "l1", 1e-6, "sample")
    np.testing.assert_allclose(competition(z, "l1").numpy(), want, rtol=1e-6)


# --- MRePU / RePU math ------------------------------------------------------------------------


@pytest.mark.parametrize("lam", (0.0, 0.25, 1.0))
def test_mrepu_blend_matches_float64_reference(lam):
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 2
    module = MRePU(MRePUConfig(p=3.0, c=0.5, blend=lam))
    np.testing.assert_allclose(
        module(x).detach().numpy(), ref_mrepu(x.numpy(), 3.0, 0.5, lam), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(mrepu(x).numpy(), ref_mrepu(x.numpy()), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        repu(x, 3.0).numpy(), np.maximum(x.numpy(), 0) ** 3, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("lam", (0.25, 1.0))
def test_mrepu_gains_scale_input_and_output_as_the_spec_says(lam):
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 2
    module = MRePU(MRePUConfig(blend=lam), dtype=torch.float64)
    with torch.no_grad():
        module.gain_in.fill_(0.37)
        module.gain_out.fill_(2.5)
    want = ref_mrepu(x.numpy(), lam=lam, a=0.37, b=2.5)
    np.testing.assert_allclose(module(x).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    scripted = torch.jit.script(module)  # the plain formula, as graph capture sees it
    np.testing.assert_allclose(scripted(x).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    assert {"gain_in", "gain_out"} <= set(module.state_dict())


def test_mrepu_with_a_zero_output_gain_stays_finite_where_mrepu_saturates():
    x = torch.tensor([1e30, -1e30, 3.0])
    for gain in (torch.tensor(0.0), 0.0):
        assert torch.isfinite(mrepu(x, gain_out=gain)).all()


def test_mrepu_blend_is_a_plain_float_the_schedule_can_set():
    module = MRePU(MRePUConfig(blend=0.0))
    x = torch.randn(6, 5)
    torch.testing.assert_close(module(x), torch.relu(x), rtol=0, atol=0)
    module.blend = 1.0
    torch.testing.assert_close(module(x), mrepu(x))
    assert "blend" not in module.state_dict()


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


# --- numerical safety -------------------------------------------------------------------------


def all_modules() -> list[torch.nn.Module]:
    carelus = [
        CompetitiveReLU(measure=m, reduce=r, alpha_init=a, beta_init=b)
        for m, r in itertools.product(MEASURES, REDUCTIONS)
        for a, b in ((0.0, None), (1.0, 0.8), (-1.0, -0.9))
    ]
    return [*carelus, *(MRePU(blend=lam) for lam in (0.0, 0.5, 1.0)), RePU(), RePU(p=3.0)]


def huge_input(dtype: torch.dtype) -> torch.Tensor:
    big = torch.finfo(dtype).max
    values = [min(v, big) for v in (1e30, 3e38, 1e4)]
    row = [values[0], -values[0], values[1], -values[1], values[2], -values[2], 1.0, -0.5]
    return torch.tensor([row, row[::-1]], dtype=dtype).reshape(2, 2, 2, 2)


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=str)
def test_zero_and_huge_inputs_stay_finite_in_every_dtype(dtype):
    zeros = torch.zeros(2, 3, 4, dtype=dtype)
    huge = huge_input(dtype)
    for module in all_modules():
        for x in (zeros, huge, huge.reshape(2, 4, 2), huge.reshape(2, 8), huge.reshape(16)):
            y = module(x)
            assert y.dtype == dtype
            assert torch.isfinite(y).all(), (module, x)
        assert (module(zeros) == 0).all()


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=str)
def test_identity_carelu_keeps_huge_values(dtype):
    x = huge_input(dtype)
    y = CompetitiveReLU()(x)
    torch.testing.assert_close(y.float(), x.float().clamp_min(0), rtol=1e-2, atol=0)


def test_half_inputs_are_computed_in_float32():
    # 120000 terms of (1 or 0.25): the energy sum (75000) overflows float16 but not float32.
    z = torch.tensor([2.0, -1.0], dtype=torch.float16).repeat(60000).reshape(1, -1)
    out = CompetitiveReLU(alpha_init=1.0, beta_init=0.0)(z)
    want = ref_carelu(z.double().numpy(), 1.0, 0.0)
    np.testing.assert_allclose(out.detach().double().numpy(), want, rtol=2e-3)
    # (x + c)^p = 1e6 overflows float16, x * (x + c)^p = -1000 does not.
    x = torch.tensor([-1e-3], dtype=torch.float16)
    for lam in (0.5, 1.0):
        want = ref_mrepu(x.double().numpy(), 3.0, 100.0, lam)
        got = MRePU(p=3.0, c=100.0, blend=lam)(x)
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=2e-3)


def test_overflowing_results_saturate_at_the_largest_finite_value():
    x = torch.tensor([3e38, 1e30, -1e30])
    assert mrepu(x).tolist()[:2] == [torch.finfo(torch.float32).max] * 2
    assert mrepu(x)[2].item() == 0.0
    half = torch.tensor([300.0], dtype=torch.float16)  # 300 * 301^2 > 65504
    assert mrepu(half).item() == torch.finfo(torch.float16).max
    assert repu(half).item() == torch.finfo(torch.float16).max


def test_gradients_are_finite_on_zero_input():
    for module in all_modules():
        x = torch.zeros(2, 3, 4, requires_grad=True)
        module(x).sum().backward()
        grads = [x.grad, *(p.grad for p in module.parameters())]
        if isinstance(module, MRePU) and module.blend == 0.0:  # ReLU: the gains take no part
            grads = grads[:1]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), module


# --- registry and errors ----------------------------------------------------------------------


def test_registry_builds_each_config_with_its_values():
    assert set(ACTIVATIONS) == set(CONFIGS) == {"carelu", "mrepu", "repu"}
    assert set(ACTIVATION_MODULES) == {CompetitiveReLU, MRePU, RePU}

    carelu = make_activation(
        CompetitiveReLUConfig(measure="l1", k=3.0, eps=1e-4, reduce="channel", alpha_init=0.5,
                              beta_init=0.1)
    )
    assert type(carelu) is CompetitiveReLU
    assert (carelu.measure, carelu.k, carelu.eps, carelu.reduce) == ("l1", 3.0, 1e-4, "channel")
    assert carelu.alpha.item() == pytest.approx(0.5) and carelu.beta.item() == pytest.approx(0.1)
    assert carelu.alpha.shape == () and isinstance(carelu.alpha, torch.nn.Parameter)

    fresh = make_activation(CompetitiveReLUConfig(k=4.0))
    assert fresh.beta.item() == pytest.approx(math.atanh(0.25)) and fresh.alpha.item() == 0.0

    mre = make_activation(MRePUConfig(p=3.0, c=0.5, blend=0.25))
    assert type(mre) is MRePU and (mre.p, mre.c, mre.blend) == (3.0, 0.5, 0.25)
    assert [(name, p.item()) for name, p in mre.named_parameters()] == [("gain_in", 1.0),
                                                                        ("gain_out", 1.0)]

    re = make_activation(RePUConfig(p=3.0))
    assert type(re) is RePU and re.p == 3.0

    assert type(make_activation("mrepu")) is MRePU
    assert "measure=energy" in repr(make_activation("carelu"))


def test_unknown_names_raise_a_usage_error():
    with pytest.raises(UsageError, match="unknown activation"):
        make_activation("gelu")
    with pytest.raises(UsageError, match="measure"):
        CompetitiveReLU(measure="l2")
    with pytest.raises(UsageError, match="reduce"):
        competition(torch.ones(2, 3), reduce="tokens")
    with pytest.raises(UsageError):
        make_activation(object())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        MRePU(RePUConfig())  # type: ignore[arg-type]


# --- export -----------------------------------------------------------------------------------


SCALED = {"alpha_init": 1.3, "beta_init": -0.4}  # not the identity, so graphs compute something


def export_cases() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    x4, x3, x2 = (torch.randn(shape, generator=g) for shape in ((2, 3, 4, 4), (2, 5, 6), (3, 7)))
    cases = [
        (f"carelu-{m}-{r}-{x.dim()}d", CompetitiveReLU(measure=m, reduce=r, **SCALED), x)
        for m in MEASURES
        for r, x in (("auto", x4), ("channel", x4), ("auto", x3), ("sample", x2))
    ]
    cases += [(f"mrepu-{lam}", gained(MRePU(blend=lam)), x4) for lam in (0.0, 0.5, 1.0)]
    return [*cases, ("repu", RePU(), x3)]


def gained(module: MRePU) -> MRePU:
    """Gains other than 1, as a calibrated swap leaves them, so graphs must carry them."""
    with torch.no_grad():
        module.gain_in.fill_(0.6)
        module.gain_out.fill_(1.7)
    return module


CASES = export_cases()
SCRIPT_CASES = CASES[::3] + CASES[-4:]
RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}


@pytest.mark.parametrize("name,module,x", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")
def test_torch_export_holds_no_relu_node(name, module, x):
    program = torch.export.export(module, (x,))
    for graph in (program.graph, program.run_decompositions().graph):
        targets = [node.target for node in graph.nodes if node.op == "call_function"]
        assert not RELU_OPS & set(targets), targets
        assert not any("relu" in str(t) for t in targets), targets
    torch.testing.assert_close(program.module()(x), module(x))


@pytest.mark.parametrize("name,module,x", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_torch_jit_script_matches_eager(name, module, x):
    torch.testing.assert_close(torch.jit.script(module)(x), module(x))


@pytest.mark.parametrize("opset", (13, 17))
@pytest.mark.parametrize("name,module,x", CASES, ids=[c[0] for c in CASES])
def test_onnx_export_matches_onnxruntime(name, module, x, opset):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), buffer, dynamo=False, opset_version=opset,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    assert "Relu" not in {node.op_type for node in model.graph.node}
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    other_batch = torch.randn(5, *x.shape[1:]) * 3  # the batch axis stays dynamic
    for inp in (x, other_batch):
        (got,) = session.run(None, {"x": inp.numpy()})
        np.testing.assert_allclose(got, module(inp).detach().numpy(), rtol=1e-5, atol=1e-5)


# --- eager fast path (custom autograd Functions) -----------------------------------------------


def plain_carelu(z, module):
    """The plain tensor formula that graph capture sees, with the module's parameters."""
    return _competitive_relu(
        z, module.alpha, module.beta, module.k, module.eps, module.measure, module.reduce
    )


def plain_mrepu(x, module):
    xa = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
    big = torch.finfo(x.dtype).max
    a, b = module.gain_in.to(xa.dtype), module.gain_out.to(xa.dtype)
    term = _mrepu(a * xa, module.p, module.c).clamp(-big, big) * b
    y = (1.0 - module.blend) * xa.clamp_min(0.0) + module.blend * term
    return y.clamp(-big, big).to(x.dtype)


def grads_of(fn, z, module, weight):
    z = z.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = fn(z, module)
    (out * weight).sum().backward()
    return out.detach(), [z.grad, *(p.grad for p in module.parameters())]


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
def test_inplace_inference_writes_into_the_input_only_where_that_is_exact(measure):
    z = torch.randn(4, 3, 5, 5)
    settings = {"measure": measure, "alpha_init": 1.3, "beta_init": 0.4}
    want = plain_carelu(z, CompetitiveReLU(**settings))
    module = CompetitiveReLU(**settings, inplace=True)
    x = z.clone()
    with torch.no_grad():
        y = module(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # autograd, a scale that can turn negative, a non-contiguous or half input: out of place
    negative = CompetitiveReLU(measure=measure, alpha_init=-2.5, beta_init=0.3, inplace=True)
    for run, x in ((module, z.clone().requires_grad_()), (negative, z.clone()),
                   (module, z.clone().transpose(2, 3)), (module, z.clone().half())):
        before = x.detach().clone()
        with torch.set_grad_enabled(x.requires_grad):
            run(x)
        assert torch.equal(x.detach(), before)


def test_eager_calls_take_the_fast_path_and_gradcheck_it():
    module = CompetitiveReLU(alpha_init=1.3, beta_init=0.4, dtype=torch.float64)
    z = away_from_zero((2, 3, 2, 2), torch.Generator().manual_seed(6)).requires_grad_()
    assert type(module(z).grad_fn).__name__.startswith("_CompetitiveReLUFunction")
    a, b = module.alpha, module.beta
    for measure in MEASURES:
        fn = lambda z, a, b: competitive_relu(z, a, b, measure=measure)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z, a, b))
    x = away_from_zero((3, 4), torch.Generator().manual_seed(7), scale=2.0).requires_grad_()
    assert type(MRePU(blend=0.5)(x).grad_fn).__name__.startswith("_MRePUFunction")
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


def count_saved_elements(fn, *inputs) -> tuple[int, int]:
    """(number, total elements) of the tensors autograd keeps for the backward of ``fn``."""
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    large = [t for t in saved if t.numel() > 64]
    return len(large), sum(t.numel() for t in saved)


def test_fast_paths_keep_only_the_input_for_backward():
    z = torch.randn(8, 16, 12, 12, requires_grad=True)
    for module in (CompetitiveReLU(), CompetitiveReLU(measure="l1"), MRePU(), MRePU(blend=0.5)):
        plain = plain_carelu if isinstance(module, CompetitiveReLU) else plain_mrepu
        fast_count, fast_elements = count_saved_elements(module, z)
        plain_count, plain_elements = count_saved_elements(lambda x: plain(x, module), z)
        assert fast_count == 1, module  # z itself, plus a few numbers per sample
        assert fast_elements < z.numel() + 8 * 8
        assert plain_count >= 3 and plain_elements >= 3 * z.numel(), module


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


def test_compiled_spelling_sums_in_float64_and_matches_the_formula(monkeypatch):
    # Under torch.compile the competition is summed in float64 (one fused reduction pass, no
    # max-abs scale): the same formula, finite for any float32 input.
    import retrofit.activations.modules as activations

    z = torch.tensor([[1e30, -2e30, 5e29, -1e29], [3e38, -3e38, 1e38, 2.0], [0.0, 0.0, 0.0, 0.0]])
    for measure in ("energy", "l1"):
        want = ref_p(z.double().numpy(), measure, 1e-6, "sample")
        got = activations._competition_wide(z, measure, 1e-6, "sample")
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    monkeypatch.setattr(activations, "_compiling_not_exporting", lambda: True)
    module = CompetitiveReLU(alpha_init=1.3, beta_init=-0.4)
    x = torch.randn(4, 3, 5, 5) * 3
    wide = activations._competitive_relu(x, module.alpha, module.beta, 2.0, 1e-6, "energy", "auto")
    torch.testing.assert_close(wide, plain_carelu(x, module), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(activations._competitive_relu(
        huge_input(torch.float16), module.alpha, module.beta, 2.0, 1e-6, "l1", "auto")).all()


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
