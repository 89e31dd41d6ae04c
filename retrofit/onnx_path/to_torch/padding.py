"""Padding: ONNX ``pads``/``auto_pad`` as the (begin, end) pairs torch takes, shared by the
convolutions and poolings, and the Pad op.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import onnx
import torch
import torch.nn.functional as F

from retrofit.onnx_path.to_torch.context import Builder, attributes, normalize_axis
from retrofit.onnx_path.to_torch.registry import register


def spatial_pads(
    b: Builder,
    node: onnx.NodeProto,
    x: Any,
    attrs: dict[str, Any],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[Any, Any]]:
    """(begin, end) padding of every spatial dim, from ``pads`` or ``auto_pad``."""
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * (2 * n)))
        return [(pads[i], pads[i + n]) for i in range(n)]
    if auto_pad == "VALID":
        return [(0, 0)] * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise b.unsupported(f"{node.op_type} with auto_pad={auto_pad}")
    shape = b.shape(node.input[0])
    result = []
    for i in range(n):
        effective = (kernel[i] - 1) * dilations[i] + 1
        stride = strides[i]
        size = shape[2 + i] if shape is not None and len(shape) == n + 2 else None
        if size is not None:
            total = max(0, (-(-size // stride) - 1) * stride + effective - size)
        elif stride == 1:
            total = effective - 1
        elif effective >= stride:  # never negative: exact with symbolic sizes
            dim = b.dim(x, 2 + i)
            blocks = b.call(operator.floordiv, b.call(operator.add, dim, stride - 1), stride)
            covered = b.call(operator.mul, b.call(operator.sub, blocks, 1), stride)
            total = b.call(operator.sub, b.call(operator.add, covered, effective), dim)
        else:
            raise b.unsupported(f"{node.op_type} with auto_pad={auto_pad} on dynamic sizes")
        small = b.call(operator.floordiv, total, 2)
        large = b.call(operator.sub, total, small)
        result.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
    return result


def _is_zero(value: Any) -> bool:
    return isinstance(value, int) and value == 0


def torch_pad_list(pads: Sequence[tuple[Any, Any]]) -> list[Any]:
    """ONNX per-dim (begin, end) pairs, first dim first, as F.pad's last-dim-first list."""
    flat: list[Any] = []
    for begin, end in reversed(pads):
        flat.extend([begin, end])
    return flat


def symmetric(pads: Sequence[tuple[Any, Any]]) -> bool:
    return all(isinstance(p, int) and isinstance(q, int) and p == q for p, q in pads)


@register("Pad", since=(1, 2, 11, 13, 18, 19, 21, 23, 24, 25))
def _pad(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    mode = attrs.get("mode", "constant")
    if b.since < 11:
        pads: list[Any] = list(attrs["paddings"] if b.since < 2 else attrs["pads"])
        fill: Any = attrs.get("value", 0.0)
    else:
        pads = b.sizes(node.input[1])
        if not isinstance(pads, list):
            raise b.unsupported("Pad with pads computed from tensor data")
        fill = b.scalar(node.input[2], "Pad value") if b.has(node, 2) else 0
    x = b.tensor(node.input[0])
    half = len(pads) // 2
    if b.has(node, 3):
        rank = b.rank(node.input[0], "Pad with axes")
        axes = [normalize_axis(a, rank) for a in b.ints(node.input[3], "Pad axes")]
    else:
        rank, axes = half, list(range(half))
    per_dim = {a: (pads[i], pads[i + half]) for i, a in enumerate(axes)}
    padded = [a for a, (p, q) in per_dim.items() if not (_is_zero(p) and _is_zero(q))]
    if not padded:
        return b.value(node.input[0])
    # F.pad lists (begin, end) from the last dim backwards, down to the first padded dim.
    flat = torch_pad_list([per_dim.get(d, (0, 0)) for d in range(min(padded), rank)])
    if mode == "constant":
        return b.call(F.pad, x, flat, value=fill)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise b.unsupported(f"Pad with mode={mode}")
    shape = b.shape(node.input[0])
    if shape is not None and all(
        isinstance(v, int) for d in padded for v in (shape[d], *per_dim[d])
    ):  # any dims, any rank: pick the source element of every output position
        for d in padded:
            index = _pad_source_index(shape[d], *per_dim[d], mode)
            x = b.method("index_select", x, d, index)
        return x
    # F.pad pads the last 1-3 dims of a tensor with one or two more dims in front.
    count = rank - min(padded)
    if count > 3 or rank > count + 2:
        raise b.unsupported(f"Pad with mode={mode} of dims {padded} of dynamic size")
    return b.call(F.pad, x, flat, mode=torch_mode)


def _pad_source_index(size: int, before: int, after: int, mode: str) -> torch.Tensor:
    """For each position of a dim padded by (before, after), the input index it copies."""
    positions = torch.arange(-before, size + after)
    if mode == "edge":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return positions.remainder(size)
    period = max(2 * (size - 1), 1)  # reflect: mirror at both ends, without the edge twice
    folded = positions.remainder(period)
    return torch.where(folded >= size, period - folded, folded)
