"""retrofit.onnx_path.to_torch.weights: trained values go back into the original ONNX graph by
each initializer's torch name, and nothing else of the graph changes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from retrofit.errors import BadInputError
from retrofit.onnx_path.to_torch.builder import onnx_to_torch
from retrofit.onnx_path.to_torch.weights import torch_name, write_back_initializers
from tests.onnx_path.test_to_torch import _assert_close, _input, _ort, _torch, exported


# --------------------------------------------------------------------------- training


def _train(module: nn.Module, shape: tuple[int, ...], out_shape_of: np.ndarray) -> None:
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(*shape, generator=gen)
        target = torch.randn(*out_shape_of.shape, generator=gen)
        loss = F.mse_loss(module(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("name", "opset"), [("mlp", 13), ("cnn", 9), ("cnn", 17), ("transformer-gelu", 17)]
)
def test_training_round_trip_writes_trained_values_into_the_original_graph(
    name: str, opset: int
) -> None:
    original = exported(name, opset)
    before = original.SerializeToString()
    module = onnx_to_torch(original)
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    x = _input(name, batch=3)
    _train(module, x.shape, _ort(original, {"x": x})[0])

    trained = module.state_dict()
    changed = [k for k, v in trained.items() if not torch.equal(v, initial[k])]
    assert changed and all(k in dict(module.named_parameters()) for k in changed)

    updated = write_back_initializers(original, trained)
    onnx.checker.check_model(updated, full_check=True)
    assert original.SerializeToString() == before  # the input model is untouched
    assert [n.SerializeToString() for n in updated.graph.node] == [
        n.SerializeToString() for n in original.graph.node
    ]
    assert updated.graph.input == original.graph.input
    assert updated.graph.output == original.graph.output
    assert updated.opset_import == original.opset_import
    assert [(i.name, i.data_type, list(i.dims)) for i in updated.graph.initializer] == [
        (i.name, i.data_type, list(i.dims)) for i in original.graph.initializer
    ]
    module.eval()
    _assert_close(_ort(updated, {"x": x})[0], _torch(module, {"x": x})[0])
    assert not np.allclose(_ort(updated, {"x": x})[0], _ort(original, {"x": x})[0])


def test_write_back_ignores_foreign_keys_and_applies_extra() -> None:
    original = exported("mlp", 13)
    module = onnx_to_torch(original)
    state = dict(module.state_dict())
    weight_name = original.graph.initializer[0].name
    state["act_0.alpha"] = torch.ones(3)  # an activation parameter that lives elsewhere
    replacement = np.full(tuple(original.graph.initializer[0].dims), 0.25, dtype=np.float64)
    updated = write_back_initializers(
        original, state, extra={weight_name: replacement, "new.alpha": np.ones(2, np.float32)}
    )
    by_name = {i.name: i for i in updated.graph.initializer}
    assert by_name[weight_name].data_type == TensorProto.FLOAT  # kept its own type
    np.testing.assert_array_equal(numpy_helper.to_array(by_name[weight_name]), replacement)
    np.testing.assert_array_equal(numpy_helper.to_array(by_name["new.alpha"]), np.ones(2))
    assert "act_0.alpha" not in by_name


def test_write_back_refuses_a_value_of_another_shape() -> None:
    original = exported("mlp", 13)
    attr = torch_name(original.graph.initializer[0].name)
    with pytest.raises(BadInputError, match="shape"):
        write_back_initializers(original, {attr: torch.zeros(1)})


def test_write_back_keeps_half_precision_initializers_half() -> None:
    weight = numpy_helper.from_array(np.linspace(-1, 1, 6).astype(np.float16).reshape(2, 3), "w")
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Mul", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])],
            initializer=[weight],
        ),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    module = onnx_to_torch(model)
    (param,) = module.parameters()
    assert param.dtype == torch.float16
    with torch.no_grad():
        param.add_(1)
    updated = write_back_initializers(model, module.state_dict())
    (init,) = updated.graph.initializer
    assert init.data_type == TensorProto.FLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(init), param.detach().numpy())


# --------------------------------------------------------------------------- names


def test_torch_name_is_a_deterministic_injective_identifier() -> None:
    names = ["conv1.weight", "conv1_weight", "onnx::MatMul_12", "/l.0/W", "0.bias", "w"]
    attrs = [torch_name(n) for n in names]
    assert all(a.isidentifier() for a in attrs)
    assert len(set(attrs)) == len(attrs)
    assert attrs == [torch_name(n) for n in names]
    assert torch_name("w") == "onnx_w"
