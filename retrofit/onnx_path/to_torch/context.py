"""What op handlers share: the values they read and return, attribute readers, dtype tables,
and :class:`Builder`, the part of the graph builder a handler may use.

Handlers see the builder only through :class:`Builder`, so the op-family modules import this
module and the registry, never :mod:`retrofit.onnx_path.to_torch.builder` (which imports them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import fx

from retrofit.errors import BadInputError, UnsupportedModelError

TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class Sizes:
    """An integer tensor of rank 0 or 1 known at build time element by element: each element is
    a Python int or an fx node computing an int (a dimension of a run-time tensor, or arithmetic
    on such). Shape computations stay in this form so that no tensor data is read at run time."""

    elems: tuple[int | fx.Node, ...]
    scalar: bool
    dtype: torch.dtype = torch.int64
    # A run-time tensor the sizes were read from: tensors made from them go to its device.
    anchor: fx.Node | None = None


@dataclass(frozen=True)
class Weight:
    """A float initializer: a parameter (or a buffer) once used as a run-time tensor, a constant
    when an op reads it as a Python value."""

    name: str
    tensor: torch.Tensor


def tensor_from_proto(proto: TensorProto) -> torch.Tensor:
    """A writable CPU tensor with the value of ``proto``; raises for types torch cannot hold."""
    if proto.data_type not in TORCH_DTYPES:
        name = TensorProto.DataType.Name(proto.data_type)
        raise UnsupportedModelError(
            f"cannot fine-tune this ONNX model: tensor {proto.name!r} has type {name}"
        )
    if proto.data_location == TensorProto.EXTERNAL and not proto.raw_data:
        raise BadInputError(
            f"ONNX tensor {proto.name!r} is stored in an external data file that was not loaded"
        )
    array = numpy_helper.to_array(proto)
    if proto.data_type == TensorProto.BFLOAT16:
        bits = np.ascontiguousarray(array).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in node.attribute:
        if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedModelError(
                f"cannot fine-tune this ONNX model: {node.op_type} has a subgraph"
            )
        if attribute.type == onnx.AttributeProto.TENSOR:
            values[attribute.name] = tensor_from_proto(attribute.t)
            continue
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        values[attribute.name] = value
    return values


def axes_argument(b: Builder, node: onnx.NodeProto) -> list[int] | None:
    """The ``axes`` of Squeeze, Unsqueeze and the Reduce ops: an attribute in older versions,
    input 1 since (13 or 18), None when neither is given."""
    axes = attributes(node).get("axes")
    if b.has(node, 1):
        axes = b.ints(node.input[1], f"{node.op_type} axes")
    return axes


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class Builder(Protocol):
    """The graph builder as an op handler sees it.

    A value is a run-time ``fx.Node``, a build-time constant ``torch.Tensor``, :class:`Sizes`
    (shape arithmetic) or a :class:`Weight` (a float initializer). ``call``/``method`` run the
    torch call at once when no argument is a run-time node (constant folding), so one handler
    serves constants, shape arithmetic and run-time tensors alike.
    """

    since: int  # the current node's op version (its schema's since_version)
    current_label: str  # the current node's name, for messages
    site_names: dict[int, str]  # id(Relu node) -> its site name

    def unsupported(self, what: str) -> UnsupportedModelError:
        """The error for an op feature this converter cannot express, naming the node."""

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> Any:
        """``target(*args, **kwargs)``: an fx node when an argument is one, else the result."""

    def method(self, name: str, obj: Any, *args: Any, **kwargs: Any) -> Any:
        """``obj.name(*args, **kwargs)``: an fx node when an argument is one, else the result."""

    def const_node(self, tensor: torch.Tensor) -> fx.Node:
        """A ``get_attr`` node holding a build-time tensor (a buffer, not state)."""

    def dim(self, x: Any, index: int) -> int | fx.Node:
        """``x.size(index)`` as a Python int for constants, a (cached) node otherwise."""

    def has(self, node: onnx.NodeProto, index: int) -> bool:
        """Whether the optional input ``index`` is given."""

    def value(self, name: str) -> Any:
        """The value of the ONNX name ``name``; refuses a name nothing has produced."""

    def tensor(self, name: str) -> fx.Node | torch.Tensor:
        """The value as a run-time node or a build-time constant tensor."""

    def is_frozen(self, name: str) -> bool:
        """True when the value cannot require grad: a constant or a buffer initializer."""

    def operand(self, name: str) -> Any:
        """Like :meth:`tensor`, but a 0-d constant comes back as a Python number (a literal)."""

    def static(self, name: str) -> torch.Tensor | None:
        """The value as a constant tensor when it is known at build time, else None."""

    def ints(self, name: str, what: str) -> list[int]:
        """A build-time value as ints; refuses a run-time one, naming it ``what``."""

    def floats(self, name: str, what: str) -> list[float]:
        """A build-time value as floats; refuses a run-time one, naming it ``what``."""

    def scalar(self, name: str, what: str) -> int | float | bool | fx.Node:
        """A 0-d or one-element value as a Python number or an int node (shape arithmetic)."""

    def sizes(self, name: str) -> list[int | fx.Node] | fx.Node:
        """A 1-D integer value as a list of ints/int nodes, or (run-time data) a list node."""

    def shape_tensor(self, x: fx.Node) -> fx.Node:
        """``x``'s shape as an int64 tensor on ``x``'s device (data: not exportable)."""

    def anchor(self, name: str) -> fx.Node | None:
        """The run-time tensor a value depends on (for the device of tensors made from it)."""

    def dtype(self, name: str) -> torch.dtype | None:
        """The element type, from the value or shape inference; None when unknown."""

    def shape(self, name: str) -> tuple | None:
        """Static shape (ints, None where unknown), or None when even the rank is unknown."""

    def rank(self, name: str, what: str | None = None) -> int | None:
        """The value's rank; None when unknown, or (given ``what``) refused."""

    def is_sizes_like(self, name: str) -> bool:
        """True for integer values of rank <= 1 small enough to be worked on element by element."""

    def as_sizes(self, name: str) -> Sizes:
        """A value :meth:`is_sizes_like` accepts, as :class:`Sizes`."""

    def device_of(self, anchor: fx.Node | None) -> fx.Node | None:
        """A node reading ``anchor.device`` (cached), so that tensors the graph creates follow
        the module to the GPU; None (the default device) without an anchor."""
