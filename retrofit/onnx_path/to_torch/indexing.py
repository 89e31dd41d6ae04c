"""Joining and indexing: Concat, Split, Slice, Gather and GatherElements."""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import onnx
import torch

from retrofit.errors import BadInputError
from retrofit.onnx_path.to_torch.context import Builder, Sizes, attributes, normalize_axis
from retrofit.onnx_path.to_torch.registry import register


@register("Concat", since=(1, 4, 11, 13))
def _concat(b: Builder, node: onnx.NodeProto) -> Any:
    axis = attributes(node).get("axis", 1 if b.since < 4 else None)
    if axis is None:
        raise BadInputError(f"ONNX Concat node {b.current_label!r} has no axis attribute")
    names = [name for name in node.input if name]
    if any(isinstance(b.value(n), Sizes) for n in names) and all(
        b.is_sizes_like(n) and not b.as_sizes(n).scalar for n in names
    ):
        parts = [b.as_sizes(n) for n in names]
        anchor = next((p.anchor for p in parts if p.anchor is not None), None)
        return Sizes(tuple(e for p in parts for e in p.elems), False, parts[0].dtype, anchor)
    return b.call(torch.cat, [b.tensor(n) for n in names], axis)


@register("Split", since=(1, 2, 11, 13, 18))
def _split(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    axis = attrs.get("axis", 0)
    split = attrs.get("split")
    if b.has(node, 1):
        split = b.ints(node.input[1], "Split sizes")
    x = b.tensor(node.input[0])
    if split is not None:
        parts = b.call(torch.split, x, list(split), axis)
    else:
        count = attrs.get("num_outputs", len(node.output))
        parts = b.call(torch.chunk, x, count, axis)
    return [b.call(operator.getitem, parts, i) for i in range(len(node.output))]


# Slice bounds at or beyond this mean "to the end" (exporters write INT64_MAX / INT64_MIN).
_BIG = 2**62


def _slice_bound(value: Any) -> Any:
    if isinstance(value, int) and abs(value) >= _BIG:
        return None
    return value


@register("Slice", since=(1, 10, 11, 13))
def _slice(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    if b.since < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = b.sizes(node.input[1]), b.sizes(node.input[2])
        if not isinstance(starts, list) or not isinstance(ends, list):
            raise b.unsupported("Slice with bounds computed from tensor data")
        axes = b.ints(node.input[3], "Slice axes") if b.has(node, 3) else list(
            range(len(starts))
        )
        steps = b.ints(node.input[4], "Slice steps") if b.has(node, 4) else [1] * len(starts)
    value = b.value(node.input[0])
    if isinstance(value, Sizes) and axes in ([0], [-1]):
        if isinstance(starts[0], int) and isinstance(ends[0], int):
            window = slice(_slice_bound(starts[0]), _slice_bound(ends[0]), steps[0])
            return replace(value, elems=value.elems[window], scalar=False)
    x = b.tensor(node.input[0])
    rank = b.rank(node.input[0])
    if any(a < 0 for a in axes) and not all(a < 0 for a in axes):
        if rank is None:
            raise b.unsupported("Slice with mixed-sign axes on a tensor of unknown rank")
        axes = [normalize_axis(a, rank) for a in axes]
    windows: dict[int, slice] = {}
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step < 0:
            shape = b.shape(node.input[0])
            size = shape[axis] if shape is not None else None
            if not isinstance(size, int) or not isinstance(start, int) or not isinstance(end, int):
                raise b.unsupported("Slice with a negative step on a dynamic dimension")
            picked = list(range(*slice(start, end, step).indices(size)))
            x = b.method("index_select", x, axis, torch.tensor(picked, dtype=torch.int64))
            continue
        windows[axis] = slice(_slice_bound(start), _slice_bound(end), step if step != 1 else None)
    if not windows:
        return x
    if all(a >= 0 for a in windows):
        index = tuple(windows.get(i, slice(None)) for i in range(max(windows) + 1))
    else:
        index = (Ellipsis, *(windows.get(i, slice(None)) for i in range(min(windows), 0)))
    return b.call(operator.getitem, x, index)


@register("Gather", since=(1, 11, 13))
def _gather(b: Builder, node: onnx.NodeProto) -> Any:
    axis = attributes(node).get("axis", 0)
    value = b.value(node.input[0])
    indices = b.static(node.input[1])
    if isinstance(value, Sizes) and indices is not None and indices.dim() <= 1:
        picked = tuple(value.elems[int(i)] for i in indices.reshape(-1).tolist())
        return replace(value, elems=picked, scalar=indices.dim() == 0)
    x = b.tensor(node.input[0])
    index: Any = indices.item() if indices is not None and indices.dim() == 0 else b.tensor(
        node.input[1]
    )
    key = (
        (*(slice(None),) * axis, index)
        if axis >= 0
        else (Ellipsis, index, *(slice(None),) * (-axis - 1))
    )
    return b.call(operator.getitem, x, key)


@register("GatherElements", since=(11, 13))
def _gather_elements(b: Builder, node: onnx.NodeProto) -> Any:
    axis = attributes(node).get("axis", 0)
    x, indices = b.tensor(node.input[0]), b.tensor(node.input[1])
    # ONNX counts negative indices from the end of the axis; torch.gather refuses them.
    wrapped = b.call(torch.add, indices, b.dim(x, axis))
    indices = b.call(torch.where, b.call(torch.lt, indices, 0), wrapped, indices)
    return b.call(torch.gather, x, axis, indices)
