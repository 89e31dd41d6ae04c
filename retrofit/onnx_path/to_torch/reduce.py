"""Reductions: the Reduce ops, ArgMax and ArgMin."""

from __future__ import annotations

import operator
from typing import Any, Callable

import onnx
import torch

from retrofit.onnx_path.to_torch.context import Builder, attributes, axes_argument, normalize_axis
from retrofit.onnx_path.to_torch.registry import register


_REDUCE: dict[str, Callable] = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
    "ReduceProd": torch.prod,
    "ReduceL1": torch.linalg.vector_norm,
    "ReduceL2": torch.linalg.vector_norm,
    "ReduceLogSumExp": torch.logsumexp,
    "ReduceSumSquare": torch.sum,
    "ReduceLogSum": torch.sum,
}


_REDUCE_SINCE = {
    op: (1, 11, 13, 18) for op in _REDUCE if op not in ("ReduceSum", "ReduceMax", "ReduceMin")
} | {
    "ReduceSum": (1, 11, 13), "ReduceMax": (1, 11, 12, 13, 18, 20),
    "ReduceMin": (1, 11, 12, 13, 18, 20), "ReduceLogSum": (1, 11, 13, 18, 28),
    "ReduceLogSumExp": (1, 11, 13, 18, 28),
}


@register(*_REDUCE, since=_REDUCE_SINCE)
def _reduce(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    keepdim = bool(attrs.get("keepdims", 1))
    axes = axes_argument(b, node)
    x = b.tensor(node.input[0])
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return b.value(node.input[0])
        axes = None
    if node.op_type == "ReduceSumSquare":
        x = b.call(torch.mul, x, x)
    if node.op_type in ("ReduceProd", "ReduceLogSumExp") and axes is None:
        axes = list(range(b.rank(node.input[0], node.op_type)))
    dim = tuple(axes) if axes is not None else None
    if node.op_type in ("ReduceMax", "ReduceMin") and dim is None:
        dim = ()
    if node.op_type == "ReduceProd":
        rank = b.rank(node.input[0])
        order = sorted(
            (normalize_axis(a, rank) if rank is not None else a for a in dim), reverse=True
        )
        if any(a < 0 for a in order):
            raise b.unsupported("ReduceProd with negative axes on a tensor of unknown rank")
        for axis in order:
            x = b.call(torch.prod, x, axis, keepdim)
        return x
    if node.op_type in ("ReduceL1", "ReduceL2"):
        order_p = 1 if node.op_type == "ReduceL1" else 2
        return b.call(torch.linalg.vector_norm, x, order_p, dim, keepdim)
    result = b.call(_REDUCE[node.op_type], x, dim=dim, keepdim=keepdim)
    if node.op_type == "ReduceLogSum":
        result = b.call(torch.log, result)
    return result


@register("ArgMax", "ArgMin", since=(1, 11, 12, 13))
def _arg_reduce(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    axis, keepdim = attrs.get("axis", 0), bool(attrs.get("keepdims", 1))
    x = b.tensor(node.input[0])
    if not attrs.get("select_last_index", 0):
        return b.call(fn, x, axis, keepdim)
    # The last of equal extremes: the first one along the reversed axis, counted back.
    first = b.call(fn, b.call(torch.flip, x, [axis]), axis, keepdim)
    return b.call(torch.sub, b.call(operator.sub, b.dim(x, axis), 1), first)
