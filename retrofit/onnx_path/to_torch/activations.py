"""Activations: Relu (each one a retrofit site) and the other activation functions."""

from __future__ import annotations

from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import fx

from retrofit.onnx_path.to_torch.context import Builder, attributes, normalize_axis
from retrofit.onnx_path.to_torch.registry import register


@register("Relu", since=(1, 6, 13, 14))
def _relu(b: Builder, node: onnx.NodeProto) -> fx.Node:
    x = b.tensor(node.input[0])
    if not isinstance(x, fx.Node):  # a ReLU site stays a node even on a constant input
        x = b.const_node(x)
    relu = b.call(torch.relu, x)
    relu.meta["site_name"] = b.site_names[id(node)]
    return relu


@register("LeakyRelu", since=(1, 6, 16))
def _leaky_relu(b: Builder, node: onnx.NodeProto) -> Any:
    alpha = attributes(node).get("alpha", 0.01)
    return b.call(F.leaky_relu, b.tensor(node.input[0]), alpha)


@register("Elu", since=(1, 6, 22))
def _elu(b: Builder, node: onnx.NodeProto) -> Any:
    return b.call(F.elu, b.tensor(node.input[0]), attributes(node).get("alpha", 1.0))


@register("Celu", since=(12, 28))
def _celu(b: Builder, node: onnx.NodeProto) -> Any:
    return b.call(F.celu, b.tensor(node.input[0]), attributes(node).get("alpha", 1.0))


@register("Selu", since=(1, 6, 22))
def _selu(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return b.call(torch.mul, b.call(F.elu, b.tensor(node.input[0]), alpha), gamma)


@register("ThresholdedRelu", since=(10, 22))
def _thresholded_relu(b: Builder, node: onnx.NodeProto) -> Any:
    x = b.tensor(node.input[0])
    alpha = attributes(node).get("alpha", 1.0)
    return b.call(torch.where, b.call(torch.gt, x, alpha), x, 0.0)


@register("PRelu", since=(1, 6, 7, 9, 16))
def _prelu(b: Builder, node: onnx.NodeProto) -> Any:
    x = b.tensor(node.input[0])
    slope = b.tensor(node.input[1])
    slope_shape = b.shape(node.input[1])
    if b.since < 7 and slope_shape is not None and len(slope_shape) == 1 and slope_shape[0] != 1:
        # Before version 7 a 1-D slope holds one value per channel (dim 1), as PyTorch's
        # exports of nn.PReLU(num_parameters=C) rely on; from 7 on it broadcasts numpy-style.
        for _ in range(b.rank(node.input[0], "PRelu with per-channel slopes") - 2):
            slope = b.call(torch.unsqueeze, slope, -1)
    negative = b.call(torch.mul, x, slope)
    return b.call(torch.where, b.call(torch.lt, x, 0), negative, x)


@register("Swish", since=(24,))
def _swish(b: Builder, node: onnx.NodeProto) -> Any:
    alpha = attributes(node).get("alpha", 1.0)
    x = b.tensor(node.input[0])
    if alpha == 1.0:
        return b.call(F.silu, x)
    return b.call(torch.mul, x, b.call(torch.sigmoid, b.call(torch.mul, x, alpha)))


@register("Softplus", since=(1, 22))
def _softplus(b: Builder, node: onnx.NodeProto) -> Any:
    return b.call(F.softplus, b.tensor(node.input[0]))


@register("Gelu", since=(20,))
def _gelu(b: Builder, node: onnx.NodeProto) -> Any:
    approximate = attributes(node).get("approximate", "none")
    return b.call(F.gelu, b.tensor(node.input[0]), approximate=approximate)


@register("HardSigmoid", since=(1, 6, 22))
def _hard_sigmoid(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    scaled = b.call(torch.add, b.call(torch.mul, b.tensor(node.input[0]), alpha), beta)
    return b.call(torch.clamp, scaled, 0.0, 1.0)


@register("HardSwish", since=(14, 22))
def _hard_swish(b: Builder, node: onnx.NodeProto) -> Any:
    return b.call(F.hardswish, b.tensor(node.input[0]))


@register("Clip", since=(1, 6, 11, 12, 13))
def _clip(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    bounds: list[Any] = [attrs.get("min"), attrs.get("max")]
    for i in (0, 1):
        if b.has(node, i + 1):
            const = b.static(node.input[i + 1])
            bounds[i] = const.item() if const is not None else b.tensor(node.input[i + 1])
    if bounds == [None, None]:
        return b.value(node.input[0])
    return b.call(torch.clamp, b.tensor(node.input[0]), bounds[0], bounds[1])


@register("Softmax", "LogSoftmax", since=(1, 11, 13))
def _softmax(b: Builder, node: onnx.NodeProto) -> Any:
    fn = F.softmax if node.op_type == "Softmax" else F.log_softmax
    x = b.tensor(node.input[0])
    if b.since >= 13:
        return b.call(fn, x, dim=attributes(node).get("axis", -1))
    # Before opset 13 the input is coerced to 2-D at `axis`: dims axis.. are one softmax row.
    axis = attributes(node).get("axis", 1)
    rank = b.rank(node.input[0])
    if (rank is not None and normalize_axis(axis, rank) == rank - 1) or axis == -1:
        return b.call(fn, x, dim=-1)
    rows = b.call(fn, b.call(torch.flatten, x, axis), dim=-1)
    return b.method("reshape_as", rows, x)
