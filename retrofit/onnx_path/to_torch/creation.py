"""Ops that create tensors: Constant, ConstantOfShape and Range."""

from __future__ import annotations

from typing import Any

import onnx
import torch

from retrofit.onnx_path.to_torch.context import Builder, attributes
from retrofit.onnx_path.to_torch.registry import register


@register("Constant", since=(1, 9, 11, 12, 13, 19, 21, 23, 24, 25))
def _constant(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
    ):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise b.unsupported(f"Constant with {', '.join(attrs) or 'no value'}")


@register("ConstantOfShape", since=(9, 20, 21, 23, 24, 25))
def _constant_of_shape(b: Builder, node: onnx.NodeProto) -> Any:
    fill = attributes(node).get("value", torch.zeros(1, dtype=torch.float32))
    shape = b.sizes(node.input[0])
    device = b.device_of(b.anchor(node.input[0]))
    return b.call(torch.full, shape, fill.reshape(()).item(), dtype=fill.dtype, device=device)


@register("Range", since=(11, 27))
def _range(b: Builder, node: onnx.NodeProto) -> Any:
    start, limit, delta = (b.scalar(name, "Range bounds") for name in node.input[:3])
    dtype = b.dtype(node.input[0])
    if dtype is None:
        raise b.unsupported("Range of a type shape inference could not find")
    # torch.arange computes start + i * delta in float32 or wider, which is stash_type=1.
    if not attributes(node).get("stash_type", 1) and dtype in (torch.float16, torch.bfloat16):
        raise b.unsupported("Range with stash_type=0 in half precision")
    anchor = next(filter(None, (b.anchor(name) for name in node.input[:3])), None)
    return b.call(torch.arange, start, limit, delta, dtype=dtype, device=b.device_of(anchor))
