"""Tests for retrofit/activations/modules.py: the modules compute their functional forms with
their parameters, the identity retrofit, numerical safety in every dtype, construction errors
and graph export (torch.export, TorchScript, the ONNX exporter)."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import pytest
import torch

from retrofit.activations.functional import mrepu
from retrofit.activations.modules import ACTIVATION_MODULES, CompetitiveReLU, MRePU, RePU
from retrofit.config import CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.errors import UsageError
from tests.activations.reference import (
    HALF_AND_SINGLE,
    MEASURES,
    REDUCTIONS,
    gained,
    huge_input,
    ref_carelu,
    ref_mrepu,
)


def test_module_computes_the_functional_form_with_its_parameters():
    module = CompetitiveReLU(
        measure="l1", reduce="channel", k=3.0, alpha_init=0.7, beta_init=-0.2, dtype=torch.float64
    )
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = ref_carelu(z.numpy(), 0.7, -0.2, k=3.0, measure="l1", reduce="channel")
    np.testing.assert_allclose(module(z).detach().numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("measure", MEASURES)
def test_identity_init_computes_relu(measure):
    config = CompetitiveReLUConfig(measure=measure)
    assert config.is_identity_init
    x32 = torch.randn(8, 4, 6, 6) * 5
    torch.testing.assert_close(CompetitiveReLU(config)(x32), torch.relu(x32), rtol=1e-6, atol=0)
    x64 = torch.randn(3, 5, 9, dtype=torch.float64) * 5
    identity64 = CompetitiveReLU(config, dtype=torch.float64)
    torch.testing.assert_close(identity64(x64), torch.relu(x64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("lam", (0.0, 0.25, 1.0))
def test_mrepu_blend_matches_float64_reference(lam):
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 2
    module = MRePU(MRePUConfig(p=3.0, c=0.5, blend=lam))
    np.testing.assert_allclose(
        module(x).detach().numpy(), ref_mrepu(x.numpy(), 3.0, 0.5, lam), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(RePU(p=3.0)(x).numpy(), np.maximum(x.numpy(), 0) ** 3,
                               rtol=1e-12, atol=1e-12)


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


def test_mrepu_blend_is_a_plain_float_the_schedule_can_set():
    module = MRePU(MRePUConfig(blend=0.0))
    x = torch.randn(6, 5)
    torch.testing.assert_close(module(x), torch.relu(x), rtol=0, atol=0)
    module.blend = 1.0
    torch.testing.assert_close(module(x), mrepu(x))
    assert "blend" not in module.state_dict()


def test_modules_take_their_config_with_overrides_and_refuse_another_one():
    module = CompetitiveReLU(CompetitiveReLUConfig(k=3.0), measure="count")
    assert (module.config.k, module.measure) == (3.0, "count")
    assert MRePU(p=3.0).config == MRePUConfig(p=3.0) and RePU(p=3.0).p == 3.0
    with pytest.raises(UsageError, match="measure"):
        CompetitiveReLU(measure="l2")
    with pytest.raises(UsageError, match="reduce"):
        CompetitiveReLU(CompetitiveReLUConfig(), reduce="tokens")
    for kind, other in ((MRePU, RePUConfig()), (RePU, MRePUConfig()),
                        (CompetitiveReLU, MRePUConfig())):
        with pytest.raises(UsageError, match=type(other).__name__):
            kind(other)  # type: ignore[arg-type]


# --- numerical safety -------------------------------------------------------------------------


def all_modules() -> list[torch.nn.Module]:
    carelus = [
        CompetitiveReLU(measure=m, reduce=r, alpha_init=a, beta_init=b)
        for m, r in itertools.product(MEASURES, REDUCTIONS)
        for a, b in ((0.0, None), (1.0, 0.8), (-1.0, -0.9))
    ]
    return [*carelus, *(MRePU(blend=lam) for lam in (0.0, 0.5, 1.0)), RePU(), RePU(p=3.0)]


def test_every_module_kind_is_listed():
    assert {type(module) for module in all_modules()} == set(ACTIVATION_MODULES)


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


def test_gradients_are_finite_on_zero_input():
    for module in all_modules():
        x = torch.zeros(2, 3, 4, requires_grad=True)
        module(x).sum().backward()
        grads = [x.grad, *(p.grad for p in module.parameters())]
        if isinstance(module, MRePU) and module.blend == 0.0:  # ReLU: the gains take no part
            grads = grads[:1]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), module


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
