"""Pooling: MaxPool, AveragePool, GlobalAveragePool and GlobalMaxPool."""

from __future__ import annotations

from typing import Any, Sequence

import onnx
import torch
import torch.nn.functional as F

from retrofit.onnx_path.to_torch.context import Builder, attributes
from retrofit.onnx_path.to_torch.padding import spatial_pads, symmetric, torch_pad_list
from retrofit.onnx_path.to_torch.registry import register


def _pool_setup(b: Builder, node: onnx.NodeProto) -> tuple:
    attrs = attributes(node)
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    if n not in (1, 2, 3):
        raise b.unsupported(f"{node.op_type} with {n} spatial dimensions")
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    x = b.tensor(node.input[0])
    pads = spatial_pads(b, node, x, attrs, kernel, strides, dilations)
    return attrs, x, kernel, strides, dilations, pads, n


def _fits_torch_padding(pads: Sequence[tuple[Any, Any]], kernel: Sequence[int],
                        dilations: Sequence[int]) -> bool:
    return symmetric(pads) and all(
        p <= ((k - 1) * d + 1) // 2 for (p, _), k, d in zip(pads, kernel, dilations)
    )


@register("MaxPool", since=(1, 8, 10, 11, 12, 22))
def _max_pool(b: Builder, node: onnx.NodeProto) -> Any:
    if len(node.output) > 1 and node.output[1]:
        raise b.unsupported("MaxPool with an Indices output")
    attrs, x, kernel, strides, dilations, pads, n = _pool_setup(b, node)
    padding: list[Any] = [0] * n
    if _fits_torch_padding(pads, kernel, dilations):
        padding = [p for p, _ in pads]
    else:
        x = b.call(F.pad, x, torch_pad_list(pads), value=float("-inf"))
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return b.call(pool, x, kernel, strides, padding, dilations, bool(attrs.get("ceil_mode", 0)))


@register("AveragePool", since=(1, 7, 10, 11, 19, 22))
def _average_pool(b: Builder, node: onnx.NodeProto) -> Any:
    attrs, x, kernel, strides, dilations, pads, n = _pool_setup(b, node)
    if any(d != 1 for d in dilations):
        raise b.unsupported("AveragePool with dilations")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0))
    if _fits_torch_padding(pads, kernel, dilations):
        padding = [p for p, _ in pads]
        return b.call(pool, x, kernel, strides, padding, ceil_mode, include_pad)
    flat = torch_pad_list(pads)
    summed = b.call(pool, b.call(F.pad, x, flat), kernel, strides, 0, ceil_mode, True)
    if include_pad:
        return summed
    # Average over real elements only: the same pooling of a padded mask of ones divides out.
    ones = b.call(F.pad, b.call(torch.ones_like, x), flat)
    return b.call(torch.div, summed, b.call(pool, ones, kernel, strides, 0, ceil_mode, True))


@register("GlobalAveragePool", "GlobalMaxPool", since=(1, 22))
def _global_pool(b: Builder, node: onnx.NodeProto) -> Any:
    rank = b.rank(node.input[0], node.op_type)
    dims = tuple(range(2, rank))
    fn = torch.mean if node.op_type == "GlobalAveragePool" else torch.amax
    return b.call(fn, b.tensor(node.input[0]), dim=dims, keepdim=True)
