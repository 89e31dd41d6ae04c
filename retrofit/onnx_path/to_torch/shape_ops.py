"""Shape and layout: Shape, Size, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Expand, Tile.

Shapes read from a run-time tensor are :class:`Sizes` (``x.size(i)`` nodes), not tensor data,
so the arithmetic on them stays symbolic.
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import fx

from retrofit.onnx_path.to_torch.context import (
    Builder,
    Sizes,
    Weight,
    attributes,
    axes_argument,
    normalize_axis,
)
from retrofit.onnx_path.to_torch.registry import register


@register("Shape", since=(1, 13, 15, 19, 21, 23, 24, 25))
def _shape(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    value = b.value(node.input[0])
    if isinstance(value, (Weight, torch.Tensor, Sizes)):
        dims = list(b.shape(node.input[0]))
    elif b.rank(node.input[0]) is None:  # read at run time: traces, but does not export
        shape = b.shape_tensor(value)
        start, end = attrs.get("start", 0), attrs.get("end")
        return shape if (start, end) == (0, None) else b.call(
            operator.getitem, shape, slice(start, end)
        )
    else:
        dims = [b.dim(value, i) for i in range(b.rank(node.input[0]))]
    start, end = attrs.get("start", 0), attrs.get("end")
    anchor = value if isinstance(value, fx.Node) else None
    return Sizes(tuple(dims[start:end]), False, anchor=anchor)


@register("Size", since=(1, 13, 19, 21, 23, 24, 25))
def _size(b: Builder, node: onnx.NodeProto) -> Any:
    value = b.value(node.input[0])
    if isinstance(value, fx.Node):
        return Sizes((b.method("numel", value),), True, anchor=value)
    return torch.tensor(math.prod(b.shape(node.input[0])), dtype=torch.int64)


@register("Reshape", since=(1, 5, 13, 14, 19, 21, 23, 24, 25))
def _reshape(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    allow_zero = attrs.get("allowzero", 0)
    value = b.value(node.input[0])
    target = list(attrs["shape"]) if b.since < 5 else b.sizes(node.input[1])
    if (
        isinstance(value, Sizes)
        and isinstance(target, list)
        and all(isinstance(t, int) for t in target)
    ):
        count = len(value.elems)
        if (not target and count == 1) or (len(target) == 1 and target[0] in (-1, count)):
            return replace(value, scalar=not target)
    x = b.tensor(node.input[0])
    if isinstance(target, list):
        if not allow_zero:
            target = [
                b.dim(x, i) if isinstance(t, int) and t == 0 else t for i, t in enumerate(target)
            ]
        return b.method("reshape", x, target)
    # The target is run-time data: read it (this is the one place a value leaves the graph).
    target_tensor = b.tensor(node.input[1])
    if not allow_zero:  # a 0 entry copies the input's size at that index
        length = (b.shape(node.input[1]) or (None,))[0]
        rank = b.rank(node.input[0])
        if length is None or rank is None:
            raise b.unsupported("Reshape to a run-time shape whose length or input rank is unknown")
        current = b.shape_tensor(x)
        if length > rank:  # entries past the input's rank cannot be 0; any filler will do
            current = b.call(F.pad, current, (0, length - rank), value=1)
        current = b.call(operator.getitem, current, slice(0, length))
        target_tensor = b.call(torch.where, b.call(torch.eq, target_tensor, 0), current,
                               target_tensor)
    return b.method("reshape", x, b.method("tolist", target_tensor))


@register("Flatten", since=(1, 9, 11, 13, 21, 23, 24, 25))
def _flatten(b: Builder, node: onnx.NodeProto) -> Any:
    axis = attributes(node).get("axis", 1)
    x = b.tensor(node.input[0])
    if axis < 0:
        axis += b.rank(node.input[0], "Flatten with a negative axis")
    if axis == b.rank(node.input[0]):
        return b.method("reshape", x, -1, 1)
    if axis == 0:
        return b.method("reshape", x, 1, -1)
    rows = b.call(torch.flatten, x, axis)
    return rows if axis == 1 else b.call(torch.flatten, rows, 0, axis - 1)


@register("Transpose", since=(1, 13, 21, 23, 24, 25))
def _transpose(b: Builder, node: onnx.NodeProto) -> Any:
    perm = attributes(node).get("perm")
    if perm is None:
        perm = list(reversed(range(b.rank(node.input[0], "Transpose without perm"))))
    value = b.value(node.input[0])
    if isinstance(value, Sizes):
        return value
    return b.method("permute", b.tensor(node.input[0]), list(perm))


@register("Squeeze", since=(1, 11, 13, 21, 23, 24, 25))
def _squeeze(b: Builder, node: onnx.NodeProto) -> Any:
    axes = axes_argument(b, node)
    value = b.value(node.input[0])
    if isinstance(value, Sizes) and len(value.elems) == 1 and axes in (None, [0], [-1]):
        return replace(value, scalar=True)
    x = b.tensor(node.input[0])
    if axes is None:
        return b.call(torch.squeeze, x)
    return b.call(torch.squeeze, x, tuple(axes))


@register("Unsqueeze", since=(1, 11, 13, 21, 23, 24, 25))
def _unsqueeze(b: Builder, node: onnx.NodeProto) -> Any:
    axes = axes_argument(b, node)
    value = b.value(node.input[0])
    if isinstance(value, Sizes) and value.scalar and list(axes) in ([0], [-1]):
        return replace(value, scalar=False)
    x = b.tensor(node.input[0])
    if all(a >= 0 for a in axes):
        order = sorted(axes)
    elif all(a < 0 for a in axes):
        order = sorted(axes, reverse=True)
    else:
        out_rank = b.rank(node.input[0], "Unsqueeze with mixed-sign axes") + len(axes)
        order = sorted(normalize_axis(a, out_rank) for a in axes)
    for axis in order:
        x = b.call(torch.unsqueeze, x, axis)
    return x


@register("Expand", since=(8, 13))
def _expand(b: Builder, node: onnx.NodeProto) -> Any:
    x = b.tensor(node.input[0])
    target = b.sizes(node.input[1])
    rank = b.rank(node.input[0])
    if isinstance(target, list) and rank is not None:
        out_rank = max(rank, len(target))
        sizes: list[Any] = [-1] * (out_rank - len(target))
        for i, size in enumerate(target):
            aligned = i + out_rank - len(target) - (out_rank - rank)
            sizes.append(-1 if aligned >= 0 and isinstance(size, int) and size == 1 else size)
        return b.method("expand", x, sizes)
    zeros = b.method("new_zeros", x, target, dtype=torch.bool)
    return b.call(operator.getitem, b.call(torch.broadcast_tensors, x, zeros), 0)


@register("Tile", since=(6, 13))
def _tile(b: Builder, node: onnx.NodeProto) -> Any:
    repeats = b.sizes(node.input[1])
    return b.method("repeat", b.tensor(node.input[0]), repeats)
