"""Linear maps: MatMul, Gemm, Einsum, Conv and ConvTranspose."""

from __future__ import annotations

import operator
from typing import Any, Sequence

import onnx
import torch
import torch.nn.functional as F

from retrofit.onnx_path.to_torch.context import Builder, attributes
from retrofit.onnx_path.to_torch.padding import spatial_pads, symmetric, torch_pad_list
from retrofit.onnx_path.to_torch.registry import register


@register("MatMul", since=(1, 9, 13))
def _matmul(b: Builder, node: onnx.NodeProto) -> Any:
    return b.call(torch.matmul, b.tensor(node.input[0]), b.tensor(node.input[1]))


@register("Gemm", since=(1, 6, 7, 9, 11, 13))
def _gemm(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    a, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    c = b.tensor(node.input[2]) if b.has(node, 2) else None
    c_rank = b.rank(node.input[2]) if c is not None else None
    if alpha == 1.0 and (c is None or (beta == 1.0 and c_rank == 1)) and not trans_a:
        if trans_b:
            return b.call(F.linear, a, w, c)
    if trans_a:
        a = b.method("t", a)
    if trans_b:
        w = b.method("t", w)
    if c is None:
        product = b.call(torch.mm, a, w)
        return product if alpha == 1.0 else b.call(torch.mul, product, alpha)
    return b.call(torch.addmm, c, a, w, beta=beta, alpha=alpha)


@register("Einsum", since=(12, 28))
def _einsum(b: Builder, node: onnx.NodeProto) -> Any:
    equation = attributes(node)["equation"]
    return b.call(torch.einsum, equation, *[b.tensor(name) for name in node.input])


def _spatial_count(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> int:
    """How many spatial dimensions a (transposed) convolution has: from its kernel shape, its
    weight or its input; torch has them for 1, 2 and 3 only, so any other count is refused."""
    if "kernel_shape" in attrs:
        n = len(attrs["kernel_shape"])
    else:
        weight_rank = b.rank(node.input[1]) if len(node.input) > 1 else None
        n = (weight_rank if weight_rank is not None else b.rank(node.input[0], node.op_type)) - 2
    if n not in (1, 2, 3):
        raise b.unsupported(f"{node.op_type} with {n} spatial dimensions")
    return n


@register("Conv", since=(1, 11, 22))
def _conv(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    n = _spatial_count(b, node, attrs)
    x, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if b.has(node, 2) else None
    kernel = attrs.get("kernel_shape") or list(b.shape(node.input[1])[2:])
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    pads = spatial_pads(b, node, x, attrs, kernel, strides, dilations)
    padding: list[Any] = [0] * n
    if symmetric(pads):
        padding = [p for p, _ in pads]
    else:
        x = b.call(F.pad, x, torch_pad_list(pads))
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return b.call(conv, x, w, bias, strides, padding, dilations, attrs.get("group", 1))


@register("ConvTranspose", since=(1, 11, 22))
def _conv_transpose(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    n = _spatial_count(b, node, attrs)
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise b.unsupported(f"ConvTranspose with auto_pad={auto_pad}")
    x, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if b.has(node, 2) else None
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    output_padding = list(attrs.get("output_padding", [0] * n))
    if "output_shape" in attrs or auto_pad.startswith("SAME"):
        pads = _conv_transpose_pads(b, node, attrs, strides, dilations, output_padding)
        # A negative end "pad" is more output at the end, which is what output_padding adds.
        output_padding = [extra + max(0, -q) for extra, (_, q) in zip(output_padding, pads)]
        pads = [(p, max(0, q)) for p, q in pads]
        if any(p < 0 for p, _ in pads) or any(
            extra >= max(stride, dilation)
            for extra, stride, dilation in zip(output_padding, strides, dilations)
        ):
            raise b.unsupported("ConvTranspose with an output_shape beyond its full output")
    else:
        raw = [0] * (2 * n) if auto_pad == "VALID" else attrs.get("pads", [0] * (2 * n))
        pads = [(raw[i], raw[i + n]) for i in range(n)]
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    group = attrs.get("group", 1)
    if symmetric(pads):
        padding = [p for p, _ in pads]
        return b.call(conv, x, w, bias, strides, padding, output_padding, group, dilations)
    full = b.call(conv, x, w, bias, strides, 0, output_padding, group, dilations)
    index = (Ellipsis, *(slice(p, -q if q else None) for p, q in pads))
    return b.call(operator.getitem, full, index)


def _conv_transpose_pads(
    b: Builder,
    node: onnx.NodeProto,
    attrs: dict[str, Any],
    strides: Sequence[int],
    dilations: Sequence[int],
    output_padding: Sequence[int],
) -> list[tuple[int, int]]:
    """(begin, end) crop of the full transposed convolution that gives ``output_shape`` (or
    ``input * stride`` for SAME_*), split as the ONNX spec says: SAME_UPPER puts the odd
    element at the end, SAME_LOWER and an explicit output_shape at the beginning."""
    n = len(strides)
    shape = b.shape(node.input[0])
    weight = b.shape(node.input[1])
    sizes = list(shape[2:]) if shape is not None and len(shape) == n + 2 else [None] * n
    kernel = list(attrs.get("kernel_shape") or (weight[2:] if weight is not None else []))
    if any(not isinstance(v, int) for v in (*sizes, *kernel)) or len(kernel) != n:
        raise b.unsupported("ConvTranspose with output_shape or auto_pad=SAME on dynamic sizes")
    wanted = list(attrs["output_shape"])[-n:] if "output_shape" in attrs else [
        size * stride for size, stride in zip(sizes, strides)
    ]
    pads = []
    for i in range(n):
        full = strides[i] * (sizes[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
        total = full - wanted[i]  # negative: the output extends past the full result
        small = total // 2
        upper = attrs.get("auto_pad") == "SAME_UPPER"
        pads.append((small, total - small) if upper else (total - small, small))
    return pads
