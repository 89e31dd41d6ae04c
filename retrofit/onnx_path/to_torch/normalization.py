"""Normalization: BatchNormalization, LRN, InstanceNormalization, LayerNormalization and
RMSNormalization.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
import torch.nn.functional as F

from retrofit.onnx_path.to_torch.context import Builder, attributes
from retrofit.onnx_path.to_torch.registry import register


@register("BatchNormalization", since=(1, 6, 7, 9, 14, 15))
def _batch_norm(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    if attrs.get("training_mode", 0) or any(name for name in node.output[1:]):
        raise b.unsupported("BatchNormalization in training mode")
    if not attrs.get("spatial", 1):
        raise b.unsupported("BatchNormalization with spatial=0 (per-activation statistics)")
    eps = attrs.get("epsilon", 1e-5)
    x, scale, bias, mean, var = (b.tensor(name) for name in node.input[:5])
    if not (b.is_frozen(node.input[3]) and b.is_frozen(node.input[4])):
        # The statistics are trained too (exporters share equal initializers, so a zero bias
        # and a zero running mean can be one tensor): fold them into the affine part, which
        # is differentiable in all four, and normalize with fixed zero mean and unit variance.
        factor = b.call(torch.mul, scale, b.call(torch.rsqrt, b.call(torch.add, var, eps)))
        shift = b.call(torch.sub, bias, b.call(torch.mul, mean, factor))
        zeros, ones = b.call(torch.zeros_like, mean), b.call(torch.ones_like, var)
        return b.call(F.batch_norm, x, zeros, ones, factor, shift, False, 0.0, 0.0)
    return b.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)


@register("LRN", since=(1, 13))
def _lrn(b: Builder, node: onnx.NodeProto) -> Any:
    """Local response normalization across channels (AlexNet, CaffeNet, GoogLeNet, ZFNet).

    ONNX sums the squares of channels ``c - floor((size-1)/2) .. c + ceil((size-1)/2)``;
    ``F.local_response_norm`` puts an even window's extra channel on the other side, so the
    window is summed here from shifted views of the zero-padded squares.
    """
    attrs = attributes(node)
    size = int(attrs["size"])
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    x = b.tensor(node.input[0])
    rank = b.rank(node.input[0], "LRN")
    padded = b.call(F.pad, b.call(torch.mul, x, x), [0, 0] * (rank - 2) + [(size - 1) // 2,
                                                                        size // 2])
    channels = b.dim(x, 1)
    total = b.method("narrow", padded, 1, 0, channels)
    for shift in range(1, size):
        total = b.call(torch.add, total, b.method("narrow", padded, 1, shift, channels))
    scale = b.call(torch.add, b.call(torch.mul, total, alpha / size), bias)
    return b.call(torch.div, x, b.call(torch.pow, scale, beta))


@register("InstanceNormalization", since=(1, 6, 22))
def _instance_norm(b: Builder, node: onnx.NodeProto) -> Any:
    eps = attributes(node).get("epsilon", 1e-5)
    x, scale, bias = (b.tensor(name) for name in node.input[:3])
    return b.call(F.instance_norm, x, weight=scale, bias=bias, eps=eps)


@register("LayerNormalization", "RMSNormalization",
     since={"LayerNormalization": (17,), "RMSNormalization": (23,)})
def _layer_norm(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    if any(name for name in node.output[1:]):
        raise b.unsupported(f"{node.op_type} with Mean/InvStdDev outputs")
    axis, eps = attrs.get("axis", -1), attrs.get("epsilon", 1e-5)
    if axis >= 0:
        axis -= b.rank(node.input[0], f"{node.op_type} with a non-negative axis")
    x = b.tensor(node.input[0])
    scale = b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if b.has(node, 2) else None
    scale_shape = b.shape(node.input[1])
    bias_shape = b.shape(node.input[2]) if bias is not None else None
    if (
        scale_shape is not None
        and len(scale_shape) == -axis
        and all(isinstance(d, int) and d > 1 for d in scale_shape)
        and (bias is None or bias_shape == scale_shape)
    ):  # scale (and bias) have exactly the normalized shape: torch's affine form
        shape = list(scale_shape)
        if node.op_type == "RMSNormalization":
            return b.call(F.rms_norm, x, shape, scale, eps)
        return b.call(F.layer_norm, x, shape, scale, bias, eps)
    normalized = [b.dim(x, i) for i in range(axis, 0)]
    if node.op_type == "RMSNormalization":
        plain = b.call(F.rms_norm, x, normalized, None, eps)
    else:
        plain = b.call(F.layer_norm, x, normalized, None, None, eps)
    result = b.call(torch.mul, plain, scale)  # a scale that broadcasts
    return result if bias is None else b.call(torch.add, result, bias)
