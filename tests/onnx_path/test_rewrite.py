"""The ONNX rewrite: sites found everywhere, exact math at every opset, nothing else moved."""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from retrofit.config import CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.errors import SelectionError, UnsupportedModelError, UsageError
from retrofit.onnx_path.emission import FUNCTION_DOMAIN, competition_axes
from retrofit.onnx_path.io import check_onnx_model, iter_nodes, make_onnx_inputs, run_onnx
from retrofit.onnx_path.rewrite import rewrite_onnx_relus
from retrofit.sites import SiteSelector

OPSETS = [9, 11, 13, 17, 21, 28]
MEASURES = ["energy", "l1", "count"]
F32 = TensorProto.FLOAT
F64 = TensorProto.DOUBLE


# --------------------------------------------------------------------------------------------
# Model builders


def _ir_for(opset: int) -> int:
    """The IR version onnx shipped with an opset (what an exporter of that time wrote)."""
    return min(ir for _, ir, op, *_ in helper.VERSION_TABLE if op == opset)


def _model(graph, opset, *, ir=None, functions=(), extra_opsets=()):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
        ir_version=ir or _ir_for(opset),
        functions=list(functions),
    )
    return model


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def mlp_model(opset):
    """Gemm -> Relu -> MatMul + Add -> Relu -> Gemm."""
    rng = _rng(1)
    inits = [
        _init("W1", rng.standard_normal((8, 16)).astype(np.float32)),
        _init("B1", rng.standard_normal(16).astype(np.float32)),
        _init("W2", rng.standard_normal((16, 16)).astype(np.float32)),
        _init("B2", rng.standard_normal(16).astype(np.float32)),
        _init("W3", rng.standard_normal((16, 4)).astype(np.float32)),
        _init("B3", np.zeros(4, np.float32)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "B2"], ["h2b"], name="fc2_bias"),
        helper.make_node("Relu", ["h2b"], ["a2"]),  # unnamed: the site is named by its output
        helper.make_node("Gemm", ["a2", "W3", "B3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "mlp", [_vi("x", ["N", 8])], [_vi("y", ["N", 4])], inits)
    return _model(graph, opset)


def cnn_model(opset):
    """Conv -> BatchNormalization -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm"""
    rng = _rng(2)
    inits = [
        _init("C1", (rng.standard_normal((6, 3, 3, 3)) * 0.5).astype(np.float32)),
        _init("scale", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
        _init("bias", rng.standard_normal(6).astype(np.float32)),
        _init("mean", rng.standard_normal(6).astype(np.float32) * 0.1),
        _init("var", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
        _init("C2", (rng.standard_normal((5, 6, 3, 3)) * 0.5).astype(np.float32)),
        _init("Wf", rng.standard_normal((5, 3)).astype(np.float32)),
        _init("Bf", np.zeros(3, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "C1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["b1"],
                         name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "C2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], name="fc"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "cnn", [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 3])], inits
    )
    return _model(graph, opset)


def sequence_model(opset):
    """[N, T, D] tokens -> MatMul + Add -> Relu -> MatMul: a transformer's feed-forward."""
    rng = _rng(3)
    inits = [
        _init("W1", rng.standard_normal((8, 12)).astype(np.float32)),
        _init("B1", rng.standard_normal(12).astype(np.float32)),
        _init("W2", rng.standard_normal((12, 8)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="ff1"),
        helper.make_node("Add", ["h", "B1"], ["hb"], name="ff1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="ff_relu"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="ff2"),
    ]
    graph = helper.make_graph(
        nodes, "ffn", [_vi("x", ["N", "T", 8])], [_vi("y", ["N", "T", 8])], inits
    )
    return _model(graph, opset)


def if_model(opset):
    """A Relu in the main graph and one in each branch of an If."""
    rng = _rng(4)
    inits = [
        _init("W", rng.standard_normal((4, 6)).astype(np.float32)),
        _init("zero", np.array(0.0, np.float32)),
    ]
    then_branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["a", "W"], ["t1"], name="then_mm"),
            helper.make_node("Relu", ["t1"], ["t2"], name="then_relu"),
        ],
        "then", [], [_vi("t2", ["N", 6])],
    )  # fmt: skip
    else_branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["a", "W"], ["e1"], name="else_mm"),
            helper.make_node("Neg", ["e1"], ["e2"], name="else_neg"),
            helper.make_node("Relu", ["e2"], ["e3"], name="else_relu"),
        ],
        "else", [], [_vi("e3", ["N", 6])],
    )  # fmt: skip
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu_in"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="total", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], name="branch",
                         then_branch=then_branch, else_branch=else_branch),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, "iff", [_vi("x", ["N", 4])], [_vi("y", ["N", 6])], inits)
    return _model(graph, opset)


def loop_model(opset):
    """A Loop whose body applies MatMul + Relu three times."""
    rng = _rng(5)
    inits = [
        _init("W", (rng.standard_normal((4, 4)) * 0.7).astype(np.float32)),
        _init("trips", np.array(3, np.int64)),
        _init("go", np.array(True)),
    ]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("MatMul", ["state", "W"], ["mm"], name="body_mm"),
            helper.make_node("Relu", ["mm"], ["state_out"], name="body_relu"),
        ],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL),
         _vi("state", ["N", 4])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("state_out", ["N", 4])],
    )  # fmt: skip
    nodes = [helper.make_node("Loop", ["trips", "go", "x"], ["y"], name="repeat", body=body)]
    graph = helper.make_graph(nodes, "loop", [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], inits)
    return _model(graph, opset)


def function_model(opset, *, nested=False):
    """A model-local function ``Block(x, w) = Relu(MatMul(x, w))`` called twice.

    ``nested=True`` puts the Relu one level deeper: ``Outer`` calls ``Block``.
    """
    rng = _rng(6)
    block = helper.make_function(
        "local", "Block", ["x", "w"], ["y"],
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="act"),
        ],
        opset_imports=[helper.make_opsetid("", opset)],
    )  # fmt: skip
    functions = [block]
    called = "Block"
    if nested:
        outer = helper.make_function(
            "local", "Outer", ["x", "w"], ["y"],
            [
                helper.make_node("Neg", ["x"], ["n"], name="neg"),
                helper.make_node("Block", ["n", "w"], ["y"], name="inner", domain="local"),
            ],
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("local", 1)],
        )  # fmt: skip
        functions.append(outer)
        called = "Outer"
    inits = [
        _init("W1", rng.standard_normal((4, 6)).astype(np.float32)),
        _init("W2", rng.standard_normal((6, 6)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node(called, ["x", "W1"], ["h1"], name="block1", domain="local"),
        helper.make_node(called, ["h1", "W2"], ["y"], name="block2", domain="local"),
    ]
    graph = helper.make_graph(nodes, "fn", [_vi("x", ["N", 4])], [_vi("y", ["N", 6])], inits)
    return _model(graph, opset, ir=max(8, _ir_for(opset)), functions=functions,
                  extra_opsets=[helper.make_opsetid("local", 1)])  # fmt: skip


def chain_model(count, opset=17, width=8):
    """``count`` Add -> Relu pairs in a row (performance)."""
    nodes, inits = [], [_init("b", np.full(width, 0.1, np.float32))]
    value = "x"
    for k in range(count):
        nodes.append(helper.make_node("Add", [value, "b"], [f"s{k}"], name=f"add{k}"))
        nodes.append(helper.make_node("Relu", [f"s{k}"], [f"r{k}"], name=f"relu{k}"))
        value = f"r{k}"
    nodes.append(helper.make_node("Identity", [value], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "chain", [_vi("x", ["N", width])], [_vi("y", ["N", width])], inits
    )
    return _model(graph, opset)


def unknown_rank_model(opset=17):
    """``Relu`` of ``Reshape(x, s)`` with ``s`` a runtime input: inference cannot know the rank
    at the site (a graph input itself must declare its rank)."""
    nodes = [
        helper.make_node("Reshape", ["x", "s"], ["r"], name="reshape"),
        helper.make_node("Relu", ["r"], ["a"], name="act"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Reshape", ["a", "shape"], ["y"], name="back"),
    ]
    graph = helper.make_graph(
        nodes, "unknown_rank",
        [_vi("x", ["N", "D"]), _vi("s", ["K"], TensorProto.INT64)], [_vi("y", ["N", "D"])],
    )  # fmt: skip
    return _model(graph, opset)


def run_unknown_rank(model, x):
    """Feed ``x`` reshaped to [N, rest]: the site sees ``x`` with its own shape and rank."""
    flat = x.reshape(x.shape[0], -1)
    (y,) = run_onnx(model, {"x": flat, "s": np.array(x.shape, np.int64)})
    return y.reshape(x.shape)


def single_relu_model(shape, elem=F32, opset=17):
    """``y = Relu(x)``: the site sees exactly the model input (for references)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="act")],
        "single", [_vi("x", shape, elem)], [_vi("y", shape, elem)],
    )  # fmt: skip
    return _model(graph, opset)


BUILDERS = {
    "mlp": mlp_model,
    "cnn": cnn_model,
    "sequence": sequence_model,
    "if": if_model,
    "function": function_model,
}
SHAPES = {"sequence": {"x": (2, 5, 8)}}


def _torch_models():
    torch = pytest.importorskip("torch")
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.relu(self.bn(self.conv1(x)))
            x = torch.relu(self.conv2(x))
            return self.fc(x.mean((2, 3))).relu()

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.layer(x, is_causal=False)

    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        cnn.bn.running_mean.uniform_(-0.5, 0.5)
        cnn.bn.running_var.uniform_(0.5, 1.5)
    return [
        ("torch_cnn_opset9", cnn, torch.randn(2, 3, 10, 10), 9, {0: "batch"}),
        ("torch_cnn_opset17", cnn, torch.randn(2, 3, 10, 10), 17, {0: "batch"}),
        ("torch_encoder", Encoder().eval(), torch.randn(2, 5, 16), 17, {0: "batch", 1: "seq"}),
    ]


_EXPORTED: dict[str, onnx.ModelProto] = {}


def exported(name):
    """A torch model exported with the legacy (TorchScript) exporter, cached per session."""
    if not _EXPORTED:
        import torch

        for label, module, example, opset, axes in _torch_models():
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, (example,), buffer, dynamo=False, opset_version=opset,
                    input_names=["x"], output_names=["y"], dynamic_axes={"x": axes},
                )  # fmt: skip
            _EXPORTED[label] = onnx.load_from_string(buffer.getvalue())
    return _EXPORTED[name]


# --------------------------------------------------------------------------------------------
# References


def carelu_reference(z, alpha, beta, *, measure="energy", k=2.0, eps=1e-6, axes=None):
    """activations.md's CAReLU in float64, written the paper's (naive) way."""
    z = np.asarray(z, np.float64)
    if measure == "energy":
        positive = (np.maximum(z, 0) ** 2).sum(axes, keepdims=True)
        p = positive / ((z**2).sum(axes, keepdims=True) + eps)
    elif measure == "l1":
        p = np.maximum(z, 0).sum(axes, keepdims=True) / (np.abs(z).sum(axes, keepdims=True) + eps)
    else:
        p = (z > 0).mean(axes, keepdims=True)
    s = k * np.tanh(alpha * p + beta)
    return np.maximum(s * z, 0)


def mrepu_reference(x, *, p=2.0, c=1.0, blend=1.0, gain_in=1.0, gain_out=1.0, dtype=None):
    """``(1 - blend) * max(x, 0) + blend * gain_out * MRePU(gain_in * x)`` in float64. With
    ``dtype``, as a graph computing in that type saturates: the MRePU term at its largest
    value before the gain scales it, the gained term overflowing to inf where it would."""
    x = np.asarray(x, np.float64)
    ax = gain_in * x
    with np.errstate(over="ignore"):
        mrepu = ax * np.maximum(0, ax + c) ** p
        if dtype is None:
            return (1 - blend) * np.maximum(x, 0) + blend * gain_out * mrepu
        big = float(np.finfo(dtype).max)
        gained = (gain_out * np.clip(mrepu, -big, big)).astype(dtype).astype(np.float64)
    return (1 - blend) * np.maximum(x, 0) + blend * gained


def assert_close_to_scale(actual, expected, tolerance=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max()), 1e-12)
    assert float(np.abs(actual - expected).max()) / scale <= tolerance


def relu_ops_left(model):
    return [node for node in iter_nodes(model) if node.op_type == "Relu"]


def rewrite_and_check(model, config, **kwargs):
    before = model.SerializeToString()
    result = rewrite_onnx_relus(model, config, **kwargs)
    assert model.SerializeToString() == before, "the input model was modified"
    check_onnx_model(result.model)
    return result


# --------------------------------------------------------------------------------------------
# Identity at init: every model kind, opset and measure


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_identity_retrofit_reproduces_the_model_for_every_opset_and_measure(kind, opset):
    model = BUILDERS[kind](opset)
    check_onnx_model(model, is_input=True)
    inputs = make_onnx_inputs(model, SHAPES.get(kind), seed=opset)
    expected = run_onnx(model, inputs)
    for measure in MEASURES:
        result = rewrite_and_check(model, CompetitiveReLUConfig(measure=measure))
        assert result.sites and all(site.replaced for site in result.sites)
        assert not relu_ops_left(result.model)
        for got, want in zip(run_onnx(result.model, inputs), expected):
            assert_close_to_scale(got, want)


@pytest.mark.parametrize("opset", [9, 13, 28])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_identity_retrofit_as_functions_runs_and_matches(kind, opset):
    model = BUILDERS[kind](opset)
    inputs = make_onnx_inputs(model, SHAPES.get(kind))
    expected = run_onnx(model, inputs)
    result = rewrite_and_check(model, CompetitiveReLUConfig(), as_functions=True)
    assert any(f.domain == FUNCTION_DOMAIN for f in result.model.functions)
    assert not relu_ops_left(result.model)
    for got, want in zip(run_onnx(result.model, inputs), expected):
        assert_close_to_scale(got, want)


@pytest.mark.parametrize("name", ["torch_cnn_opset9", "torch_cnn_opset17", "torch_encoder"])
def test_identity_retrofit_of_torch_exports_reproduces_them(name):
    model = exported(name)
    shapes = {"x": (2, 5, 16)} if name == "torch_encoder" else {"x": (3, 3, 10, 10)}
    inputs = make_onnx_inputs(model, shapes)
    expected = run_onnx(model, inputs)
    for measure in MEASURES:
        for as_functions in (False, True):
            result = rewrite_and_check(
                model, CompetitiveReLUConfig(measure=measure), as_functions=as_functions
            )
            assert len(result.replaced) == len(result.sites) >= 1
            for got, want in zip(run_onnx(result.model, inputs), expected):
                assert_close_to_scale(got, want)


# --------------------------------------------------------------------------------------------
# The math against independent references


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize(
    "shape, reduce, axes",
    [
        ((3, 5), "auto", (1,)),
        ((3, 4, 6), "auto", (2,)),
        ((2, 3, 4, 5), "auto", (1, 2, 3)),
        ((2, 3, 4, 5), "sample", (1, 2, 3)),
        ((2, 3, 4, 5), "channel", (2, 3)),
        ((2, 3, 4, 5), "last", (3,)),
        ((3, 4, 6), "sample", (1, 2)),
        ((4, 6), "channel", (1,)),  # no spatial axes: falls back to the sample, as in torch
        ((7,), "sample", None),
    ],
)
def test_competitive_relu_matches_float64_reference(measure, shape, reduce, axes):
    model = single_relu_model(list(shape), F64)
    values = {"act": {"alpha": 1.7, "beta": -0.4}}
    config = CompetitiveReLUConfig(measure=measure, reduce=reduce)
    result = rewrite_and_check(model, config, site_values=values)
    x = _rng(7).standard_normal(shape)
    x.flat[0] = 0.0  # an exact zero counts as neither side
    (got,) = run_onnx(result.model, {"x": x})
    want = carelu_reference(x, 1.7, -0.4, measure=measure, axes=axes)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("opset", [9, 13, 18])
def test_competitive_relu_float32_matches_reference_including_negative_scale(measure, opset):
    model = single_relu_model([4, 3, 5, 5], F32, opset)
    x = _rng(8).standard_normal((4, 3, 5, 5)).astype(np.float32)
    x[1] *= -1.0  # mostly negative sample: different p
    for alpha, beta in [(2.0, 0.1), (0.5, -1.2)]:  # s > 0, s < 0 (the negative side passes)
        result = rewrite_and_check(
            model, CompetitiveReLUConfig(measure=measure),
            site_values={"act": {"alpha": alpha, "beta": beta}},
        )  # fmt: skip
        (got,) = run_onnx(result.model, {"x": x})
        want = carelu_reference(x, alpha, beta, measure=measure, axes=(1, 2, 3))
        assert_close_to_scale(got, want)
        if beta < 0 and measure == "count":
            assert (got[x > 0] == 0).all() and (got[x < 0] > 0).any()


@pytest.mark.parametrize("measure", ["energy", "l1"])
def test_competitive_relu_stays_finite_where_z_squared_overflows_float32(measure):
    model = single_relu_model([2, 6])
    x = np.array([[3e25, -1e25, 2e24, 0, 5e25, -4e25], [0, 0, 0, 0, 0, 0]], np.float32)
    result = rewrite_and_check(
        model, CompetitiveReLUConfig(measure=measure),
        site_values={"act": {"alpha": 1.5, "beta": 0.2}},
    )  # fmt: skip
    (got,) = run_onnx(result.model, {"x": x})
    assert np.isfinite(got).all()
    want = carelu_reference(x, 1.5, 0.2, measure=measure, axes=(1,))
    assert_close_to_scale(got, want)


@pytest.mark.parametrize("opset", [9, 13, 18])
def test_unknown_rank_sample_is_measured_per_sample_through_flatten(opset):
    config = CompetitiveReLUConfig(reduce="sample")
    result = rewrite_and_check(
        unknown_rank_model(opset), config, site_values={"act": {"alpha": 1.0, "beta": 0.3}}
    )
    assert "Flatten" in result.sites[0].reason
    for shape, axes in [((2, 3, 4, 5), (1, 2, 3)), ((3, 7), (1,))]:
        x = _rng(9).standard_normal(shape).astype(np.float32)
        got = run_unknown_rank(result.model, x)
        assert_close_to_scale(got, carelu_reference(x, 1.0, 0.3, axes=axes))


def test_unknown_rank_last_uses_axis_minus_one_from_opset_11():
    result = rewrite_and_check(
        unknown_rank_model(13), CompetitiveReLUConfig(reduce="last"),
        site_values={"act": {"alpha": 1.0, "beta": 0.3}},
    )  # fmt: skip
    x = _rng(10).standard_normal((2, 3, 4)).astype(np.float32)
    got = run_unknown_rank(result.model, x)
    assert_close_to_scale(got, carelu_reference(x, 1.0, 0.3, axes=(2,)))


@pytest.mark.parametrize("reduce", ["auto", "channel"])
def test_unknown_rank_with_auto_or_channel_is_refused_naming_the_site(reduce):
    model = unknown_rank_model()
    before = model.SerializeToString()
    with pytest.raises(UnsupportedModelError, match="'act'.*rank") as error:
        rewrite_onnx_relus(model, CompetitiveReLUConfig(reduce=reduce))
    assert "\n" not in str(error.value)
    assert model.SerializeToString() == before
    with pytest.raises(UnsupportedModelError):
        competition_axes("last", None, 9)


@pytest.mark.parametrize("opset", [9, 13, 21])
@pytest.mark.parametrize("blend", [1.0, 0.3, 0.0])
def test_mrepu_matches_reference(opset, blend):
    model = single_relu_model([3, 10], F32, opset)
    config = MRePUConfig(p=2.0, c=1.0, blend=blend)
    result = rewrite_and_check(model, config)
    assert result.activation == "mrepu"
    assert result.sites[0].parameters == ("cadrelu.act.gain_in", "cadrelu.act.gain_out")
    x = np.linspace(-3, 3, 30, dtype=np.float32).reshape(3, 10)
    (got,) = run_onnx(result.model, {"x": x})
    assert_close_to_scale(got, mrepu_reference(x, blend=blend))
    assert not relu_ops_left(result.model)


def test_mrepu_with_other_power_and_shift_and_repu_match_reference():
    model = single_relu_model([2, 8])
    x = np.linspace(-2.5, 2.5, 16, dtype=np.float32).reshape(2, 8)
    result = rewrite_and_check(model, MRePUConfig(p=3.0, c=0.5))
    (got,) = run_onnx(result.model, {"x": x})
    assert_close_to_scale(got, mrepu_reference(x, p=3.0, c=0.5))
    result = rewrite_and_check(model, RePUConfig(p=2.5))
    (got,) = run_onnx(result.model, {"x": x})
    assert_close_to_scale(got, np.maximum(x.astype(np.float64), 0) ** 2.5)


def two_relu_model(elem=F32, opset=17):
    """``y1 = Relu(x)`` (site ``act1``) and ``y2 = Relu(-x)`` (site ``act2``): two sites whose
    inputs a reference knows."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["y1"], name="act1"),
            helper.make_node("Neg", ["x"], ["n"], name="neg"),
            helper.make_node("Relu", ["n"], ["y2"], name="act2"),
        ],
        "two", [_vi("x", [3, 10], elem)], [_vi("y1", [3, 10], elem), _vi("y2", [3, 10], elem)],
    )  # fmt: skip
    return _model(graph, opset)


GAINS = {"act1": {"gain_in": 0.7, "gain_out": 2.5}, "act2": {"gain_in": -1.3, "gain_out": 0.4}}


def _initializers(model):
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


@pytest.mark.parametrize("as_functions", [False, True])
@pytest.mark.parametrize("blend", [1.0, 0.35])
@pytest.mark.parametrize("elem", [F32, TensorProto.FLOAT16])
def test_mrepu_gains_per_site_match_float64_reference(elem, blend, as_functions):
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    x = np.linspace(-3, 3, 30).astype(dtype).reshape(3, 10)
    result = rewrite_and_check(two_relu_model(elem), MRePUConfig(blend=blend),
                               site_values=GAINS, as_functions=as_functions)  # fmt: skip
    assert not relu_ops_left(result.model)
    got = run_onnx(result.model, {"x": x})
    for output, (site, sign) in zip(got, [("act1", 1), ("act2", -1)]):
        assert output.dtype == dtype
        want = mrepu_reference(sign * x.astype(np.float64), blend=blend, **GAINS[site])
        assert_close_to_scale(output, want, 1e-3 if elem == TensorProto.FLOAT16 else 1e-6)
    if as_functions:
        (function,) = result.model.functions
        assert list(function.input) == ["X", "gain_in", "gain_out"]
        calls = [n for n in result.model.graph.node if n.domain == FUNCTION_DOMAIN]
        assert [list(n.input[1:]) for n in calls] == [
            ["cadrelu.act1.gain_in", "cadrelu.act1.gain_out"],
            ["cadrelu.act2.gain_in", "cadrelu.act2.gain_out"],
        ]  # fmt: skip


@pytest.mark.parametrize("elem, param_dtype", [
    (F32, np.float32), (F64, np.float64), (TensorProto.FLOAT16, np.float32),
    (TensorProto.BFLOAT16, np.float32),
])  # fmt: skip
def test_mrepu_gains_are_initializers_per_site_in_the_compute_type(elem, param_dtype):
    model = two_relu_model(elem, opset=14)
    result = rewrite_and_check(model, MRePUConfig(), site_values={"act2": GAINS["act2"]})
    assert [site.parameters for site in result.sites] == [
        ("cadrelu.act1.gain_in", "cadrelu.act1.gain_out"),
        ("cadrelu.act2.gain_in", "cadrelu.act2.gain_out"),
    ]  # fmt: skip
    values = _initializers(result.model)
    want = {"cadrelu.act1.gain_in": 1.0, "cadrelu.act1.gain_out": 1.0,
            "cadrelu.act2.gain_in": -1.3, "cadrelu.act2.gain_out": 0.4}  # fmt: skip
    assert sorted(values) == sorted(want)
    for name, value in want.items():
        assert values[name].shape == () and values[name].dtype == param_dtype, name
        assert values[name] == param_dtype(value), name


@pytest.mark.parametrize("as_functions", [False, True])
def test_mrepu_default_gains_are_one_and_compute_the_plain_mrepu(as_functions):
    model = two_relu_model()
    x = np.linspace(-3, 3, 30, dtype=np.float32).reshape(3, 10)
    default = rewrite_and_check(model, MRePUConfig(), as_functions=as_functions)
    assert all(value == 1.0 for value in _initializers(default.model).values())
    ones = {site: {"gain_in": 1.0, "gain_out": 1.0} for site in GAINS}
    explicit = rewrite_and_check(model, MRePUConfig(), site_values=ones, as_functions=as_functions)
    assert default.model == explicit.model
    y1, y2 = run_onnx(default.model, {"x": x})
    assert_close_to_scale(y1, mrepu_reference(x), 1e-6)
    assert_close_to_scale(y2, mrepu_reference(-x), 1e-6)


@pytest.mark.parametrize("as_functions", [False, True])
def test_mrepu_at_blend_zero_is_relu_and_still_carries_its_gains(as_functions):
    model = two_relu_model()
    x = np.linspace(-3, 3, 30, dtype=np.float32).reshape(3, 10)
    result = rewrite_and_check(model, MRePUConfig(blend=0.0), site_values=GAINS,
                               as_functions=as_functions)  # fmt: skip
    values = _initializers(result.model)
    assert values["cadrelu.act2.gain_in"] == np.float32(-1.3) and len(values) == 4
    y1, y2 = run_onnx(result.model, {"x": x})
    np.testing.assert_array_equal(y1, np.maximum(x, 0))
    np.testing.assert_array_equal(y2, np.maximum(-x, 0))


@pytest.mark.parametrize("blend", [1.0, 0.5])
@pytest.mark.parametrize("elem", [F32, TensorProto.FLOAT16])
def test_mrepu_with_large_gains_saturates_at_the_largest_finite_value(elem, blend):
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    big = float(np.finfo(dtype).max)
    gain_in = 1e12 if elem == F32 else 50.0  # (a*10)^3 beyond the type's range at x = 10
    values = {"act1": {"gain_in": gain_in, "gain_out": 3.0},
              "act2": {"gain_in": gain_in, "gain_out": -3.0}}  # fmt: skip
    result = rewrite_and_check(two_relu_model(elem), MRePUConfig(blend=blend), site_values=values)
    x = np.linspace(-10, 10, 30).astype(dtype).reshape(3, 10)
    y1, y2 = run_onnx(result.model, {"x": x})
    assert np.isfinite(y1).all() and np.isfinite(y2).all()
    assert y1[x == 10].tolist() == [big] and y2[x == -10].tolist() == [-big]
    for got, sign, site in ((y1, 1, "act1"), (y2, -1, "act2")):
        want = np.clip(mrepu_reference(sign * x.astype(np.float64), blend=blend, dtype=dtype,
                                       **values[site]), -big, big)  # fmt: skip
        assert_close_to_scale(got, want, 1e-3 if elem == TensorProto.FLOAT16 else 1e-6)
        np.testing.assert_array_equal(np.abs(got) == big, np.abs(want) == big)


def test_mrepu_gains_are_passed_per_call_of_a_model_local_function():
    model = function_model(17)
    values = {"block1/Block/act": {"gain_in": 0.5, "gain_out": 0.2},
              "block2/Block/act": {"gain_in": -0.3, "gain_out": 1.5}}  # fmt: skip
    x = _rng(11).standard_normal((3, 4)).astype(np.float32)
    w1, w2 = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    h1 = mrepu_reference(x.astype(np.float64) @ w1, **values["block1/Block/act"])
    want = mrepu_reference(h1 @ w2, **values["block2/Block/act"])
    for as_functions in (False, True):
        result = rewrite_and_check(model, MRePUConfig(), site_values=values,
                                   as_functions=as_functions)  # fmt: skip
        block = [f for f in result.model.functions if f.name == "Block"]
        assert len(block) == 1 and len(block[0].input) == 4  # x, w, gain_in, gain_out
        (got,) = run_onnx(result.model, {"x": x})
        assert_close_to_scale(got, want)


def test_mrepu_site_values_name_only_its_gains_and_repu_takes_none():
    with pytest.raises(UsageError, match="alpha.*allowed: gain_in, gain_out"):
        rewrite_onnx_relus(two_relu_model(), MRePUConfig(), site_values={"act1": {"alpha": 1.0}})
    with pytest.raises(UsageError, match="repu has no per-site values"):
        rewrite_onnx_relus(two_relu_model(), RePUConfig(), site_values={"act1": {"gain_in": 1.0}})


def test_float16_sites_compute_in_float32_and_saturate_when_cast_back():
    model = single_relu_model([2, 8], TensorProto.FLOAT16)
    x = np.linspace(-40, 40, 16).astype(np.float16).reshape(2, 8)
    result = rewrite_and_check(model, MRePUConfig())
    casts = [n for n in result.model.graph.node if n.op_type == "Cast"]
    assert [helper.get_attribute_value(n.attribute[0]) for n in casts] == [F32, TensorProto.FLOAT16]
    (got,) = run_onnx(result.model, {"x": x})
    assert got.dtype == np.float16
    want = np.clip(mrepu_reference(x.astype(np.float32)), -65504, 65504).astype(np.float16)
    np.testing.assert_array_equal(got, want)  # 40 * 41^2 is beyond float16: 65504, not inf
    assert got.max() == 65504 and np.isfinite(got).all()
    result = rewrite_and_check(model, CompetitiveReLUConfig())
    (got,) = run_onnx(result.model, {"x": x})
    np.testing.assert_array_equal(got, np.maximum(x, 0))


def test_bfloat16_site_passes_the_checker():
    model = single_relu_model([2, 8], TensorProto.BFLOAT16, opset=14)
    for config in (CompetitiveReLUConfig(), MRePUConfig()):
        result = rewrite_and_check(model, config)
        assert result.sites[0].replaced


def test_integer_relu_is_kept_with_a_reason():
    model = single_relu_model([2, 3], TensorProto.INT32, opset=14)
    result = rewrite_and_check(model, CompetitiveReLUConfig())
    assert not result.sites[0].replaced and "int32" in result.sites[0].reason


# --------------------------------------------------------------------------------------------
# The same numbers as the torch forms (retrofit/activations/functional.py)


def test_competition_axes_are_the_torch_modules_axes():
    activations = pytest.importorskip("retrofit.activations.functional")
    for rank in range(6):
        for reduce in ("auto", "sample", "channel", "last"):
            axes = competition_axes(reduce, rank, 17).axes
            want = activations.competition_axes(rank, reduce)
            assert list(range(rank) if axes is None else axes) == list(want), (rank, reduce)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("reduce", ["auto", "sample", "channel", "last"])
@pytest.mark.parametrize(
    "shape, elem",
    [((3, 4, 5, 6), F32), ((2, 5, 8), F32), ((4, 7), F64), ((2, 3, 4, 4), TensorProto.FLOAT16)],
)
def test_competitive_relu_computes_what_the_torch_module_computes(measure, reduce, shape, elem):
    torch = pytest.importorskip("torch")
    from retrofit.activations.functional import competitive_relu

    dtype = helper.tensor_dtype_to_np_dtype(elem)
    x = (_rng(12).standard_normal(shape) * 3).astype(dtype)
    x.flat[:3] = 0
    alpha, beta = 1.3, -0.2
    result = rewrite_and_check(
        single_relu_model(list(shape), elem), CompetitiveReLUConfig(measure=measure, reduce=reduce),
        site_values={"act": {"alpha": alpha, "beta": beta}},
    )  # fmt: skip
    (got,) = run_onnx(result.model, {"x": x})
    param_dtype = torch.float64 if elem == F64 else torch.float32
    want = competitive_relu(
        torch.from_numpy(x), torch.tensor(alpha, dtype=param_dtype),
        torch.tensor(beta, dtype=param_dtype), measure=measure, reduce=reduce,
    ).numpy()  # fmt: skip
    assert got.dtype == want.dtype
    tolerance = {F32: 1e-6, F64: 1e-14, TensorProto.FLOAT16: 1e-3}[elem]
    assert_close_to_scale(got, want, tolerance)


@pytest.mark.parametrize("config", [MRePUConfig(), MRePUConfig(p=3.0, c=0.5, blend=0.4),
                                    MRePUConfig(blend=0.0), RePUConfig(p=2.5)])  # fmt: skip
@pytest.mark.parametrize("elem", [F32, F64, TensorProto.FLOAT16])
def test_mrepu_and_repu_compute_what_the_torch_modules_compute(config, elem):
    torch = pytest.importorskip("torch")
    from retrofit.activations.functional import mrepu, repu

    dtype = helper.tensor_dtype_to_np_dtype(elem)
    x = np.linspace(-50, 50, 40).astype(dtype).reshape(4, 10)
    if elem == F32:
        x[0, -1] = 1e13  # x^3 beyond float32: saturates at its largest value
    result = rewrite_and_check(single_relu_model([4, 10], elem), config)
    (got,) = run_onnx(result.model, {"x": x})
    t = torch.from_numpy(x)
    if isinstance(config, RePUConfig):
        want = repu(t, config.p).numpy()
    else:
        want = mrepu(t, config.p, config.c, blend=config.blend).numpy()
    assert got.dtype == want.dtype and np.isfinite(got).all() == np.isfinite(want).all()
    assert_close_to_scale(got, want, 1e-3 if elem == TensorProto.FLOAT16 else 1e-6)
    np.testing.assert_array_equal(got == np.finfo(dtype).max, want == np.finfo(dtype).max)


# --------------------------------------------------------------------------------------------
# Sites: where they are and how they are named


def test_sites_are_found_in_subgraphs_and_named_by_their_path():
    result = rewrite_and_check(if_model(13), CompetitiveReLUConfig())
    # graph order: the If's attributes as stored (make_node sorts them: else_branch first)
    assert [s.name for s in result.sites] == [
        "relu_in", "branch/else_branch/else_relu", "branch/then_branch/then_relu",
    ]  # fmt: skip
    assert [s.owner for s in result.sites] == ["iff", "branch/else_branch", "branch/then_branch"]
    assert result.sites[2].parameters == (
        "cadrelu.branch.then_branch.then_relu.alpha",
        "cadrelu.branch.then_branch.then_relu.beta",
    )
    assert all(s.kind == "onnx.Relu" for s in result.sites)


def test_sites_in_loop_bodies_are_rewritten():
    model = loop_model(13)
    inputs = make_onnx_inputs(model, {"x": (2, 4)})
    expected = run_onnx(model, inputs)
    result = rewrite_and_check(model, CompetitiveReLUConfig())
    assert [s.name for s in result.sites] == ["repeat/body/body_relu"]
    assert_close_to_scale(run_onnx(result.model, inputs)[0], expected[0])


def test_unnamed_relu_is_named_by_its_output_and_duplicates_are_numbered():
    model = mlp_model(13)
    model.graph.node[1].name = "a2"  # now two sites share the base name "a2"
    names = [site.name for site in rewrite_onnx_relus(model, MRePUConfig()).sites]
    assert names == ["a2#1", "a2#2"]


def test_each_call_of_a_function_is_its_own_site_with_its_own_parameters():
    model = function_model(17)
    sites = rewrite_onnx_relus(model, MRePUConfig()).sites
    assert [s.name for s in sites] == ["block1/Block/act", "block2/Block/act"]
    values = {"block1/Block/act": {"alpha": 1.2, "beta": -0.2},
              "block2/Block/act": {"alpha": -0.7, "beta": 0.9}}  # fmt: skip
    for as_functions in (False, True):
        result = rewrite_and_check(
            model, CompetitiveReLUConfig(), site_values=values, as_functions=as_functions
        )
        assert len({p for s in result.sites for p in s.parameters}) == 4
        block = [f for f in result.model.functions if f.name == "Block"]
        assert len(block) == 1 and len(block[0].input) == 4  # x, w, alpha, beta
        x = _rng(11).standard_normal((3, 4)).astype(np.float32)
        (got,) = run_onnx(result.model, {"x": x})
        w1, w2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
        h1 = carelu_reference(x.astype(np.float64) @ w1, 1.2, -0.2, axes=(1,))
        want = carelu_reference(h1 @ w2, -0.7, 0.9, axes=(1,))
        assert_close_to_scale(got, want)


def test_excluding_one_call_keeps_relu_there_through_a_function_variant():
    model = function_model(17)
    inputs = make_onnx_inputs(model)
    expected = run_onnx(model, inputs)
    result = rewrite_and_check(
        model, CompetitiveReLUConfig(), select=SiteSelector(exclude=("block2",))
    )
    assert [s.replaced for s in result.sites] == [True, False]
    names = sorted(f.name for f in result.model.functions)
    assert names == ["Block", "Block_cadrelu1"]  # original kept for block2, variant for block1
    calls = {n.name: n.op_type for n in result.model.graph.node}
    assert calls == {"block1": "Block_cadrelu1", "block2": "Block"}
    assert_close_to_scale(run_onnx(result.model, inputs)[0], expected[0])


def test_relu_in_a_nested_function_is_a_site_per_outer_call():
    model = function_model(17, nested=True)
    sites = rewrite_onnx_relus(model, MRePUConfig()).sites
    assert [s.name for s in sites] == [
        "block1/Outer/inner/Block/act", "block2/Outer/inner/Block/act",
    ]  # fmt: skip
    inputs = make_onnx_inputs(model)
    expected = run_onnx(model, inputs)
    values = {sites[1].name: {"alpha": 0.8, "beta": -0.1}}
    result = rewrite_and_check(model, CompetitiveReLUConfig(), site_values=values)
    assert not relu_ops_left(result.model)
    w1, w2 = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    x = inputs["x"].astype(np.float64)
    h1 = carelu_reference(-x @ w1, 0.0, np.arctanh(0.5), axes=(1,))
    want = carelu_reference(-h1 @ w2, 0.8, -0.1, axes=(1,))
    (got,) = run_onnx(result.model, inputs)
    assert_close_to_scale(got, want)
    assert_close_to_scale(run_onnx(rewrite_and_check(model, MRePUConfig()).model, inputs)[0],
                          mrepu_reference(-mrepu_reference(-x @ w1) @ w2))  # fmt: skip
    del expected


def test_calls_that_see_different_ranks_get_their_own_function_variants():
    model = function_model(17)
    model.graph.input[0].CopyFrom(_vi("x", ["N", "T", 4]))  # call 1 sees rank 3, call 2 too
    model.graph.output[0].CopyFrom(_vi("y", ["N", "T", 6]))
    flat = helper.make_node("Flatten", ["h1"], ["h1_flat"], name="flat", axis=2)
    model.graph.node.insert(1, flat)  # ... now call 2 sees rank 2
    model.graph.node[2].input[0] = "h1_flat"
    model.graph.output[0].CopyFrom(_vi("y", [None, 6]))
    config = CompetitiveReLUConfig(reduce="sample")
    values = {"block1/Block/act": {"alpha": 1.0, "beta": 0.1},
              "block2/Block/act": {"alpha": 0.5, "beta": -0.3}}  # fmt: skip
    result = rewrite_and_check(model, config, site_values=values)
    assert sorted(f.name for f in result.model.functions) == ["Block", "Block_cadrelu2"]
    x = _rng(13).standard_normal((2, 3, 4)).astype(np.float32)
    (got,) = run_onnx(result.model, {"x": x})
    w1, w2 = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    h1 = carelu_reference(x @ w1, 1.0, 0.1, axes=(1, 2)).reshape(6, 6)
    assert_close_to_scale(got, carelu_reference(h1 @ w2, 0.5, -0.3, axes=(1,)))


def test_function_attributes_are_bound_per_call_so_each_call_knows_its_rank():
    """``Pool(x) = Relu(ReduceMax(x, axes=[1], keepdims=@keep))``: the rank at the Relu is
    what the call's attribute (or the function's default, 1) makes it."""
    keep = helper.make_attribute_ref("keepdims", AttributeProto.INT, ref_attr_name="keep")
    reduce = helper.make_node("ReduceMax", ["x"], ["m"], name="max", axes=[1])
    reduce.attribute.append(keep)
    pool = helper.make_function(
        "local", "Pool", ["x"], ["y"], [reduce, helper.make_node("Relu", ["m"], ["y"], name="act")],
        opset_imports=[helper.make_opsetid("", 17)], attributes=[],
    )  # fmt: skip
    pool.attribute_proto.append(helper.make_attribute("keep", 1))
    nodes = [helper.make_node("Pool", ["x"], ["kept"], name="kept", domain="local"),
             helper.make_node("Pool", ["x"], ["dropped"], name="dropped", domain="local", keep=0)]
    graph = helper.make_graph(nodes, "pools", [_vi("x", [2, 3, 4])],
                              [_vi("kept", [2, 1, 4]), _vi("dropped", [2, 4])])  # fmt: skip
    model = _model(graph, 17, ir=9, functions=[pool],
                   extra_opsets=[helper.make_opsetid("local", 1)])
    inputs = make_onnx_inputs(model)
    expected = run_onnx(model, inputs)
    result = rewrite_and_check(model, CompetitiveReLUConfig(reduce="auto"))  # needs the ranks
    assert sorted(f.name for f in result.model.functions) == ["Pool", "Pool_cadrelu2"]
    for got, want in zip(run_onnx(result.model, inputs), expected):
        assert_close_to_scale(got, want)


def test_sites_in_scan_bodies_and_in_subgraphs_of_functions_are_typed_and_rewritten():
    body = helper.make_graph(
        [helper.make_node("Add", ["acc", "row"], ["sum"], name="add"),
         helper.make_node("Relu", ["sum"], ["acc_out"], name="scan_relu"),
         helper.make_node("Identity", ["acc_out"], ["row_out"], name="emit")],
        "scan_body", [_vi("acc", [4]), _vi("row", [4])], [_vi("acc_out", [4]), _vi("row_out", [4])],
    )  # fmt: skip
    branch = helper.make_graph(  # reads the function's value "h" from the enclosing scope
        [helper.make_node("Relu", ["h"], ["b"], name="branch_relu")], "then", [], [_vi("b", None)])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["b2"], name="neg")], "else", [],
                              [_vi("b2", None)])  # fmt: skip
    gate = helper.make_function(
        "local", "Gate", ["x", "c"], ["y"],
        [helper.make_node("Identity", ["x"], ["h"], name="copy"),
         helper.make_node("If", ["c"], ["y"], name="choose", then_branch=branch,
                          else_branch=other)],
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    nodes = [
        helper.make_node("Scan", ["zero", "x"], ["acc", "rows"], name="scan", body=body,
                         num_scan_inputs=1),
        helper.make_node("Gate", ["rows", "c"], ["y"], name="gate", domain="local"),
    ]
    graph = helper.make_graph(
        nodes, "scans", [_vi("x", [3, 4]), _vi("c", [], TensorProto.BOOL)], [_vi("y", [3, 4])],
        [_init("zero", np.zeros(4, np.float32))],
    )  # fmt: skip
    model = _model(graph, 17, ir=9, functions=[gate],
                   extra_opsets=[helper.make_opsetid("local", 1)])
    for as_functions in (False, True):
        result = rewrite_and_check(model, CompetitiveReLUConfig(reduce="auto"),
                                   as_functions=as_functions)
        assert [s.name for s in result.sites] == [
            "scan/body/scan_relu", "gate/Gate/choose/then_branch/branch_relu"]
        assert not relu_ops_left(result.model)
        for flag in (True, False):
            inputs = {"x": _rng(7).standard_normal((3, 4)).astype(np.float32),
                      "c": np.array(flag)}
            assert_close_to_scale(run_onnx(result.model, inputs)[0], run_onnx(model, inputs)[0])


def test_a_function_with_relu_that_is_never_called_is_noted_and_left_alone():
    model = function_model(17)
    model.graph.node[0].op_type = model.graph.node[1].op_type = "MatMul"
    model.graph.node[0].domain = model.graph.node[1].domain = ""
    model.graph.node.append(helper.make_node("Relu", ["y0"], ["y"], name="last"))
    model.graph.node[1].output[0] = "y0"
    result = rewrite_and_check(model, MRePUConfig(), as_functions=True)
    assert [s.name for s in result.sites] == ["last"]
    assert any("'Block'" in note and "never called" in note for note in result.notes)
    assert result.model.functions[0] == model.functions[0]


def test_as_functions_for_float16_sites_keeps_the_casts_inside_the_function():
    model = single_relu_model([2, 8], TensorProto.FLOAT16)
    x = np.linspace(-3, 3, 16).astype(np.float16).reshape(2, 8)
    for config in (MRePUConfig(), CompetitiveReLUConfig()):
        plain = run_onnx(rewrite_and_check(model, config).model, {"x": x})[0]
        result = rewrite_and_check(model, config, as_functions=True)
        (function,) = result.model.functions
        assert [n.op_type for n in function.node].count("Cast") == 2
        np.testing.assert_array_equal(run_onnx(result.model, {"x": x})[0], plain)


def test_parameter_names_never_clash_with_existing_names():
    model = single_relu_model([2, 3])
    model.graph.initializer.append(_init("cadrelu.act.alpha", np.zeros(1, np.float32)))
    result = rewrite_and_check(model, CompetitiveReLUConfig())
    assert result.sites[0].parameters == ("cadrelu.act.alpha_1", "cadrelu.act.beta")


# --------------------------------------------------------------------------------------------
# Selection


def test_include_selects_only_matching_sites():
    result = rewrite_and_check(mlp_model(13), CompetitiveReLUConfig(),
                               select=SiteSelector(include=("relu1",)))  # fmt: skip
    assert [(s.name, s.replaced, s.reason) for s in result.sites] == [
        ("relu1", True, ""), ("a2", False, "not included"),
    ]  # fmt: skip
    assert [n.name for n in relu_ops_left(result.model)] == [""]


def test_exclude_by_regex_keeps_matching_sites():
    selector = SiteSelector(exclude=(r".*_relu",))
    result = rewrite_and_check(if_model(13), MRePUConfig(), select=selector)
    assert [s.replaced for s in result.sites] == [True, False, False]
    assert all(s.reason == "excluded" for s in result.kept)


def test_a_rule_that_matches_nothing_is_an_error():
    with pytest.raises(SelectionError, match="nope"):
        rewrite_onnx_relus(mlp_model(13), CompetitiveReLUConfig(), SiteSelector(include=("nope",)))


def test_site_values_for_an_unknown_site_are_an_error():
    with pytest.raises(UsageError, match="relu9"):
        rewrite_onnx_relus(mlp_model(13), CompetitiveReLUConfig(),
                           site_values={"relu9": {"alpha": 1.0}})  # fmt: skip
    with pytest.raises(UsageError, match="gamma"):
        rewrite_onnx_relus(mlp_model(13), CompetitiveReLUConfig(),
                           site_values={"relu1": {"gamma": 1.0}})  # fmt: skip


# --------------------------------------------------------------------------------------------
# What must not change


def test_everything_but_the_sites_is_preserved():
    model = mlp_model(13)
    model.doc_string = "the model"
    model.producer_name, model.producer_version = "pytest", "1"
    model.graph.doc_string = "the graph"
    helper.set_model_props(model, {"author": "me", "task": "mlp"})
    result = rewrite_and_check(model, CompetitiveReLUConfig())
    out = result.model
    assert out.metadata_props == model.metadata_props
    assert (out.doc_string, out.producer_name, out.graph.doc_string) == (
        "the model", "pytest", "the graph",
    )  # fmt: skip
    assert out.ir_version == model.ir_version and out.opset_import == model.opset_import
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    originals = [n for n in model.graph.node if n.op_type != "Relu"]
    kept = [n for n in out.graph.node if n.name in {o.name for o in originals}]
    assert kept == originals  # same nodes, same order
    names = [n.name for n in out.graph.node]
    assert len(names) == len(set(names))
    for tensor in model.graph.initializer:
        assert tensor in out.graph.initializer


def test_ir_version_3_lists_new_parameters_as_inputs():
    model = mlp_model(9)
    model.ir_version = 3
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                               list(tensor.dims)))  # fmt: skip
    check_onnx_model(model, is_input=True)
    inputs = make_onnx_inputs(model)
    assert list(inputs) == ["x"]
    result = rewrite_and_check(model, CompetitiveReLUConfig())
    assert any("IR version < 4" in note for note in result.notes)
    assert_close_to_scale(run_onnx(result.model, inputs)[0], run_onnx(model, inputs)[0])


def test_as_functions_raises_old_ir_versions_to_8_with_a_note():
    model = mlp_model(9)
    assert model.ir_version < 8
    result = rewrite_and_check(model, MRePUConfig(), as_functions=True)
    assert result.model.ir_version == 8 and any("IR version raised" in n for n in result.notes)
    assert [f.name for f in result.model.functions] == ["MRePU"]
    calls = [n for n in result.model.graph.node if n.domain == FUNCTION_DOMAIN]
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------
# Refusals


def test_a_model_without_relu_is_refused_naming_what_it_left_alone():
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["s"]),
                               helper.make_node("Clip", ["s"], ["c"]),
                               helper.make_node("Clip", ["c"], ["y"])], "g",
                              [_vi("x", [1, 2])], [_vi("y", [1, 2])])  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="no ReLU site") as error:
        rewrite_onnx_relus(_model(graph, 13), CompetitiveReLUConfig())
    assert "\n" not in str(error.value)
    assert "found and left alone: 2 Clip, 1 Sigmoid" in str(error.value)


def test_quantized_and_old_opset_models_are_refused():
    model = single_relu_model([1, 4])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["q", "s"], ["x0"]))
    with pytest.raises(UnsupportedModelError, match="DequantizeLinear"):
        rewrite_onnx_relus(model, CompetitiveReLUConfig())
    with pytest.raises(UnsupportedModelError, match="opset 7"):
        rewrite_onnx_relus(single_relu_model([1, 4], opset=7), CompetitiveReLUConfig())


def test_a_quantized_graph_is_refused_naming_the_quantized_ops():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("QLinearMatMul", ["xq", "s", "zp", "wq", "s", "zp", "s", "zp"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s", "zp"], ["y0"]),
        helper.make_node("Relu", ["y0"], ["y"]),
    ]
    inits = [_init("s", np.array(0.1, np.float32)), _init("zp", np.array(0, np.uint8)),
             _init("wq", np.ones((4, 4), np.uint8))]
    graph = helper.make_graph(nodes, "q", [_vi("x", [1, 4])], [_vi("y", [1, 4])], inits)
    with pytest.raises(UnsupportedModelError, match="QLinearMatMul.*QuantizeLinear") as error:
        rewrite_onnx_relus(_model(graph, 13), CompetitiveReLUConfig())
    assert "\n" not in str(error.value)


def test_relus_fused_into_other_ops_are_refused_naming_them():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("FusedConv", ["r", "w"], ["c"], name="conv_fused",
                         domain="com.microsoft", activation="Relu"),
        helper.make_node("FusedGemm", ["c", "g"], ["y"], name="gemm_fused",
                         domain="com.microsoft", activation="Relu"),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, "fused", [_vi("x", [1, 1, 4, 4])], [_vi("y", [1, 1])])
    model = _model(graph, 13, extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedModelError, match="FusedConv 'conv_fused'.*FusedGemm") as error:
        rewrite_onnx_relus(model, CompetitiveReLUConfig())
    assert "\n" not in str(error.value)
    nodes[1].attribute[0].s = b"Sigmoid"  # a fused activation other than ReLU is no site
    nodes[2].attribute[0].s = b"Sigmoid"
    graph = helper.make_graph(nodes, "fused", [_vi("x", [1, 1, 4, 4])], [_vi("y", [1, 1])])
    model = _model(graph, 13, extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    assert [s.name for s in rewrite_onnx_relus(model, CompetitiveReLUConfig()).sites] == ["relu"]


def test_rnn_with_relu_activation_is_noted():
    model = single_relu_model([1, 4])
    model.graph.node.append(helper.make_node("RNN", ["x", "W", "R"], ["yr"], name="rnn",
                                             activations=["Relu"], hidden_size=2))  # fmt: skip
    sites = rewrite_onnx_relus(model, MRePUConfig())
    assert any("'rnn'" in note and "Relu" in note for note in sites.notes)


# --------------------------------------------------------------------------------------------
# Performance (a sanity bound, not a benchmark: see bench/bench_rewrite.py)


def test_rewriting_200_sites_takes_well_under_a_few_seconds():
    model = chain_model(200)
    start = time.perf_counter()
    result = rewrite_onnx_relus(model, CompetitiveReLUConfig())
    elapsed = time.perf_counter() - start
    assert len(result.replaced) == 200
    assert elapsed < 5.0, f"rewriting 200 sites took {elapsed:.2f} s"
