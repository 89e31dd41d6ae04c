"""retrofit.onnx_path.to_torch.registry: handlers by (op_type, since_version), and the versions
no handler lists refused before any work, never run as an older version."""

from __future__ import annotations

import ast
import glob
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from retrofit.errors import ExitCode, UnsupportedModelError
from retrofit.onnx_path.to_torch import SUPPORTED_OPS
from retrofit.onnx_path.to_torch.builder import onnx_to_torch
from retrofit.onnx_path.to_torch.registry import HANDLERS, register


def _model(op: str, inputs: list[str], opset: int, inits: dict[str, np.ndarray] | None = None,
           **attrs: object) -> onnx.ModelProto:
    """``op`` on a float input ``x`` at ``opset``; initializers are also graph inputs (IR < 4)."""
    inits = inits or {}
    values = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])] + [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for k, v in inits.items()
    ]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], **attrs)], "g", values,
        [helper.make_empty_tensor_value_info("y")],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset < 7 else 7
    return model


def _with_dangling_node(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` plus a node reading a value nothing produces: building it would fail with a
    different error, so a refusal naming the op version shows that nothing was built."""
    model.graph.node.append(helper.make_node("Relu", ["missing"], ["unused"]))
    return model


@pytest.mark.parametrize("model, label", [
    (_model("Tile", ["x", "t", "a"], 5, {"t": np.array([2], np.int64),
                                         "a": np.array([1], np.int64)}),
     r"Tile-1 \(opset 5\)"),  # Tile-1: tiles and axis inputs
    (_model("Upsample", ["x"], 6, height_scale=2.0, width_scale=2.0, mode="nearest"),
     r"Upsample-1 \(opset 6\)"),  # Upsample-1: scales as attributes
    (_model("Gelu", ["x"], 13), r"Gelu \(not defined at opset 13\)"),
], ids=["Tile-1", "Upsample-1", "Gelu-at-13"])
def test_an_op_version_no_handler_lists_is_refused_before_any_work(
    model: onnx.ModelProto, label: str
) -> None:
    model = _with_dangling_node(model)
    before = model.SerializeToString()
    with pytest.raises(UnsupportedModelError, match=rf"op versions .*{label}") as error:
        onnx_to_torch(model)
    assert error.value.exit_code == ExitCode.BAD_INPUT == 3
    assert model.SerializeToString() == before


def test_a_version_missing_from_a_handlers_list_is_not_run_as_an_older_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Relu-13's handler builds opset 13; with Relu-14 unlisted, opset 14 is refused up front."""
    monkeypatch.delitem(HANDLERS, ("Relu", 14))
    onnx_to_torch(_model("Relu", ["x"], 13))
    with pytest.raises(UnsupportedModelError) as error:
        onnx_to_torch(_with_dangling_node(_model("Relu", ["x"], 14)))
    assert str(error.value) == ("cannot fine-tune this ONNX model: op versions this converter "
                                "does not implement: Relu-14 (opset 14)")


def test_supported_ops_are_the_registered_op_types() -> None:
    assert SUPPORTED_OPS == {op for op, _ in HANDLERS}
    assert {"Relu", "Conv", "Gemm", "Reshape", "ReduceMean", "Resize"} <= SUPPORTED_OPS


def test_the_package_imports_every_module_that_registers_handlers() -> None:
    """A new op-family module the package forgot to import would leave its ops unsupported."""
    package = sys.modules["retrofit.onnx_path.to_torch"]
    folder = os.path.dirname(package.__file__)
    families = set()
    for path in glob.glob(os.path.join(folder, "*.py")):
        with open(path, encoding="utf-8") as handle:
            if "\n@register(" in handle.read():
                families.add(os.path.basename(path)[: -len(".py")])
    with open(package.__file__, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == package.__name__ for alias in node.names}
    assert len(families) >= 10
    assert sorted(families - imported) == []


def test_registering_a_taken_op_version_is_refused_and_changes_nothing() -> None:
    before = dict(HANDLERS)
    with pytest.raises(ValueError, match="Relu-14"):
        register("NewOp", "Relu", since=(14,))(lambda b, node: None)
    assert HANDLERS == before


def test_every_op_version_onnx_defines_is_claimed_or_deliberately_refused() -> None:
    """A newer onnx that adds an op version fails here until someone reads what changed and
    either claims it in the registry or adds it to the refused versions."""
    refused = {("Tile", 1), ("Upsample", 1)}
    defined = {(s.name, s.since_version) for s in onnx.defs.get_all_schemas_with_history()
               if s.domain == "" and s.name in SUPPORTED_OPS}
    claimed = set(HANDLERS)
    assert sorted(defined - claimed - refused) == []
    assert sorted(claimed - defined) == []  # no version that onnx does not define
