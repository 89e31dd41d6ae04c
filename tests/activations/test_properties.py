"""Property-based tests: for any small network built from the usual layers, with ReLU spelled
any way and placed anywhere, the torch and ONNX rewrites find every ReLU call exactly once,
produce a valid model and, at CompetitiveReLU's identity initialisation, compute what the
original computed."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from retrofit.config import CompetitiveReLUConfig
from retrofit.onnx_path.io import check_onnx_model, make_onnx_inputs, run_onnx
from retrofit.onnx_path.rewrite import rewrite_onnx_relus
from retrofit.torch_path.rewrite import retrofit_torch_model
from retrofit.verify import compare_outputs, torch_parity
from tests.models import count_relu_calls

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
# CADRELU_PROPERTY_EXAMPLES=300 explores more (and randomly) when hunting a bug by hand.
_EXAMPLES = os.environ.get("CADRELU_PROPERTY_EXAMPLES")
PROPERTY = settings(max_examples=int(_EXAMPLES or 30), deadline=None, derandomize=not _EXAMPLES,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- torch models

RELU_SPELLINGS = ["nn.ReLU", "nn.ReLU(inplace)", "F.relu", "F.relu(inplace)", "torch.relu",
                  "torch.relu_", "Tensor.relu", "Tensor.relu_", "shared nn.ReLU"]
LAYERS = ["linear", "conv", "residual"]
WIDTH = 6


class RandomNet(nn.Module):
    """Runs ``plan``: a list of ("linear"|"conv"|"residual", None) or ("relu", spelling) steps
    on a (N, 2, 3, 3) input, which is 18 features when flattened."""

    def __init__(self, plan: list[tuple[str, str | None]]) -> None:
        super().__init__()
        self.plan = plan
        self.shared = nn.ReLU()
        self.stem = nn.Conv2d(2, 2, 3, padding=1)
        layers, acts = [], []
        for kind, spelling in plan:
            layers.append({"linear": nn.Linear(18, 18), "conv": nn.Conv2d(2, 2, 3, padding=1),
                           "residual": nn.Linear(18, 18)}.get(kind, nn.Identity()))
            acts.append(nn.ReLU(inplace=spelling == "nn.ReLU(inplace)")
                        if spelling in ("nn.ReLU", "nn.ReLU(inplace)") else nn.Identity())
        self.layers = nn.ModuleList(layers)
        self.acts = nn.ModuleList(acts)
        self.head = nn.Linear(18, 3)

    @staticmethod
    def relu(x: torch.Tensor, spelling: str, module: nn.Module, shared: nn.Module) -> torch.Tensor:
        if spelling in ("nn.ReLU", "nn.ReLU(inplace)"):
            return module(x)
        if spelling == "shared nn.ReLU":
            return shared(x)
        if spelling == "F.relu":
            return F.relu(x)
        if spelling == "F.relu(inplace)":
            return F.relu(x, inplace=True)
        if spelling == "torch.relu":
            return torch.relu(x)
        if spelling == "torch.relu_":
            return torch.relu_(x)
        if spelling == "Tensor.relu":
            return x.relu()
        return x.relu_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # in-place ReLUs never write into the caller's input
        for (kind, spelling), layer, act in zip(self.plan, self.layers, self.acts):
            if kind == "relu":
                x = self.relu(x, spelling, act, self.shared)
            elif kind == "conv":
                x = layer(x.reshape(-1, 2, 3, 3)).flatten(1)
            elif kind == "linear":
                x = layer(x.flatten(1))
            else:  # residual: x + relu(linear(x)), the ReLU being this step's only spelling
                h = x.flatten(1)
                x = h + self.relu(layer(h), "F.relu", act, self.shared)
        return self.head(x.flatten(1))


def relu_count(plan: list[tuple[str, str | None]]) -> int:
    return sum(kind in ("relu", "residual") for kind, _ in plan)


steps = st.one_of(
    st.tuples(st.sampled_from(LAYERS), st.none()),
    st.tuples(st.just("relu"), st.sampled_from(RELU_SPELLINGS)),
)
plans = st.lists(steps, min_size=1, max_size=7).filter(lambda plan: relu_count(plan) > 0)


@PROPERTY
@given(plan=plans, seed=st.integers(0, 2**16), measure=st.sampled_from(["energy", "l1", "count"]))
def test_any_small_torch_net_is_retrofitted_site_for_call_and_keeps_its_outputs(plan, seed, measure):
    torch.manual_seed(seed)
    model = RandomNet(plan).eval()
    x = torch.randn(4, 2, 3, 3)
    calls = count_relu_calls(model, x)
    assert calls == relu_count(plan)
    result = retrofit_torch_model(model, CompetitiveReLUConfig(measure=measure))
    assert len(result.sites) == calls and all(site.replaced for site in result.sites)
    assert len({site.name for site in result.sites}) == calls
    assert count_relu_calls(result.model, x) == 0
    parity = torch_parity(model, result.model, (x,))
    assert parity.relative <= 1e-5, (plan, parity)


@settings(PROPERTY, max_examples=int(_EXAMPLES or 8))
@given(plan=plans, seed=st.integers(0, 2**16))
def test_any_small_exported_program_is_retrofitted_site_for_call(plan, seed):
    """The same through torch.export: ReLUs are aten.relu/aten.relu_ nodes there."""
    torch.manual_seed(seed)
    x = torch.randn(4, 2, 3, 3)
    model = torch.export.export(RandomNet(plan).eval(), (x,)).module()
    calls = count_relu_calls(model, x)
    assert calls == relu_count(plan)
    result = retrofit_torch_model(model, CompetitiveReLUConfig())
    assert len(result.sites) == calls and all(site.replaced for site in result.sites)
    assert count_relu_calls(result.model, x) == 0
    assert torch_parity(model, result.model, (x,)).relative <= 1e-5, plan


# --------------------------------------------------------------------------- ONNX graphs

NEWEST = onnx.defs.onnx_opset_version()
OPSETS = [9, 13, 17, NEWEST]
ONNX_STEPS = ["matmul", "gemm", "add_bias", "add_residual", "concat", "relu"]


def _ir_for(opset: int) -> int:
    return min(ir for _, ir, op, *_ in helper.VERSION_TABLE if op == opset)


class GraphBuilder:
    """Builds x[2, 2, 4, 4] -> Conv -> (optional Relu) -> Reshape [2, 32] -> random 2-D steps."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def init(self, array: np.ndarray) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def weights(self, *shape: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    def build(self, conv_relu: bool, plan: list[str], opset: int) -> onnx.ModelProto:
        h = self.node("Conv", ["x", self.init(self.weights(3, 2, 3, 3)), self.init(self.weights(3))],
                      pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        if conv_relu:
            h = self.node("Relu", [h])
        h = self.node("Reshape", [h, self.init(np.array([2, -1], np.int64))])
        width, earlier = 48, [(h, 48)]
        for step in plan:
            if step == "matmul":
                h, width = self.node("MatMul", [h, self.init(self.weights(width, 8))]), 8
            elif step == "gemm":
                trans = bool(self.rng.integers(2))
                w = self.weights(width, 8)
                h = self.node("Gemm", [h, self.init(w.T.copy() if trans else w),
                                       self.init(self.weights(8))], transB=int(trans))
                width = 8
            elif step == "add_bias":
                h = self.node("Add", [h, self.init(self.weights(width))])
            elif step == "add_residual":
                same = [name for name, w in earlier if w == width and name != h]
                if same:
                    h = self.node("Add", [h, same[int(self.rng.integers(len(same)))]])
            elif step == "concat":
                other, other_width = earlier[int(self.rng.integers(len(earlier)))]
                h, width = self.node("Concat", [h, other], axis=1), width + other_width
            else:
                h = self.node("Relu", [h])
            earlier.append((h, width))
        y = self.node("MatMul", [h, self.init(self.weights(width, 3))])
        graph = helper.make_graph(
            self.nodes, "random",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 4, 4])],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 3])],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                 ir_version=_ir_for(opset))


@PROPERTY
@given(conv_relu=st.booleans(), plan=st.lists(st.sampled_from(ONNX_STEPS), max_size=8),
       opset=st.sampled_from(OPSETS), seed=st.integers(0, 2**16),
       measure=st.sampled_from(["energy", "l1", "count"]),
       reduce=st.sampled_from(["auto", "sample", "channel", "last"]),
       as_functions=st.booleans())
def test_any_small_onnx_graph_is_rewritten_valid_site_for_relu_and_keeps_its_outputs(
        conv_relu, plan, opset, seed, measure, reduce, as_functions):
    relus = plan.count("relu") + conv_relu
    if relus == 0:
        plan = [*plan, "relu"]
        relus = 1
    model = GraphBuilder(seed).build(conv_relu, plan, opset)
    check_onnx_model(model, is_input=True)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    config = CompetitiveReLUConfig(measure=measure, reduce=reduce)
    result = rewrite_onnx_relus(model, config, as_functions=as_functions)
    assert model == original  # the input is not modified
    assert len(result.sites) == relus and all(site.replaced for site in result.sites)
    assert not any(node.op_type == "Relu" for node in result.model.graph.node)
    assert list(result.model.opset_import) == list(model.opset_import) or as_functions
    check_onnx_model(result.model)  # checker (full) and strict shape inference
    onnx.checker.check_model(result.model, full_check=True)
    feeds = make_onnx_inputs(model, seed=seed)
    parity = compare_outputs(run_onnx(model, feeds), run_onnx(result.model, feeds))
    assert parity.relative <= 1e-5, (plan, opset, parity)
