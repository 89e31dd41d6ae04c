"""The one onnxruntime session factory: providers, models over 2 GiB, one-line refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from retrofit.errors import BadInputError, UnsupportedModelError
from retrofit.evaluation.evaluate import onnx_predictor
from retrofit.onnx_path import io as onnx_io
from retrofit.onnx_path.io import run_onnx
from retrofit.onnx_path.session import inference_session

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def linear_model(elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """y[N, 3] = x[N, 4] @ W, with 48 bytes of weights."""
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", elem, ["N", 4])],
        [helper.make_tensor_value_info("y", elem, ["N", 3])], [weight],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def sources(monkeypatch):
    """What each InferenceSession was built from: ("bytes" or "file", providers)."""
    built: list[tuple[str, list[str]]] = []
    real = onnxruntime.InferenceSession

    def spy(source, options=None, providers=None):
        built.append(("file" if isinstance(source, str) else "bytes", list(providers)))
        return real(source, options, providers=[CPU])  # this machine may have no GPU

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return built


def test_cpu_unless_cuda_is_asked_for_and_available(sources, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    inference_session(linear_model())
    inference_session(linear_model(), cuda=True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    inference_session(linear_model(), cuda=True)
    inference_session(linear_model(), providers=[CPU])
    assert [providers for _, providers in sources] == [[CPU], [CUDA, CPU], [CPU], [CPU]]


def test_evaluation_asks_for_cuda_and_parity_runs_do_not(sources, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    run_onnx(linear_model(), {"x": np.ones((2, 4), np.float32)})
    onnx_predictor(linear_model())
    assert [providers for _, providers in sources] == [[CPU], [CUDA, CPU]]


def test_a_model_over_the_protobuf_limit_goes_through_a_file_everywhere(sources, monkeypatch):
    monkeypatch.setattr(onnx_io, "_SAFE_PROTO_SIZE", 16)  # the small model counts as large
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    want = x @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
    np.testing.assert_allclose(run_onnx(linear_model(), {"x": x})[0], want, rtol=1e-6)
    logits = onnx_predictor(linear_model())(torch.from_numpy(x))
    np.testing.assert_allclose(logits.numpy(), want, rtol=1e-6)
    assert [kind for kind, _ in sources] == ["file", "file"]


def test_paths_and_bytes_are_taken_as_they_are(sources, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(linear_model(), path)
    inference_session(path)
    inference_session(linear_model().SerializeToString())
    assert [kind for kind, _ in sources] == ["file", "bytes"]


def test_refusals_are_one_line_project_errors():
    with pytest.raises(BadInputError, match="^onnxruntime cannot load the model") as error:
        inference_session(b"not a model")
    assert "\n" not in str(error.value)
    no_kernel = helper.make_graph(  # a valid graph: onnxruntime has no uint16 Max
        [helper.make_node("Max", ["x", "x"], ["y"])], "max",
        [helper.make_tensor_value_info("x", TensorProto.UINT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.UINT16, [2])],
    )  # fmt: skip
    model = helper.make_model(no_kernel, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(UnsupportedModelError, match="^onnxruntime cannot run the model: .*Max"):
        onnx_predictor(model)
