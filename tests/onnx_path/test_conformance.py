"""retrofit.onnx_path.to_torch against ONNX's own operator conformance cases, as onnx2torch runs them.

Every case whose ops are all in ``SUPPORTED_OPS`` is run: the node cases of
``onnx.backend.test.case.node`` and the ``pytorch-converted`` / ``pytorch-operator`` models
shipped under ``onnx/backend/test/data``. Each one either computes the expected outputs (same
shapes, dtypes and values within the backend runner's tolerances) or is refused with a one-line
:class:`UnsupportedModelError`. Any other exception, or a wrong value, fails the case by name.
onnx's "light" model-zoo classifiers must all compute their expected outputs.

Below them: the ops classic classifiers use, at each opset where their semantics differ, against
onnxruntime; LRN against its spec formula; old op versions' attribute forms (the op-version
registry itself is tested in test_registry.py).
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from retrofit.errors import UnsupportedModelError
from retrofit.onnx_path.to_torch import SUPPORTED_OPS
from retrofit.onnx_path.to_torch.builder import onnx_to_torch
from tests.onnx_path.test_to_torch import OpCase, _assert_matches_ort, _f, _i, _n

_DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
_MODEL_KINDS = ("pytorch-converted", "pytorch-operator")
# (rtol, atol) by expected dtype: the backend runner's float32 default, looser where the type
# itself rounds at ~1e-3 (float16) or ~1e-2 (bfloat16) and torch accumulates differently.
_TOLERANCES = {"float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1e-2)}


@dataclass(frozen=True)
class ConformanceCase:
    name: str
    kind: str  # "node", "light" (zoo classifiers) or a folder of _MODEL_KINDS
    model: onnx.ModelProto
    data_sets: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    rtol: float = 1e-3
    atol: float = 1e-7


def _read_tensor(path: str) -> np.ndarray:
    proto = onnx.TensorProto()
    with open(path, "rb") as handle:
        proto.ParseFromString(handle.read())
    return numpy_helper.to_array(proto)


def _numbered(folder: str, prefix: str) -> list[np.ndarray]:
    paths = glob.glob(os.path.join(folder, f"{prefix}_*.pb"))
    paths.sort(key=lambda p: int(os.path.basename(p)[len(prefix) + 1 : -3]))
    return [_read_tensor(p) for p in paths]


def _model_cases() -> list[ConformanceCase]:
    cases = []
    for kind in _MODEL_KINDS:
        for folder in sorted(glob.glob(os.path.join(_DATA, kind, "test_*"))):
            sets = [
                (_numbered(data, "input"), _numbered(data, "output"))
                for data in sorted(glob.glob(os.path.join(folder, "test_data_set_*")))
            ]
            model = onnx.load(os.path.join(folder, "model.onnx"))
            cases.append(ConformanceCase(os.path.basename(folder), kind, model, sets))
    return cases


def _zoo_cases() -> list[ConformanceCase]:
    """onnx's "light" copies of the model-zoo classifiers (AlexNet, DenseNet-121, Inception
    v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512): the real graphs with weights
    made by ConstantOfShape, fed as onnx's backend runner feeds them."""
    from onnx.backend.test.runner import Runner

    cases = []
    for path in sorted(glob.glob(os.path.join(_DATA, "light", "light_*.onnx"))):
        model = onnx.load(path)
        initializers = {init.name for init in model.graph.initializer}
        feeds = [Runner.generate_dummy_data(i, seed=0, random=False)
                 for i in model.graph.input if i.name not in initializers]
        expected = [_read_tensor(path[: -len(".onnx")] + "_output_0.pb")]
        name = os.path.basename(path)[len("light_") : -len(".onnx")]
        cases.append(ConformanceCase(name, "light", model, [(feeds, expected)]))
    return cases


def _node_cases() -> list[ConformanceCase]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # generating the expected outputs warns (overflow, log 0)
        warnings.simplefilter("ignore")
        found = collect_testcases()
    return [
        ConformanceCase(c.name, "node", c.model, c.data_sets, c.rtol, c.atol)
        for c in found
        if c.model is not None and c.data_sets
    ]


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            for n in model.graph.node}


def _claimed(cases: list[ConformanceCase]) -> list[ConformanceCase]:
    return [c for c in cases if _ops(c.model) <= SUPPORTED_OPS]


NODE_CASES = _claimed(_node_cases())
MODEL_CASES = _claimed(_model_cases())
ZOO_CASES = _zoo_cases()  # all claimed: every op of every one must run
_FAST_ZOO = {"bvlc_alexnet", "squeezenet"}  # the others take about a second or more each


def _to_torch(array: Any) -> torch.Tensor:
    if isinstance(array, onnx.TensorProto):
        array = numpy_helper.to_array(array)
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits as torch's
        bits = torch.from_numpy(np.array(array, copy=True).view(np.int16))
        return bits.view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _to_numpy(value: Any) -> tuple[np.ndarray, str]:
    """The value as numpy (bfloat16 widened to float32) and the name of its element type."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        return value.float().numpy(), "bfloat16"
    array = value.numpy()
    return array, array.dtype.name


def _feeds(model: onnx.ModelProto, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The data set's inputs for the module's placeholders (graph inputs minus initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input]
    if len(inputs) == len(graph_inputs):
        inputs = [a for a, name in zip(inputs, graph_inputs) if name not in initializers]
    return [_to_torch(a) for a in inputs]


def _assert_output(actual: Any, expected: Any, case: ConformanceCase) -> None:
    if isinstance(expected, onnx.TensorProto):
        expected = numpy_helper.to_array(expected)
    expected = np.asarray(expected)
    got, got_type = _to_numpy(actual)
    assert got.shape == expected.shape, f"shape {got.shape}, expected {expected.shape}"
    assert got_type == expected.dtype.name, f"dtype {got_type}, expected {expected.dtype.name}"
    if expected.dtype.kind in "biu":
        np.testing.assert_array_equal(got, expected)
        return
    rtol, atol = _TOLERANCES.get(expected.dtype.name, (case.rtol, case.atol))
    np.testing.assert_allclose(got, expected.astype(np.float64), rtol=rtol, atol=atol)


def _check(case: ConformanceCase) -> str:
    """Run ``case``: "passed" or "refused"; anything else raises (fails the test)."""
    try:
        module = onnx_to_torch(case.model)
        for inputs, outputs in case.data_sets:
            with torch.no_grad():
                result = module(*_feeds(case.model, inputs))
            results = result if isinstance(result, tuple) else (result,)
            assert len(results) == len(outputs), f"{len(results)} outputs, {len(outputs)} expected"
            for actual, expected in zip(results, outputs):
                _assert_output(actual, expected, case)
    except UnsupportedModelError as refusal:
        message = str(refusal)
        assert message and "\n" not in message, f"refusal is not one line: {message!r}"
        return "refused"
    return "passed"


@pytest.mark.slow
@pytest.mark.parametrize("case", NODE_CASES, ids=lambda c: c.name)
def test_node_conformance_case_matches_or_is_refused_in_one_line(case: ConformanceCase) -> None:
    _check(case)


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.name)
def test_pytorch_model_case_matches_or_is_refused_in_one_line(case: ConformanceCase) -> None:
    _check(case)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[] if c.name in _FAST_ZOO else [pytest.mark.slow])
    for c in ZOO_CASES
])
def test_zoo_classifier_graph_computes_its_expected_output(case: ConformanceCase) -> None:
    assert _check(case) == "passed"


def test_conformance_cases_are_found_and_cover_the_classifier_ops() -> None:
    """Guards the two tests above against running nothing: the suite is found, and the ops
    classic classifiers use have node cases that actually pass (not merely refusals)."""
    assert len(NODE_CASES) > 1000 and len(MODEL_CASES) > 100
    assert {c.name for c in ZOO_CASES} >= {"bvlc_alexnet", "inception_v1", "zfnet512", "vgg19"}
    names = {c.name for c in NODE_CASES}
    for expected in ("test_lrn", "test_lrn_default", "test_prelu_broadcast",
                     "test_gather_elements_negative_indices", "test_reshape_extended_dims",
                     "test_div_int8", "test_softmax_axis_0_expanded_ver18"):
        assert expected in names, expected
    by_name = {c.name: c for c in NODE_CASES}
    for name in ("test_lrn", "test_lrn_default", "test_gather_elements_negative_indices",
                 "test_reshape_extended_dims", "test_reshape_zero_dim", "test_div_int8",
                 "test_div_int32_trunc", "test_div_uint8", "test_prelu_broadcast"):
        assert _check(by_name[name]) == "passed", name


# --------------------------------------------------------------------------- classifier ops
# What the classic ONNX-zoo classifiers (AlexNet, CaffeNet, ZFNet, GoogLeNet/Inception,
# SqueezeNet, VGG, ResNet, DenseNet, ShuffleNet, MobileNet, EfficientNet-lite) use, each at
# the opsets where its semantics differ, against onnxruntime.

_NEWEST = onnx.defs.onnx_opset_version()


def _cases(id: str, opsets: Sequence[int], nodes: list, feeds: dict, inits: dict | None = None,
           **kwargs: Any) -> list[OpCase]:
    return [OpCase(f"{id}@{o}", o, nodes, feeds, inits=inits or {}, **kwargs) for o in opsets]


_X4 = _f(2, 6, 5, 5)
_POOL = dict(kernel_shape=[3, 3], strides=[2, 2])
_SCALES = {"s": np.array([1, 1, 2, 3], np.float32)}
_EMPTY_ROI = {"roi": np.zeros(0, np.float32)}
_BN = {"g": _f(3), "b": _f(3), "m": _f(3), "v": np.abs(_f(3)) + 0.5}
CLASSIFIER_CASES = [
    *_cases("lrn3", (9, 13, _NEWEST), [_n("LRN", ["x"], size=3, alpha=0.02, beta=0.6, bias=1.5)],
            {"x": _X4}),
    *_cases("lrn5-default", (9, _NEWEST), [_n("LRN", ["x"], size=5)], {"x": _X4 * 10}),
    *_cases("alexnet-block", (9,), [
        _n("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), _n("Relu", ["c"], ["r"]),
        _n("LRN", ["r"], ["l"], size=5), _n("MaxPool", ["l"], **_POOL)],
        {"x": _f(1, 3, 9, 9)}, {"w": _f(8, 3, 3, 3)}),
    *[case for op in ("Sum", "Mean", "Max", "Min") for case in (
        *_cases(f"{op}-3", (9, 13, _NEWEST), [_n(op, ["a", "b", "c"])],
                {"a": _f(2, 3, 4), "b": _f(3, 4), "c": _f(2, 1, 4)}),
        *_cases(f"{op}-1", (9, _NEWEST), [_n(op, ["a"])], {"a": _f(2, 3)}))],
    *_cases("clip-attr", (9,), [_n("Clip", ["x"], min=-0.5, max=0.7)], {"x": _f(2, 3)}),
    *_cases("clip-attr-max", (9,), [_n("Clip", ["x"], max=0.7)], {"x": _f(2, 3)}),
    *_cases("clip-inputs", (11, 13, _NEWEST), [_n("Clip", ["x", "lo", "hi"])], {"x": _f(2, 3)},
            {"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
    *_cases("clip-max-input", (11, _NEWEST), [_n("Clip", ["x", "", "hi"])], {"x": _f(2, 3)},
            {"hi": np.float32(0.7)}),
    *[case for op in ("Softmax", "LogSoftmax") for axis in (None, 0, 1, 2, -1)
      for case in _cases(f"{op}-axis{axis}", (9, 11, 13, _NEWEST),
                         [_n(op, ["x"], **({} if axis is None else {"axis": axis}))],
                         {"x": _f(2, 3, 4)})],
    *[case for axis in (0, 1, 2, 3)
      for case in _cases(f"flatten{axis}", (9, 13, _NEWEST), [_n("Flatten", ["x"], axis=axis)],
                         {"x": _f(2, 3, 4)})],
    *_cases("flatten-neg", (11, _NEWEST), [_n("Flatten", ["x"], axis=-1)], {"x": _f(2, 3, 4)}),
    *[case for mode in ("constant", "reflect", "edge") for case in (
        *_cases(f"pad-attr-{mode}", (9,),
                [_n("Pad", ["x"], mode=mode, pads=[0, 0, 1, 2, 0, 0, 2, 1],
                    **({"value": 1.5} if mode == "constant" else {}))],
                {"x": _f(2, 3, 4, 4)}),
        *_cases(f"pad-input-{mode}", (11, 13, _NEWEST),
                [_n("Pad", ["x", "p"] + (["v"] if mode == "constant" else []), mode=mode)],
                {"x": _f(2, 3, 4, 4)},
                {"p": _i(0, 0, 1, 2, 0, 0, 2, 1), **({"v": np.float32(1.5)} if mode == "constant"
                                                     else {})}))],
    *[case for mode in ("reflect", "edge") for case in _cases(
        f"pad-{mode}-any-dims", (11, _NEWEST), [_n("Pad", ["x", "p"], mode=mode)],
        {"x": _f(3, 3, 4)}, {"p": _i(1, 0, 2, 2, 0, 1)})],  # the batch dim, not the channels
    *_cases("pad-edge-one-dim-of-5", (11, _NEWEST), [_n("Pad", ["x", "p"], mode="edge")],
            {"x": _f(2, 1, 2, 2, 3)}, {"p": _i(0, 0, 0, 0, 2, 0, 0, 0, 0, 1)}),
    *_cases("pad-axes", (18, _NEWEST), [_n("Pad", ["x", "p", "", "ax"])], {"x": _f(2, 3, 4, 4)},
            {"p": _i(1, 2, 2, 1), "ax": _i(2, -1)}),
    *_cases("pad-wrap", (19, _NEWEST), [_n("Pad", ["x", "p"], mode="wrap")], {"x": _f(2, 3, 4, 4)},
            {"p": _i(0, 0, 1, 2, 0, 0, 2, 1)}),
    *_cases("upsample-attr", (7,), [_n("Upsample", ["x"], mode="nearest",
                                       scales=[1.0, 1.0, 2.0, 3.0])], {"x": _f(1, 2, 3, 3)}),
    *_cases("upsample-input", (9,), [_n("Upsample", ["x", "s"])], {"x": _f(1, 2, 3, 3)}, _SCALES),
    *_cases("resize10", (10,), [_n("Resize", ["x", "s"])], {"x": _f(1, 2, 3, 3)}, _SCALES),
    *_cases("resize-nearest", (11, 13, 18, 19, _NEWEST), [_n("Resize", ["x", "roi", "s"])],
            {"x": _f(1, 2, 3, 3)}, {**_EMPTY_ROI, **_SCALES}),
    *_cases("resize-linear", (11, 13, 18, 19, _NEWEST),
            [_n("Resize", ["x", "roi", "s"], mode="linear")], {"x": _f(1, 2, 3, 3)},
            {**_EMPTY_ROI, "s": np.array([1, 1, 2, 2], np.float32)}),
    *_cases("resize-linear-corners", (11, _NEWEST),
            [_n("Resize", ["x", "roi", "s"], mode="linear",
                coordinate_transformation_mode="align_corners")], {"x": _f(1, 2, 3, 3)},
            {**_EMPTY_ROI, "s": np.array([1, 1, 2, 2], np.float32)}),
    *_cases("resize-sizes", (13, _NEWEST),
            [_n("Resize", ["x", "", "", "sz"], coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")], {"x": _f(1, 2, 3, 3)}, {"sz": _i(1, 2, 6, 9)}),
    *_cases("instance-norm", (9, _NEWEST), [_n("InstanceNormalization", ["x", "g", "b"],
                                                epsilon=1e-3)],
            {"x": _f(2, 3, 4, 5)}, {"g": _f(3), "b": _f(3)}),
    *[case for ta in (0, 1) for tb in (0, 1) for case in _cases(
        f"gemm-trans{ta}{tb}", (9, 11, 13, _NEWEST),
        [_n("Gemm", ["a", "w", "c"], transA=ta, transB=tb, alpha=0.5, beta=2.0)],
        {"a": _f(4, 3) if ta else _f(3, 4)}, {"w": _f(5, 4) if tb else _f(4, 5), "c": _f(5)})],
    *_cases("gemm-c2d", (9, 13), [_n("Gemm", ["a", "w", "c"], transB=1)], {"a": _f(3, 4)},
            {"w": _f(5, 4), "c": _f(3, 5)}),
    *_cases("gemm-c-scalar", (9, 13), [_n("Gemm", ["a", "w", "c"], beta=0.5)], {"a": _f(3, 4)},
            {"w": _f(4, 5), "c": _f(1)}),
    *_cases("gemm-no-c", (11, _NEWEST), [_n("Gemm", ["a", "w"], alpha=2.0, transB=1)],
            {"a": _f(3, 4)}, {"w": _f(5, 4)}),
    *_cases("matmul-batched", (9, 13, _NEWEST), [_n("MatMul", ["a", "b"])],
            {"a": _f(2, 1, 3, 4), "b": _f(3, 4, 5)}),
    *_cases("matmul-vector", (9, 13), [_n("MatMul", ["a", "b"])], {"a": _f(4), "b": _f(2, 4, 5)}),
    *[case for op in ("GlobalAveragePool", "GlobalMaxPool")
      for shape in ((2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 4, 5))
      for case in _cases(f"{op}-rank{len(shape)}", (9, _NEWEST), [_n(op, ["x"])],
                         {"x": _f(*shape)})],
    *_cases("maxpool-ceil", (10, 12, _NEWEST), [_n("MaxPool", ["x"], ceil_mode=1, **_POOL)],
            {"x": _f(1, 2, 6, 6)}),
    *_cases("maxpool-ceil-pads", (10, 12, _NEWEST),
            [_n("MaxPool", ["x"], ceil_mode=1, pads=[1, 1, 1, 1], **_POOL)], {"x": _f(1, 2, 7, 7)}),
    *_cases("maxpool-dilations", (10, 12, _NEWEST),
            [_n("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 0, 0, 1])],
            {"x": _f(1, 2, 6, 6)}),
    *_cases("maxpool-asymmetric-pads", (9, _NEWEST),
            [_n("MaxPool", ["x"], pads=[0, 0, 1, 1], **_POOL)], {"x": _f(1, 2, 6, 6)}),
    *_cases("maxpool-storage-order", (9, _NEWEST),
            [_n("MaxPool", ["x"], kernel_shape=[2, 2], storage_order=1)], {"x": _f(1, 2, 4, 4)}),
    *_cases("maxpool-same", (9, _NEWEST), [_n("MaxPool", ["x"], auto_pad="SAME_UPPER", **_POOL)],
            {"x": _f(1, 2, 7, 7)}),
    *[case for cip in (0, 1) for case in (
        *_cases(f"avgpool-pads-cip{cip}", (9, 11, 19, _NEWEST),
                [_n("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                    count_include_pad=cip)], {"x": _f(1, 2, 5, 5)}),
        *_cases(f"avgpool-asymmetric-cip{cip}", (9, 11, _NEWEST),
                [_n("AveragePool", ["x"], pads=[0, 0, 1, 1], count_include_pad=cip, **_POOL)],
                {"x": _f(1, 2, 6, 6)}),
        *_cases(f"avgpool-ceil-cip{cip}", (10, 11, 19, _NEWEST),
                [_n("AveragePool", ["x"], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=cip,
                    **_POOL)], {"x": _f(1, 2, 6, 6)}))],
    *_cases("convtranspose", (9, 11, _NEWEST),
            [_n("ConvTranspose", ["x", "w", "b"], strides=[2, 2], pads=[1, 1, 1, 1],
                output_padding=[1, 1])], {"x": _f(1, 4, 3, 3)}, {"w": _f(4, 2, 3, 3), "b": _f(2)}),
    *_cases("convtranspose-group-dilations", (11, _NEWEST),
            [_n("ConvTranspose", ["x", "w"], group=2, dilations=[2, 2], pads=[0, 1, 1, 0])],
            {"x": _f(1, 4, 3, 3)}, {"w": _f(4, 1, 3, 3)}),
    *_cases("convtranspose-output-shape", (11, _NEWEST),
            [_n("ConvTranspose", ["x", "w"], strides=[2, 2], output_shape=[6, 7])],
            {"x": _f(1, 4, 3, 3)}, {"w": _f(4, 1, 3, 3)}),
    *_cases("convtranspose-output-shape-past-full", (11, _NEWEST),
            [_n("ConvTranspose", ["x", "w", "b"], strides=[3, 2], output_shape=[10, 8])],
            {"x": _f(1, 1, 3, 3)}, {"w": _f(1, 2, 3, 3), "b": _f(2)}),
    *[case for pad in ("SAME_UPPER", "SAME_LOWER") for case in _cases(
        f"convtranspose-{pad}", (11, _NEWEST),
        [_n("ConvTranspose", ["x", "w"], strides=[2, 2], auto_pad=pad)],
        {"x": _f(1, 4, 3, 3)}, {"w": _f(4, 1, 3, 3)})],
    *_cases("dropout-inference", (12, 13, _NEWEST), [_n("Dropout", ["x", "r", "t"], ["y", "m"])],
            {"x": _f(2, 3)}, {"r": np.float32(0.3), "t": np.array(False)}, outputs=["y", "m"]),
    *_cases("dropout-training-ratio0", (12, _NEWEST), [_n("Dropout", ["x", "r", "t"])],
            {"x": _f(2, 3)}, {"r": np.float32(0.0), "t": np.array(True)}),
    *[case for start, end in ((1, None), (-2, None), (0, -1), (1, 3), (-10, 10))
      for case in _cases(f"shape-{start}-{end}", (15, 19, _NEWEST),
                         [_n("Shape", ["x"], start=start,
                             **({} if end is None else {"end": end}))], {"x": _f(2, 3, 4, 5)})],
    *_cases("batchnorm", (9, 14, 15, _NEWEST),
            [_n("BatchNormalization", ["x", "g", "b", "m", "v"], epsilon=1e-3)],
            {"x": _f(2, 3, 4, 5)}, _BN),
    *_cases("prelu-per-channel", (9, _NEWEST), [_n("PRelu", ["x", "s"])], {"x": _f(2, 3, 4, 5)},
            {"s": _f(3, 1, 1)}),
]


@pytest.mark.parametrize("case", CLASSIFIER_CASES, ids=lambda c: c.id)
def test_classifier_op_matches_onnxruntime_at_each_opset(case: OpCase) -> None:
    _assert_matches_ort(case.model(), case.feeds)


# --------------------------------------------------------------------------- op versions


def _lrn_spec(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """LRN exactly as the ONNX operator doc writes it (onnxruntime refuses even sizes, and
    onnx's reference implementation loops over the batch instead of the channels)."""
    squares = np.zeros_like(x, dtype=np.float64)
    channels = x.shape[1]
    for c in range(channels):
        low = max(0, c - (size - 1) // 2)
        high = min(channels - 1, c + int(np.ceil((size - 1) / 2)))
        squares[:, c] = (x[:, low : high + 1].astype(np.float64) ** 2).sum(axis=1)
    return x / (bias + alpha / size * squares) ** beta


def _graph_model(nodes: list, inputs: dict[str, np.ndarray], opset: int,
                 inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A model at ``opset``; initializers are also graph inputs (required before IR 4)."""
    inits = inits or {}
    values = {**inputs, **inits}
    graph = onnx.helper.make_graph(
        nodes, "g",
        [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                            v.shape) for k, v in values.items()],
        [onnx.helper.make_empty_tensor_value_info("y")],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset < 7 else 7
    return model


def _run(model: onnx.ModelProto, *inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return onnx_to_torch(model)(*map(torch.from_numpy, inputs)).numpy()


@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap"])
def test_pad_modes_copy_the_elements_numpy_pad_copies_also_past_one_period(mode: str) -> None:
    from retrofit.onnx_path.to_torch.padding import _pad_source_index

    for size in range(2 if mode == "reflect" else 1, 6):
        for before in range(0, 9):
            for after in range(0, 9):
                expected = np.pad(np.arange(size), (before, after), mode)  # same mode names
                index = _pad_source_index(size, before, after, mode).numpy()
                np.testing.assert_array_equal(index, expected, f"{size} {before} {after}")


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("shape", [(2, 7, 3, 3), (2, 7, 4), (1, 7, 2, 2, 2)])
def test_lrn_sums_the_channel_window_the_onnx_spec_defines(size: int, shape: tuple) -> None:
    x = (_f(*shape) * 4).astype(np.float32)
    model = _graph_model([_n("LRN", ["x"], size=size, alpha=0.3, beta=0.7, bias=1.2)],
                         {"x": x}, 13)
    np.testing.assert_allclose(_run(model, x), _lrn_spec(x, size, 0.3, 0.7, 1.2), rtol=1e-5)


def test_lrn_graph_trains_every_initializer_and_writes_back() -> None:
    """An AlexNet-style block (Conv, Relu, LRN, pool, Gemm): gradients reach every float
    initializer through LRN, and the trained values written back run in onnxruntime as the
    module computes them."""
    import onnxruntime as ort

    from retrofit.onnx_path.to_torch.weights import torch_name, write_back_initializers

    inits = {"w": _f(4, 3, 3, 3), "cb": _f(4), "fw": _f(5, 4 * 4 * 4), "fb": _f(5)}
    model = _graph_model([
        _n("Conv", ["x", "w", "cb"], ["c"], pads=[1, 1, 1, 1]), _n("Relu", ["c"], ["r"]),
        _n("LRN", ["r"], ["l"], size=5, alpha=1e-2),
        _n("MaxPool", ["l"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        _n("Flatten", ["p"], ["f"]), _n("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
    ], {"x": _f(2, 3, 8, 8)}, 13, inits)
    module = onnx_to_torch(model)
    x = torch.from_numpy(_f(2, 3, 8, 8))
    module(x).square().mean().backward()
    params = dict(module.named_parameters())
    assert set(params) == {torch_name(name) for name in inits}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    optimizer.step()
    trained = write_back_initializers(model, module.state_dict())
    assert [n.SerializeToString() for n in trained.graph.node] == [
        n.SerializeToString() for n in model.graph.node]
    for name in inits:
        stored = numpy_helper.to_array(next(i for i in trained.graph.initializer if i.name == name))
        np.testing.assert_array_equal(stored, params[torch_name(name)].detach().numpy())
    session = ort.InferenceSession(trained.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), expected, rtol=1e-4, atol=1e-5)


_C = np.arange(1, 4, dtype=np.float32)


def test_opset6_broadcast_axis_lines_b_up_with_a_from_axis() -> None:
    x = _f(2, 3, 4, 5)
    for op, fn in (("Add", np.add), ("Sub", np.subtract), ("Mul", np.multiply),
                   ("Div", np.divide)):
        model = _graph_model([_n(op, ["x", "b"], broadcast=1, axis=1)], {"x": x}, 6, {"b": _C})
        np.testing.assert_allclose(_run(model, x), fn(x, _C.reshape(3, 1, 1)), rtol=1e-6)
    suffix = _graph_model([_n("Add", ["x", "b"], broadcast=1)], {"x": x}, 6, {"b": _f(5)})
    bias = numpy_helper.to_array(suffix.graph.initializer[0])
    np.testing.assert_allclose(_run(suffix, x), x + bias)


def test_prelu_before_version_7_has_one_slope_per_channel() -> None:
    x = _f(2, 3, 4, 5)
    model = _graph_model([_n("PRelu", ["x", "s"])], {"x": x}, 6, {"s": _C})
    np.testing.assert_allclose(_run(model, x), np.where(x < 0, x * _C.reshape(3, 1, 1), x))


def test_reshape_1_concat_1_cast_1_and_pad_1_use_their_attribute_forms() -> None:
    x = _f(2, 3, 4)
    reshape = _graph_model([_n("Reshape", ["x"], shape=[0, -1])], {"x": x}, 1)
    np.testing.assert_array_equal(_run(reshape, x), x.reshape(2, 12))
    concat = _graph_model([_n("Concat", ["x", "x"])], {"x": x}, 1)  # axis defaults to 1
    np.testing.assert_array_equal(_run(concat, x), np.concatenate([x, x], axis=1))
    cast = _graph_model([_n("Cast", ["x"], to="INT32")], {"x": x * 3}, 1)
    np.testing.assert_array_equal(_run(cast, x * 3), (x * 3).astype(np.int32))
    pad = _graph_model([_n("Pad", ["x"], paddings=[0, 1, 0, 0, 2, 1], value=2.0)], {"x": x}, 1)
    expected = np.pad(x, [(0, 0), (1, 2), (0, 1)], constant_values=2.0)
    np.testing.assert_array_equal(_run(pad, x), expected)


@pytest.mark.parametrize("model, feature", [
    (_graph_model([_n("BatchNormalization", ["x", "g", "b", "m", "v"], spatial=0)],
                  {"x": _f(2, 3, 4, 5)}, 7, _BN), "BatchNormalization with spatial=0"),
    (_graph_model([_n("Dropout", ["x", "r", "t"])], {"x": _f(2, 3)}, 13,
                  {"r": np.float32(0.5), "t": np.array(True)}), "Dropout with training_mode=1"),
    (_graph_model([_n("Add", ["x", "x"])], {"x": np.zeros(3, np.uint32)}, 13), "type UINT32"),
])
def test_features_that_cannot_be_computed_exactly_are_refused_by_op_and_feature(
    model: onnx.ModelProto, feature: str
) -> None:
    with pytest.raises(UnsupportedModelError, match=feature) as error:
        onnx_to_torch(model)
    assert "\n" not in str(error.value)
