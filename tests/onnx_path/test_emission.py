"""retrofit.onnx_path.emission: CompetitiveReLU in few passes over the tensor, and each of its
``If`` branches (sums in range or not, every s >= 0 or not) computing activations.md's math."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from retrofit.config import CompetitiveReLUConfig
from retrofit.onnx_path.emission import MAX_OPSET
from retrofit.onnx_path.io import run_onnx
from tests.onnx_path.test_rewrite import (
    F32,
    _rng,
    assert_close_to_scale,
    carelu_reference,
    rewrite_and_check,
    single_relu_model,
)

SHAPE = [4, 3, 5, 5]
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _full_tensor_ops(model: onnx.ModelProto, shape: list[int]) -> list[str]:
    """Top-level nodes that compute on every element of the site's tensor (any view of it):
    each is a pass that onnxruntime runs whatever the branches decide. Views (Flatten,
    Reshape) are aliases, not passes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    size = int(np.prod(shape))
    full = {"x"} | {
        value.name for value in inferred.graph.value_info
        if np.prod([d.dim_value for d in value.type.tensor_type.shape.dim]) == size
    }  # fmt: skip
    return [node.op_type for node in inferred.graph.node
            if set(node.input) & full and node.op_type not in ("Flatten", "Reshape", "Shape")]


def _site_if_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "If"]


@pytest.mark.parametrize("measure, passes", [("energy", 5), ("l1", 4)])
@pytest.mark.parametrize("opset", [9, 11, 13, 18, MAX_OPSET])
def test_energy_and_l1_read_the_tensor_in_few_passes_and_write_it_once(measure, passes, opset):
    result = rewrite_and_check(single_relu_model(SHAPE, F32, opset),
                               CompetitiveReLUConfig(measure=measure))
    ops = _full_tensor_ops(result.model, SHAPE)
    assert len(ops) == passes, ops  # Max, the two sums' Mul/Abs and ReduceSum, nothing else
    assert "ReduceMax" not in ops and "Div" not in ops  # the rescaled form runs only in a branch
    p_check, output = _site_if_nodes(result.model)
    fast_output = next(a.g for a in output.attribute if a.name == "then_branch")
    assert [node.op_type for node in fast_output.node] == ["Mul"]  # max(z, 0) * s: one pass


def test_float16_sites_cannot_overflow_their_sums_and_need_no_check():
    model = single_relu_model(SHAPE, TensorProto.FLOAT16)
    result = rewrite_and_check(model, CompetitiveReLUConfig())
    assert not _site_if_nodes(result.model)
    x = _rng(3).standard_normal(SHAPE).astype(np.float16) * 300
    (got,) = run_onnx(result.model, {"x": x})
    assert got.dtype == np.float16
    assert_close_to_scale(got, carelu_reference(x, 0.0, np.arctanh(0.5), axes=(1, 2, 3)), 1e-3)


@pytest.mark.parametrize("measure", ["energy", "l1"])
@pytest.mark.parametrize("opset", [9, 13, MAX_OPSET])
@pytest.mark.parametrize("alpha, beta", [(2.0, 0.1), (0.5, -1.2), (8.0, -4.0)],
                         ids=["every-s-positive", "every-s-negative", "mixed-signs"])
def test_each_output_branch_matches_the_float64_reference(measure, opset, alpha, beta):
    x = _rng(4).standard_normal(SHAPE).astype(np.float32)
    x[1] *= -1.0  # a mostly negative sample: small p, so s < 0 there with alpha=8, beta=-4
    x[2, 0, 0, 0] = 0.0
    result = rewrite_and_check(single_relu_model(SHAPE, F32, opset),
                               CompetitiveReLUConfig(measure=measure),
                               site_values={"act": {"alpha": alpha, "beta": beta}})
    (got,) = run_onnx(result.model, {"x": x})
    want = carelu_reference(x, alpha, beta, measure=measure, axes=(1, 2, 3))
    assert_close_to_scale(got, want)
    assert (got >= 0).all()


@pytest.mark.parametrize("measure", ["energy", "l1"])
@pytest.mark.parametrize("opset", [9, 13, MAX_OPSET])
def test_sums_beyond_range_take_the_rescaled_branch_and_saturate(measure, opset):
    """Values near float32's largest: the sums overflow (energy) or pass big / k (L1), so p is
    measured on z / max|z| and the output saturates at the largest float32 like the torch
    module's clamp, instead of becoming inf."""
    x = np.zeros(SHAPE, np.float32)
    x[0, 0, 0, :3] = [3e38, -1e38, 2e38]
    x[1] = _rng(5).standard_normal(SHAPE[1:]).astype(np.float32)  # an ordinary sample beside
    result = rewrite_and_check(single_relu_model(SHAPE, F32, opset),
                               CompetitiveReLUConfig(measure=measure),
                               site_values={"act": {"alpha": 1.0, "beta": 0.8}})
    (got,) = run_onnx(result.model, {"x": x})
    assert np.isfinite(got).all()
    want = np.minimum(carelu_reference(x, 1.0, 0.8, measure=measure, axes=(1, 2, 3)),
                      FLOAT32_MAX)
    assert got[0, 0, 0, 0] == FLOAT32_MAX  # s * 3e38 > big: saturated
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nan_input_is_measured_by_the_rescaled_branch_like_the_torch_module():
    x = _rng(6).standard_normal(SHAPE).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    result = rewrite_and_check(single_relu_model(SHAPE), CompetitiveReLUConfig())
    (got,) = run_onnx(result.model, {"x": x})
    assert np.isnan(got[0]).any()
    assert_close_to_scale(got[1:], carelu_reference(x[1:], 0.0, np.arctanh(0.5), axes=(1, 2, 3)))


def test_an_empty_batch_runs_both_checks_and_gives_an_empty_output():
    model = single_relu_model(["N", 3], F32)
    result = rewrite_and_check(model, CompetitiveReLUConfig())
    (got,) = run_onnx(result.model, {"x": np.zeros((0, 3), np.float32)})
    assert got.shape == (0, 3)
