"""retrofit.onnx_path.to_torch.builder: an ONNX graph runs as a trainable fx module.

Every parity check compares against onnxruntime, the engine the exported model ships with.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from retrofit.errors import UnsupportedModelError
from retrofit.onnx_path.to_torch.builder import onnx_to_torch
from retrofit.onnx_path.to_torch.weights import initializer_torch_names
from retrofit.sites import unique_site_names

# The TorchScript-based exporter's newest opset (20 with torch 2.13). nn.MultiheadAttention
# exports through scaled_dot_product_attention, which needs opset 14, so the transformer is
# checked at 14 instead of 9 and 13.
LEGACY_MAX_OPSET = getattr(
    torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20
)
CNN_OPSETS = (9, 13, 17, LEGACY_MAX_OPSET)
TRANSFORMER_OPSETS = (14, 17, LEGACY_MAX_OPSET)


def _assert_close(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-5) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.dtype == bool or np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected)
        return
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    actual, expected = np.nan_to_num(actual), np.nan_to_num(expected)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    assert np.abs(actual.astype(np.float64) - expected).max(initial=0.0) <= tol * scale


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch(module: nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(v) for v in feeds.values()])
    outputs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outputs]


def _assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> nn.Module:
    module = onnx_to_torch(model)
    expected = _ort(model, feeds)
    actual = _torch(module, feeds)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        _assert_close(a, e)
    return module


# --------------------------------------------------------------------------- exported models


class SmallCNN(nn.Module):
    """Conv, BatchNorm (trained statistics), ReLU, MaxPool, a grouped conv with a residual add,
    global average pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():  # statistics of a trained model, not the 0/1 defaults
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(F.relu(self.bn1(self.conv1(x))))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _transformer(activation: str) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.1, activation=activation, batch_first=True
    )
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


_EXAMPLES = {
    "cnn": (SmallCNN, (2, 3, 8, 8)),
    "mlp": (_mlp, (4, 6)),
    "transformer-relu": (lambda: _transformer("relu"), (2, 5, 16)),
    "transformer-gelu": (lambda: _transformer("gelu"), (2, 5, 16)),
}
_EXPORT_CACHE: dict[tuple[str, int], onnx.ModelProto] = {}


def exported(name: str, opset: int) -> onnx.ModelProto:
    """``name`` exported by the TorchScript exporter at ``opset`` with a dynamic batch.

    The CNN keeps its BatchNormalization nodes (no constant folding into the convolutions).
    """
    key = (name, opset)
    if key not in _EXPORT_CACHE:
        factory, shape = _EXAMPLES[name]
        torch.manual_seed(sum(map(ord, name)))
        model = factory().eval()
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.randn(*shape),),
                buffer,
                opset_version=opset,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                do_constant_folding=name != "cnn",
            )
        _EXPORT_CACHE[key] = onnx.load_from_string(buffer.getvalue())
    copy = onnx.ModelProto()
    copy.CopyFrom(_EXPORT_CACHE[key])
    return copy


def _input(name: str, batch: int = 3, seed: int = 0) -> np.ndarray:
    shape = (batch, *_EXAMPLES[name][1][1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


EXPORT_CASES = [
    *[("cnn", o) for o in CNN_OPSETS],
    *[("mlp", o) for o in CNN_OPSETS],
    *[("transformer-relu", o) for o in TRANSFORMER_OPSETS],
    *[("transformer-gelu", o) for o in TRANSFORMER_OPSETS],
]


@pytest.mark.parametrize(("name", "opset"), EXPORT_CASES, ids=lambda v: str(v))
def test_exported_model_matches_onnxruntime(name: str, opset: int) -> None:
    model = exported(name, opset)
    # A batch size other than the one exported: shape arithmetic must stay symbolic.
    _assert_matches_ort(model, {"x": _input(name, batch=3)})


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer-relu", "transformer-gelu"])
def test_module_survives_fx_retrace_and_torch_export_with_dynamic_batch(name: str) -> None:
    opset = 17
    model = exported(name, opset)
    module = onnx_to_torch(model)
    x = torch.from_numpy(_input(name, batch=3))
    expected = _ort(model, {"x": _input(name, batch=4, seed=1)})[0]

    retraced = torch.fx.symbolic_trace(module)
    with torch.no_grad():
        _assert_close(retraced(x).numpy(), module(x).numpy(), tol=0)

    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        other_batch = program.module()(torch.from_numpy(_input(name, batch=4, seed=1)))
    _assert_close(other_batch.numpy(), expected)


def test_tensors_the_module_creates_follow_it_to_another_device() -> None:
    # The meta device stands in for a GPU: a tensor made on the CPU (shape arithmetic turned
    # into a tensor, ConstantOfShape, Range) would not match the moved parameters.
    for name in ("cnn", "transformer-relu"):
        module = onnx_to_torch(exported(name, 17)).to("meta")
        assert module(torch.empty(_input(name).shape, device="meta")).device.type == "meta"
    for case in OP_CASES:
        module = onnx_to_torch(case.model()).to("meta")
        module(*[torch.from_numpy(v).to("meta") for v in case.feeds.values()])


def test_float_initializers_are_parameters_and_statistics_are_buffers() -> None:
    model = exported("cnn", 13)
    module = onnx_to_torch(model)
    names = initializer_torch_names(model)
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    for init in model.graph.initializer:
        attr = names[init.name]
        if "running" in init.name:
            assert attr in buffers and attr not in params
        else:
            assert params[attr].requires_grad
    assert set(module.state_dict()) == set(names.values())  # constants are not state


def test_batchnorm_statistics_shared_with_trainable_initializers_train_and_export() -> None:
    # The exporter stores equal tensors once: a fresh BatchNorm's running mean *is* its bias.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"scale": np.ones(3, np.float32), "shift": np.zeros(3, np.float32)}.items()]
    node = helper.make_node("BatchNormalization", ["x", "scale", "shift", "shift", "scale"], ["y"])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 15)])
    feeds = {"x": _f(2, 3, 4, 4)}
    module = _assert_matches_ort(model, feeds)
    assert {name for name, _ in module.named_parameters()} == {"onnx_scale", "onnx_shift"}
    module(torch.from_numpy(feeds["x"])).square().sum().backward()
    assert all(p.grad is not None for p in module.parameters())
    torch.export.export(module, (torch.from_numpy(feeds["x"]),))


def test_placeholders_are_the_non_initializer_inputs_and_outputs_keep_graph_order() -> None:
    # IR < 4 style: the initializer "w" is also listed as a graph input (a default value).
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in "xwz"]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("p", "q")]
    nodes = [_n("Mul", ["x", "w"], ["p"]), _n("Sub", ["z", "x"], ["q"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs,
                          initializer=[numpy_helper.from_array(_f(2, 3), "w")]),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    module = onnx_to_torch(model)
    placeholders = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "z"]
    x, z = torch.randn(2, 3), torch.randn(2, 3)
    p, q = module(x, z)
    torch.testing.assert_close(q, z - x)
    single = onnx_to_torch(exported("mlp", 13))(torch.randn(2, 6))
    assert isinstance(single, torch.Tensor)


# --------------------------------------------------------------------------- ReLU sites


def test_relu_nodes_are_torch_relu_with_the_onnx_site_names() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="act"),
        helper.make_node("Neg", ["a"], ["b"]),
        helper.make_node("Relu", ["b"], ["c"], name="act"),  # a duplicate name
        helper.make_node("Relu", ["c"], ["y"]),  # no name: the output names it
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)]
    )
    module = onnx_to_torch(model)  # onnxruntime refuses duplicate node names; numpy checks
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    expected = np.maximum(-np.maximum(x, 0), 0)
    _assert_close(_torch(module, {"x": x})[0], expected)
    relus = [n for n in module.graph.nodes if n.op == "call_function" and n.target is torch.relu]
    assert [n.meta["site_name"] for n in relus] == ["act#1", "act#2", "y"]
    assert [n.meta["site_name"] for n in relus] == unique_site_names(["act", "act", "y"])


@pytest.mark.parametrize("name", ["cnn", "transformer-relu"])
def test_every_exported_relu_is_one_site_in_graph_order(name: str) -> None:
    model = exported(name, 17)
    module = onnx_to_torch(model)
    expected = unique_site_names(
        [n.name or n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    )
    relus = [n for n in module.graph.nodes if n.op == "call_function" and n.target is torch.relu]
    assert [n.meta["site_name"] for n in relus] == expected
    assert len(expected) >= 2


# --------------------------------------------------------------------------- unsupported


def test_unsupported_ops_are_all_named_in_one_error_and_the_model_is_unchanged() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("NonMaxSuppression", ["a"], ["b"]),
        helper.make_node("Loop", ["b"], ["c"]),
        helper.make_node("FusedConv", ["c"], ["d"], domain="com.microsoft"),
        helper.make_node("NonMaxSuppression", ["d"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    before = model.SerializeToString()
    with pytest.raises(UnsupportedModelError) as error:
        onnx_to_torch(model)
    message = str(error.value)
    assert message.startswith("cannot fine-tune this ONNX model: unsupported ops")
    for op in ("Loop", "NonMaxSuppression", "com.microsoft.FusedConv"):
        assert op in message
    assert message.count("NonMaxSuppression") == 1 and "\n" not in message
    assert model.SerializeToString() == before


def test_an_unsupported_op_feature_is_an_unsupported_model() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y], initializer=[scales]),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    with pytest.raises(UnsupportedModelError, match="Resize"):
        onnx_to_torch(model)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_a_convolution_torch_has_no_function_for_is_refused_by_its_op_name(op: str) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1, 1, 1), np.float32), "w")
    model = helper.make_model(
        helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "g", [x], [y],
                          initializer=[w]),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    with pytest.raises(UnsupportedModelError, match=f"{op} with 4 spatial dimensions"):
        onnx_to_torch(model)


# --------------------------------------------------------------------------- op coverage

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.bool_): TensorProto.BOOL,
}


@dataclass
class OpCase:
    """A hand-built graph: ``nodes`` over ``feeds`` (graph inputs) and ``inits``."""

    id: str
    opset: int
    nodes: list[onnx.NodeProto]
    feeds: dict[str, np.ndarray]
    outputs: list[str] = field(default_factory=lambda: ["y"])
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # where inference can't

    def model(self) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", self.opset)]
        graph = helper.make_graph(
            self.nodes,
            self.id,
            [
                helper.make_tensor_value_info(k, _NP_TO_ONNX[v.dtype], v.shape)
                for k, v in self.feeds.items()
            ],
            [helper.make_empty_tensor_value_info(o) for o in self.outputs],
            initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in self.inits.items()],
        )
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = helper.find_min_ir_version_for(opsets)
        # Typed outputs for the checker; intermediate value_info is left for the converter.
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
        for output in model.graph.output:
            output.CopyFrom(inferred[output.name])
            if output.name in self.out_shapes:
                dims = output.type.tensor_type.shape.dim
                del dims[:]
                for size in self.out_shapes[output.name]:
                    dims.add().dim_value = size
        onnx.checker.check_model(model)
        return model


_rng = np.random.default_rng(1234)


def _f(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape).astype(np.float32)


def _i(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _n(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs or ["y"], **attrs)


def _single(op: str, opset: int = 13, positive: bool = False, **attrs) -> OpCase:
    x = _f(2, 3, 4)
    label = "".join(f"-{k}={v}" for k, v in attrs.items())
    return OpCase(f"{op}{label}-{opset}", opset, [_n(op, ["x"], **attrs)],
                  {"x": np.abs(x) + 0.1 if positive else x})


_INT64_MAX = np.iinfo(np.int64).max

OP_CASES = [
    # ---- attribute vs input forms, before and after opset 13 (18 for most reductions)
    OpCase("squeeze-unsqueeze-attr-11", 11,
           [_n("Squeeze", ["x"], ["s"], axes=[1]), _n("Unsqueeze", ["s"], axes=[0, -1])],
           {"x": _f(2, 1, 3)}),
    OpCase("squeeze-unsqueeze-input-13", 13,
           [_n("Squeeze", ["x", "sa"], ["s"]), _n("Unsqueeze", ["s", "ua"])],
           {"x": _f(2, 1, 3)}, inits={"sa": _i(1), "ua": _i(0, 3)}),
    OpCase("squeeze-all-13", 13, [_n("Squeeze", ["x"])], {"x": _f(1, 3, 1)}),
    OpCase("reducesum-attr-11", 11, [_n("ReduceSum", ["x"], axes=[1], keepdims=0)],
           {"x": _f(2, 3, 4)}),
    OpCase("reducesum-input-13", 13, [_n("ReduceSum", ["x", "a"])], {"x": _f(2, 3, 4)},
           inits={"a": _i(-1, 0)}),
    OpCase("reducesum-all-13", 13, [_n("ReduceSum", ["x"], keepdims=0)], {"x": _f(2, 3)}),
    OpCase("reducesum-noop-13", 13, [_n("ReduceSum", ["x", "a"], noop_with_empty_axes=1)],
           {"x": _f(2, 3)}, inits={"a": np.zeros(0, np.int64)}),
    OpCase("reducemean-attr-13", 13, [_n("ReduceMean", ["x"], axes=[2])], {"x": _f(2, 3, 4)}),
    OpCase("reducemean-input-18", 18, [_n("ReduceMean", ["x", "a"], keepdims=0)],
           {"x": _f(2, 3, 4)}, inits={"a": _i(1)}),
    *[
        OpCase(f"{op}-13", 13, [_n(op, ["x"], axes=[1, 2])], {"x": _f(2, 3, 4)})
        for op in ("ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
                   "ReduceLogSumExp", "ReduceSumSquare")
    ],
    OpCase("reducemax-all-18", 18, [_n("ReduceMax", ["x"], keepdims=0)], {"x": _f(2, 3)}),
    OpCase("split-attr-11", 11, [_n("Split", ["x"], ["a", "b"], axis=1, split=[1, 3])],
           {"x": _f(2, 4)}, outputs=["a", "b"]),
    OpCase("split-input-13", 13, [_n("Split", ["x", "s"], ["a", "b"], axis=-1)],
           {"x": _f(2, 4)}, outputs=["a", "b"], inits={"s": _i(3, 1)}),
    OpCase("split-equal-13", 13, [_n("Split", ["x"], ["a", "b"], axis=0)], {"x": _f(4, 3)},
           outputs=["a", "b"]),
    OpCase("split-num-outputs-18", 18, [_n("Split", ["x"], ["a", "b", "c"], num_outputs=3)],
           {"x": _f(6, 2)}, outputs=["a", "b", "c"]),
    OpCase("slice-attr-9", 9, [_n("Slice", ["x"], starts=[1, 0], ends=[_INT64_MAX, -1],
                                  axes=[0, 2])], {"x": _f(3, 4, 5)}),
    OpCase("slice-input-13", 13, [_n("Slice", ["x", "s", "e", "a", "t"])], {"x": _f(3, 4, 5)},
           inits={"s": _i(0, -4), "e": _i(_INT64_MAX, -1), "a": _i(-1, 1), "t": _i(2, 1)}),
    OpCase("slice-negative-step-13", 13, [_n("Slice", ["x", "s", "e", "a", "t"])],
           {"x": _f(3, 6)}, inits={"s": _i(-1), "e": _i(-_INT64_MAX), "a": _i(1), "t": _i(-2)}),
    OpCase("clip-attr-9", 9, [_n("Clip", ["x"], min=-0.5, max=0.7)], {"x": _f(3, 4)}),
    OpCase("clip-input-13", 13, [_n("Clip", ["x", "lo", "hi"])], {"x": _f(3, 4)},
           inits={"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
    OpCase("clip-max-only-13", 13, [_n("Clip", ["x", "", "hi"])], {"x": _f(3, 4)},
           inits={"hi": np.float32(0.1)}),
    OpCase("clip-none-13", 13, [_n("Clip", ["x"])], {"x": _f(3, 4)}),
    OpCase("softmax-coerced-11", 11, [_n("Softmax", ["x"], axis=1)], {"x": _f(2, 3, 4)}),
    OpCase("softmax-default-11", 11, [_n("Softmax", ["x"])], {"x": _f(2, 3, 4)}),
    OpCase("logsoftmax-coerced-11", 11, [_n("LogSoftmax", ["x"], axis=-2)], {"x": _f(2, 3, 4)}),
    OpCase("softmax-axis-13", 13, [_n("Softmax", ["x"], axis=1)], {"x": _f(2, 3, 4)}),
    OpCase("logsoftmax-default-13", 13, [_n("LogSoftmax", ["x"])], {"x": _f(2, 3, 4)}),
    OpCase("pad-attr-9", 9, [_n("Pad", ["x"], pads=[0, 1, 2, 0, 2, 1], value=1.5)],
           {"x": _f(2, 3, 4)}),
    OpCase("pad-input-13", 13, [_n("Pad", ["x", "p", "v"])], {"x": _f(2, 3, 4)},
           inits={"p": _i(1, 0, 0, 0, 2, -1), "v": np.float32(-2.0)}),
    OpCase("pad-axes-18", 18, [_n("Pad", ["x", "p", "", "a"])], {"x": _f(2, 3, 4)},
           inits={"p": _i(1, 2, 3, 0), "a": _i(-2, 0)}),
    OpCase("pad-reflect-13", 13, [_n("Pad", ["x", "p"], mode="reflect")], {"x": _f(1, 2, 4, 5)},
           inits={"p": _i(0, 0, 1, 2, 0, 0, 2, 1)}),
    OpCase("pad-edge-13", 13, [_n("Pad", ["x", "p"], mode="edge")], {"x": _f(1, 2, 4, 5)},
           inits={"p": _i(0, 0, 1, 2, 0, 0, 2, 1)}),
    # ---- resizing
    OpCase("upsample-nearest-9", 9, [_n("Upsample", ["x", "s"], mode="nearest")],
           {"x": _f(1, 2, 3, 4)}, inits={"s": np.array([1, 1, 2, 3], np.float32)}),
    OpCase("resize-nearest-10", 10, [_n("Resize", ["x", "s"], mode="nearest")],
           {"x": _f(1, 2, 3, 4)}, inits={"s": np.array([1, 1, 2, 2], np.float32)}),
    OpCase("resize-nearest-asymmetric-13", 13,
           [_n("Resize", ["x", "", "s"], mode="nearest", nearest_mode="floor",
               coordinate_transformation_mode="asymmetric")],
           {"x": _f(1, 2, 3, 4)}, inits={"s": np.array([1, 1, 2, 3], np.float32)}),
    OpCase("resize-nearest-default-13", 13, [_n("Resize", ["x", "", "s"])],
           {"x": _f(1, 2, 3, 4)}, inits={"s": np.array([1, 1, 2, 2], np.float32)}),
    OpCase("resize-nearest-sizes-13", 13,
           [_n("Resize", ["x", "", "", "z"], nearest_mode="round_prefer_ceil")],
           {"x": _f(1, 2, 3, 4)}, inits={"z": _i(1, 2, 5, 7)}),
    OpCase("resize-linear-13", 13, [_n("Resize", ["x", "", "s"], mode="linear")],
           {"x": _f(1, 2, 3, 4)}, inits={"s": np.array([1, 1, 2, 2.5], np.float32)}),
    OpCase("resize-linear-align-13", 13,
           [_n("Resize", ["x", "", "", "z"], mode="linear",
               coordinate_transformation_mode="align_corners")],
           {"x": _f(1, 2, 3, 4)}, inits={"z": _i(1, 2, 6, 5)}),
    OpCase("resize-linear-axes-18", 18,
           [_n("Resize", ["x", "", "s"], mode="linear", axes=[2, 3])],
           {"x": _f(1, 2, 3, 4)}, inits={"s": np.array([2, 0.5], np.float32)}),
    # ---- convolution and pooling
    OpCase("conv-same-upper-stride2-13", 13,
           [_n("Conv", ["x", "w", "b"], auto_pad="SAME_UPPER", strides=[2, 2])],
           {"x": _f(1, 2, 7, 6)}, inits={"w": _f(4, 2, 3, 3), "b": _f(4)}),
    OpCase("conv-same-lower-13", 13, [_n("Conv", ["x", "w"], auto_pad="SAME_LOWER")],
           {"x": _f(1, 2, 5, 5)}, inits={"w": _f(3, 2, 2, 2)}),
    OpCase("conv-asymmetric-dilated-grouped-13", 13,
           [_n("Conv", ["x", "w"], pads=[1, 0, 2, 1], dilations=[2, 1], group=2)],
           {"x": _f(1, 4, 6, 6)}, inits={"w": _f(6, 2, 3, 2)}),
    OpCase("conv1d-valid-9", 9, [_n("Conv", ["x", "w", "b"], auto_pad="VALID", strides=[2])],
           {"x": _f(2, 3, 9)}, inits={"w": _f(4, 3, 3), "b": _f(4)}),
    OpCase("convtranspose-13", 13,
           [_n("ConvTranspose", ["x", "w", "b"], strides=[2, 2], pads=[1, 1, 1, 1],
               output_padding=[1, 1])],
           {"x": _f(1, 3, 4, 4)}, inits={"w": _f(3, 2, 3, 3), "b": _f(2)}),
    OpCase("convtranspose-asymmetric-grouped-13", 13,
           [_n("ConvTranspose", ["x", "w"], strides=[2, 1], pads=[0, 1, 1, 0], group=2)],
           {"x": _f(1, 4, 3, 3)}, inits={"w": _f(4, 1, 2, 3)}),
    OpCase("maxpool-ceil-pads-13", 13,
           [_n("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
               ceil_mode=1)], {"x": _f(1, 2, 8, 7)}),
    OpCase("maxpool-asymmetric-dilated-13", 13,
           [_n("MaxPool", ["x"], kernel_shape=[2, 2], pads=[0, 1, 1, 0], dilations=[2, 1])],
           {"x": _f(1, 2, 6, 5)}),
    OpCase("maxpool-same-upper-9", 9,
           [_n("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")],
           {"x": _f(1, 2, 7, 8)}),
    OpCase("avgpool-exclude-pad-13", 13,
           [_n("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
           {"x": _f(1, 2, 5, 6)}),
    OpCase("avgpool-include-pad-13", 13,
           [_n("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
               count_include_pad=1, strides=[2, 2])], {"x": _f(1, 2, 5, 6)}),
    OpCase("avgpool-ceil-13", 13,
           [_n("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
           {"x": _f(1, 2, 5, 5)}),
    OpCase("avgpool-asymmetric-exclude-13", 13,
           [_n("AveragePool", ["x"], kernel_shape=[2, 3], pads=[0, 2, 1, 0])],
           {"x": _f(1, 2, 5, 6)}),
    OpCase("avgpool-asymmetric-include-13", 13,
           [_n("AveragePool", ["x"], kernel_shape=[2, 3], pads=[0, 2, 1, 0],
               count_include_pad=1)], {"x": _f(1, 2, 5, 6)}),
    OpCase("global-pools-13", 13,
           [_n("GlobalAveragePool", ["x"], ["a"]), _n("GlobalMaxPool", ["x"], ["m"]),
            _n("Add", ["a", "m"])], {"x": _f(2, 3, 4, 5)}),
    # ---- linear algebra
    OpCase("gemm-linear-9", 9, [_n("Gemm", ["x", "w", "b"], transB=1)], {"x": _f(3, 4)},
           inits={"w": _f(5, 4), "b": _f(5)}),
    OpCase("gemm-alpha-beta-trans-13", 13,
           [_n("Gemm", ["x", "w", "c"], alpha=0.5, beta=2.0, transA=1)], {"x": _f(4, 3)},
           inits={"w": _f(4, 5), "c": _f(1, 5)}),
    OpCase("gemm-scalar-c-13", 13, [_n("Gemm", ["x", "w", "c"], transB=1)], {"x": _f(3, 4)},
           inits={"w": _f(2, 4), "c": np.float32(0.3)}),
    OpCase("gemm-no-c-13", 13, [_n("Gemm", ["x", "w"], alpha=2.0)], {"x": _f(3, 4)},
           inits={"w": _f(4, 2)}),
    OpCase("matmul-batched-13", 13, [_n("MatMul", ["x", "w"], ["a"]), _n("MatMul", ["a", "v"])],
           {"x": _f(2, 3, 4, 5)}, inits={"w": _f(5, 6), "v": _f(3, 6, 2)}),
    OpCase("einsum-13", 13, [_n("Einsum", ["x", "w"], equation="bij,jk->bik")],
           {"x": _f(2, 3, 4)}, inits={"w": _f(4, 5)}),
    # ---- normalization
    OpCase("batchnorm-9", 9, [_n("BatchNormalization", ["x", "s", "b", "m", "v"],
                                 epsilon=1e-3)],
           {"x": _f(2, 3, 4, 4)}, inits={"s": _f(3), "b": _f(3), "m": _f(3),
                                         "v": np.array([0.5, 1, 2], np.float32)}),
    OpCase("instancenorm-13", 13, [_n("InstanceNormalization", ["x", "s", "b"], epsilon=1e-4)],
           {"x": _f(2, 3, 4, 5)}, inits={"s": _f(3), "b": _f(3)}),
    OpCase("layernorm-17", 17, [_n("LayerNormalization", ["x", "s", "b"], axis=-2)],
           {"x": _f(2, 3, 4)}, inits={"s": _f(3, 4), "b": _f(3, 4)}),
    OpCase("layernorm-broadcast-scale-17", 17, [_n("LayerNormalization", ["x", "s"], axis=1)],
           {"x": _f(2, 3, 4)}, inits={"s": _f(1, 4)}),
    # ---- activations and elementwise
    *[_single(op) for op in ("Exp", "Neg", "Abs", "Reciprocal", "Erf", "Tanh", "Sigmoid",
                             "Floor", "Ceil", "Sign", "Softplus")],
    _single("Sqrt", positive=True),
    _single("Log", positive=True),
    _single("Sqrt", opset=9),  # negative inputs: NaN where onnxruntime has NaN
    _single("HardSwish", opset=14),
    _single("LeakyRelu", alpha=0.2),
    _single("HardSigmoid", alpha=0.3, beta=0.4),
    _single("Elu", alpha=0.7),
    _single("Selu"),
    _single("Gelu", opset=20),
    _single("Gelu", opset=20, approximate="tanh"),
    OpCase("prelu-13", 13, [_n("PRelu", ["x", "s"])], {"x": _f(2, 3, 4)},
           inits={"s": _f(3, 1)}),
    OpCase("arithmetic-13", 13,
           [_n("Add", ["x", "w"], ["a"]), _n("Sub", ["c", "a"], ["s"]),
            _n("Mul", ["s", "x"], ["m"]), _n("Div", ["m", "w"], ["d"]),
            _n("Pow", ["d", "two"], ["p"]), _n("Pow", ["x", "w"], ["q"]), _n("Add", ["p", "q"])],
           {"x": np.abs(_f(2, 3)) + 0.5}, inits={"w": np.abs(_f(3)) + 0.5,
                                                "c": np.float32(1.5), "two": np.float32(2.0)}),
    OpCase("variadic-13", 13,
           [_n("Max", ["x", "w", "v"], ["a"]), _n("Min", ["x", "w"], ["b"]),
            _n("Sum", ["a", "b", "x"], ["c"]), _n("Mean", ["a", "b", "c"], ["d"]),
            _n("Max", ["d"])], {"x": _f(2, 3)}, inits={"w": _f(3), "v": _f(2, 1)}),
    OpCase("logic-13", 13,
           [_n("Greater", ["x", "w"], ["g"]), _n("Less", ["x", "z"], ["l"]),
            _n("Equal", ["k", "kk"], ["e"]), _n("Not", ["l"], ["n"]), _n("And", ["g", "n"], ["a"]),
            _n("Or", ["a", "e"], ["o"]), _n("Where", ["o", "x", "z"])],
           {"x": _f(2, 3), "k": _i(1, 2, 3)}, inits={"w": _f(3), "z": np.float32(0.0),
                                                   "kk": _i(1, 0, 3)}),
    OpCase("integer-division-and-mod-13", 13,
           [_n("Div", ["k", "d"], ["q"]), _n("Mod", ["k", "d"], ["r"]),
            _n("Mod", ["k", "d"], ["f"], fmod=1), _n("Add", ["q", "r"], ["s"]),
            _n("Add", ["s", "f"])],
           {"k": _i(-7, 7, -8, 9)}, inits={"d": _i(2, -3, 3, 4)}),
    # ---- shapes and layout
    OpCase("shape-arithmetic-reshape-13", 13,
           [_n("Shape", ["x"], ["sh"]), _n("Gather", ["sh", "i0"], ["b"]),
            _n("Gather", ["sh", "i2"], ["w"]), _n("Div", ["w", "two"], ["h"]),
            _n("Mul", ["b", "two"], ["b2"]), _n("Unsqueeze", ["b2", "ax"], ["b2u"]),
            _n("Unsqueeze", ["h", "ax"], ["hu"]), _n("Concat", ["b2u", "m1", "hu"], ["t"], axis=0),
            _n("Reshape", ["x", "t"])],
           {"x": _f(2, 3, 4)}, inits={"i0": np.int64(0), "i2": np.int64(2), "two": np.int64(2),
                                      "ax": _i(0), "m1": _i(-1)}, out_shapes={"y": (4, 3, 2)}),
    OpCase("reshape-zero-and-allowzero-14", 14,
           [_n("Reshape", ["x", "t"], ["r"]), _n("Reshape", ["r", "u"], allowzero=1)],
           {"x": _f(2, 3, 4)}, inits={"t": _i(0, -1), "u": _i(4, 3, 2)}),
    OpCase("shape-start-end-15", 15,
           [_n("Shape", ["x"], ["s"], start=1, end=-1),
            _n("ConstantOfShape", ["s"], ["c"],
               value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
            _n("Expand", ["c", "e"])],
           {"x": _f(2, 3, 4)}, inits={"e": _i(2, 3, 1)}),
    OpCase("constant-of-shape-int-13", 13,
           [_n("Shape", ["x"], ["s"]),
            _n("ConstantOfShape", ["s"], ["c"],
               value=helper.make_tensor("v", TensorProto.INT64, [1], [3])),
            _n("Cast", ["c"], ["f"], to=TensorProto.FLOAT), _n("Mul", ["f", "x"])],
           {"x": _f(2, 3)}),
    OpCase("expand-tile-range-13", 13,
           [_n("Expand", ["x", "e"], ["a"]), _n("Tile", ["a", "r"], ["t"]),
            _n("Shape", ["t"], ["s"]), _n("Gather", ["s", "i"], ["n"]),
            _n("Range", ["zero", "n", "one"], ["rg"]), _n("Cast", ["rg"], ["rf"], to=1),
            _n("Add", ["t", "rf"])],
           {"x": _f(3, 1)}, inits={"e": _i(2, 1, 4), "r": _i(1, 2, 1), "i": np.int64(2),
                                   "zero": np.int64(0), "one": np.int64(1)}),
    OpCase("range-float-13", 13, [_n("Range", ["a", "b", "c"], ["r"]), _n("Add", ["r", "x"])],
           {"x": _f(4)}, inits={"a": np.float32(0.5), "b": np.float32(2.5),
                                "c": np.float32(0.5)}),
    OpCase("flatten-axes-13", 13,
           [_n("Flatten", ["x"], ["a"], axis=0), _n("Flatten", ["x"], ["b"], axis=2),
            _n("Flatten", ["x"], ["c"], axis=-1), _n("Flatten", ["x"], ["d"], axis=4)],
           {"x": _f(2, 3, 4, 5)}, outputs=["a", "b", "c", "d"]),
    OpCase("transpose-13", 13, [_n("Transpose", ["x"], ["t"]),
                                _n("Transpose", ["t"], perm=[2, 0, 1])], {"x": _f(2, 3, 4)}),
    OpCase("gather-13", 13,
           [_n("Gather", ["x", "i"], ["a"], axis=1), _n("Gather", ["x", "j"], ["b"], axis=-1),
            _n("Gather", ["w", "k"], ["c"])],
           {"x": _f(2, 3, 4), "k": _i(2, 0, 2)}, outputs=["a", "b", "c"],
           inits={"i": np.array([[0, 2], [-1, 1]], np.int64), "j": np.int64(-2), "w": _f(3, 5)}),
    OpCase("gather-elements-13", 13, [_n("GatherElements", ["x", "i"], axis=1)],
           {"x": _f(2, 3)}, inits={"i": np.array([[0, 2, 1, 1], [2, 2, 0, 1]], np.int64)}),
    OpCase("concat-cast-castlike-15", 15,
           [_n("Concat", ["x", "w"], ["c"], axis=-1), _n("Cast", ["c"], ["i"], to=7),
            _n("Cast", ["i"], ["f"], to=1), _n("CastLike", ["f", "x"], ["g"]),
            _n("Sub", ["c", "g"])],
           {"x": _f(2, 3) * 3}, inits={"w": _f(2, 2) * 3}, out_shapes={"y": (2, 5)}),
    OpCase("dropout-identity-constant-9", 9,
           [_n("Dropout", ["x"], ["d"], ratio=0.5), _n("Identity", ["d"], ["i"]),
            helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_f(3), "k")),
            _n("Add", ["i", "k"])], {"x": _f(2, 3)}),
    OpCase("dropout-constant-forms-13", 13,
           [_n("Dropout", ["x", "ratio"], ["d"]),
            helper.make_node("Constant", [], ["kf"], value_float=2.0),
            helper.make_node("Constant", [], ["ki"], value_ints=[1, 3]),
            _n("Mul", ["d", "kf"], ["m"]), _n("Reshape", ["m", "ki"])],
           {"x": _f(3)}, inits={"ratio": np.float32(0.3)}),
]


OP_CASES += [
    OpCase("rmsnorm-23", 23, [_n("RMSNormalization", ["x", "s"], axis=1, epsilon=1e-3)],
           {"x": _f(2, 3, 4)}, inits={"s": _f(3, 4)}),
    OpCase("rmsnorm-broadcast-23", 23, [_n("RMSNormalization", ["x", "s"])],
           {"x": _f(2, 3, 4)}, inits={"s": _f(1)}),
    _single("Swish", opset=24),
    _single("Swish", opset=24, alpha=0.5),
    _single("Mish", opset=22),
]


def _at_opset(case: OpCase, opset: int) -> OpCase:
    return OpCase(f"{case.id}@{opset}", opset, case.nodes, case.feeds, case.outputs, case.inits,
                  case.out_shapes)


# The same graphs under the newest opset onnx knows: the input forms are unchanged since
# opset 18 (attribute forms that opset 18 removed are left out).
_NEWEST = onnx.defs.onnx_opset_version()
_MOVED_TO_INPUTS_IN_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                          "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare"}
NEWEST_OPSET_CASES = [
    _at_opset(case, _NEWEST)
    for case in OP_CASES
    if case.opset >= 13
    and not any(n.op_type in _MOVED_TO_INPUTS_IN_18 and n.attribute for n in case.nodes)
    and not any(n.op_type == "Split" and len(n.input) == 1 and
                not any(a.name == "num_outputs" for a in n.attribute)
                for n in case.nodes)  # opset 18 requires split or num_outputs
    and not any(n.op_type == "Swish" for n in case.nodes)  # onnxruntime runs it at 24 only
]


@pytest.mark.parametrize("case", OP_CASES + NEWEST_OPSET_CASES, ids=lambda c: c.id)
def test_op_matches_onnxruntime(case: OpCase) -> None:
    _assert_matches_ort(case.model(), case.feeds)


def test_op_cases_cover_every_op_the_brief_lists() -> None:
    listed = """Conv ConvTranspose Gemm MatMul Add Sub Mul Div Pow Sqrt Exp Log Neg Abs Reciprocal
        Erf Tanh Sigmoid Softmax LogSoftmax Relu LeakyRelu Clip Gelu HardSigmoid HardSwish
        BatchNormalization InstanceNormalization LayerNormalization MaxPool AveragePool
        GlobalAveragePool GlobalMaxPool Flatten Reshape Transpose Concat Split Slice Gather
        Squeeze Unsqueeze Shape Constant ConstantOfShape Identity Dropout Cast Where Equal Expand
        ReduceMean ReduceSum ReduceMax Max Min Sum Mean Einsum Pad Resize Upsample Tile Range Not
        Less Greater And Or""".split()
    covered = {n.op_type for case in OP_CASES for n in case.nodes} | {"Relu"}
    assert sorted(set(listed) - covered) == []
