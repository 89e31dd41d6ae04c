"""Elementwise ops: unary math, Identity and Dropout, binary arithmetic, comparison and logic,
Mod, the variadic Max/Min/Sum/Mean, Where, Cast and CastLike.

Integer arithmetic on :class:`Sizes` (shape arithmetic) stays element by element, as Python
ints or ``operator`` nodes, so the module stays traceable and exportable.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any, Callable, Sequence

import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto
from torch import fx

from retrofit.onnx_path.to_torch.context import (
    INT_DTYPES,
    TORCH_DTYPES,
    Builder,
    Sizes,
    attributes,
    normalize_axis,
)
from retrofit.onnx_path.to_torch.registry import register


_UNARY: dict[str, Callable] = {
    "Abs": torch.abs,
    "Ceil": torch.ceil,
    "Cos": torch.cos,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Floor": torch.floor,
    "IsNaN": torch.isnan,
    "Log": torch.log,
    "Mish": F.mish,
    "Neg": torch.neg,
    "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal,
    "Round": torch.round,
    "Sigmoid": torch.sigmoid,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Softsign": F.softsign,
    "Sqrt": torch.sqrt,
    "Tanh": torch.tanh,
}


_UNARY_SINCE = {
    "Abs": (1, 6, 13), "Ceil": (1, 6, 13), "Cos": (7, 22), "Erf": (9, 13), "Exp": (1, 6, 13),
    "Floor": (1, 6, 13), "IsNaN": (9, 13, 20), "Log": (1, 6, 13), "Mish": (18, 22),
    "Neg": (1, 6, 13), "Not": (1,), "Reciprocal": (1, 6, 13), "Round": (11, 22),
    "Sigmoid": (1, 6, 13), "Sign": (9, 13), "Sin": (7, 22), "Softsign": (1, 22),
    "Sqrt": (1, 6, 13), "Tanh": (1, 6, 13),
}


@register(*_UNARY, since=_UNARY_SINCE)
def _unary(b: Builder, node: onnx.NodeProto) -> Any:
    return b.call(_UNARY[node.op_type], b.tensor(node.input[0]))


@register("Identity", "Dropout", since={
    "Identity": (1, 13, 14, 16, 19, 21, 23, 24, 25), "Dropout": (1, 6, 7, 10, 12, 13, 22),
})
def _identity(b: Builder, node: onnx.NodeProto) -> Any:
    value = b.value(node.input[0])
    if node.op_type == "Dropout" and b.since >= 12 and b.has(node, 2):
        training = b.static(node.input[2])
        ratio = b.static(node.input[1]) if b.has(node, 1) else torch.tensor(0.5)
        if training is None or ratio is None:
            raise b.unsupported("Dropout with training_mode or ratio computed at run time")
        if bool(training.reshape(-1)[0]) and float(ratio.reshape(-1)[0]) != 0.0:
            raise b.unsupported("Dropout with training_mode=1 (random; no fixed result)")
    if len(node.output) > 1 and node.output[1]:  # Dropout's mask: nothing dropped at inference
        mask_dtype = torch.bool if b.since >= 10 else None  # before 10 the mask has X's type
        return [value, b.call(torch.ones_like, b.tensor(node.input[0]), dtype=mask_dtype)]
    return value


def _sizes_elementwise(
    b: Builder, on_ints: Callable, on_nodes: Callable, names: Sequence[str]
) -> Sizes:
    """Shape arithmetic element by element: ``on_ints`` when both elements are known ints
    (exact ONNX semantics), else an ``on_nodes`` node (an ``operator`` function, which stays
    traceable and exportable)."""
    operands = [b.as_sizes(name) for name in names]
    length = max(len(op.elems) for op in operands)
    if any(len(op.elems) not in (1, length) for op in operands):
        raise b.unsupported("shape arithmetic on values that do not broadcast")
    elems = []
    for i in range(length):
        args = [op.elems[i if len(op.elems) > 1 else 0] for op in operands]
        if all(isinstance(a, int) for a in args):
            elems.append(on_ints(*args))
        else:
            elems.append(b.call(on_nodes, *args))
    anchor = next((op.anchor for op in operands if op.anchor is not None), None)
    return Sizes(tuple(elems), all(op.scalar for op in operands), operands[0].dtype, anchor)


def _trunc_div(a: int, c: int) -> int:
    """Integer division rounding toward zero (ONNX Div on integers) for Python ints."""
    quotient = abs(a) // abs(c)
    return quotient if (a >= 0) == (c >= 0) else -quotient


def _int_fmod(a: int, c: int) -> int:
    return a - c * _trunc_div(a, c)


# op: (tensor function, shape arithmetic on ints, on int nodes) - None: no shape arithmetic.
# Dimensions are non-negative, so floor division of nodes is ONNX's truncating division.
_BINARY: dict[str, tuple[Callable, Callable | None, Callable | None]] = {
    "Add": (torch.add, operator.add, operator.add),
    "Sub": (torch.sub, operator.sub, operator.sub),
    "Mul": (torch.mul, operator.mul, operator.mul),
    "Div": (torch.div, _trunc_div, operator.floordiv),
    "Pow": (torch.pow, None, None),
    "Equal": (torch.eq, None, None),
    "Less": (torch.lt, None, None),
    "LessOrEqual": (torch.le, None, None),
    "Greater": (torch.gt, None, None),
    "GreaterOrEqual": (torch.ge, None, None),
    "And": (torch.logical_and, None, None),
    "Or": (torch.logical_or, None, None),
    "Xor": (torch.logical_xor, None, None),
}


_ARITHMETIC_SINCE = (1, 6, 7, 13, 14)  # 1 and 6: the legacy broadcast/axis attributes
_BINARY_SINCE = {
    "Add": _ARITHMETIC_SINCE, "Sub": _ARITHMETIC_SINCE, "Mul": _ARITHMETIC_SINCE,
    "Div": _ARITHMETIC_SINCE, "Pow": (1, 7, 12, 13, 15), "Equal": (1, 7, 11, 13, 19),
    "Less": (1, 7, 9, 13), "Greater": (1, 7, 9, 13), "LessOrEqual": (12, 16),
    "GreaterOrEqual": (12, 16), "And": (1, 7), "Or": (1, 7), "Xor": (1, 7),
}


@register(*_BINARY, since=_BINARY_SINCE)
def _binary(b: Builder, node: onnx.NodeProto) -> Any:
    tensor_fn, on_ints, on_nodes = _BINARY[node.op_type]
    left, right = node.input[0], node.input[1]
    if on_ints is not None and (
        isinstance(b.value(left), Sizes) or isinstance(b.value(right), Sizes)
    ):
        if b.is_sizes_like(left) and b.is_sizes_like(right):
            return _sizes_elementwise(b, on_ints, on_nodes, [left, right])
    a, c = b.tensor(left), _legacy_broadcast(b, node, b.operand(right))
    dtype = b.dtype(left) or b.dtype(right)
    if node.op_type == "Div" and dtype in INT_DTYPES:  # ONNX integer Div truncates toward 0
        return b.call(torch.div, a, c, rounding_mode="trunc")
    if node.op_type == "Div" and dtype is None:
        raise b.unsupported("Div on values whose type shape inference could not find")
    result = b.call(tensor_fn, a, c)
    if node.op_type == "Pow" and dtype in INT_DTYPES and b.dtype(right) not in INT_DTYPES:
        result = b.method("to", result, dtype)  # ONNX Pow keeps the base's type
    return result


def _legacy_broadcast(b: Builder, node: onnx.NodeProto, right: Any) -> Any:
    """Before version 7, ``broadcast=1`` with ``axis`` lines B's dims up with A's from ``axis``
    (B of shape (C,) against A of shape (N, C, H, W) at axis 1), not numpy-style from the end:
    B gets trailing unit dims so that numpy broadcasting computes the same."""
    attrs = attributes(node)
    if b.since >= 7 or not attrs.get("broadcast", 0) or "axis" not in attrs:
        return right
    if not isinstance(right, (fx.Node, torch.Tensor)):
        return right  # a scalar broadcasts either way
    left_rank = b.rank(node.input[0], f"{node.op_type} with legacy broadcast")
    right_rank = b.rank(node.input[1], f"{node.op_type} with legacy broadcast")
    for _ in range(left_rank - normalize_axis(attrs["axis"], left_rank) - right_rank):
        right = b.call(torch.unsqueeze, right, -1)
    return right


@register("Mod", since=(10, 13, 28))
def _mod(b: Builder, node: onnx.NodeProto) -> Any:
    fmod = attributes(node).get("fmod", 0)
    left, right = node.input[0], node.input[1]
    if (
        isinstance(b.value(left), Sizes) or isinstance(b.value(right), Sizes)
    ) and b.is_sizes_like(left) and b.is_sizes_like(right):
        on_ints = _int_fmod if fmod else operator.mod
        return _sizes_elementwise(b, on_ints, operator.mod, [left, right])
    fn = torch.fmod if fmod else torch.remainder
    return b.call(fn, b.tensor(left), b.operand(right))


@register("Max", "Min", "Sum", "Mean", since={
    "Max": (1, 6, 8, 12, 13), "Min": (1, 6, 8, 12, 13), "Sum": (1, 6, 8, 13), "Mean": (1, 6, 8, 13),
})
def _variadic(b: Builder, node: onnx.NodeProto) -> Any:
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[
        node.op_type
    ]
    operands = [b.tensor(name) for name in node.input if name]
    result = operands[0]
    for other in operands[1:]:
        result = b.call(fn, result, other)
    if node.op_type == "Mean" and len(operands) > 1:
        result = b.call(torch.div, result, float(len(operands)))
    return result


@register("Where", since=(9, 16))
def _where(b: Builder, node: onnx.NodeProto) -> Any:
    return b.call(
        torch.where, b.tensor(node.input[0]), b.tensor(node.input[1]), b.operand(node.input[2])
    )


@register("Cast", "CastLike", since={
    "Cast": (1, 6, 9, 13, 19, 21, 23, 24, 25, 28), "CastLike": (15, 19, 21, 23, 24, 25),
})
def _cast(b: Builder, node: onnx.NodeProto) -> Any:
    if node.op_type == "Cast":
        to = attributes(node)["to"]
        if isinstance(to, str):  # version 1 names the type ("FLOAT")
            to = TensorProto.DataType.Value(to.upper())
        if to not in TORCH_DTYPES:
            raise b.unsupported(f"Cast to {TensorProto.DataType.Name(to)}")
        dtype = TORCH_DTYPES[to]
    else:
        dtype = b.dtype(node.input[1])
        if dtype is None:
            raise b.unsupported("CastLike to a type shape inference could not find")
    value = b.value(node.input[0])
    if isinstance(value, Sizes) and dtype in INT_DTYPES:
        return replace(value, dtype=dtype)
    return b.method("to", b.tensor(node.input[0]), dtype)
