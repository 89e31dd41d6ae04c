"""Resizing: Resize and Upsample, as the F.interpolate mode that computes them exactly."""

from __future__ import annotations

from typing import Any

import onnx
import torch.nn.functional as F

from retrofit.onnx_path.to_torch.context import Builder, attributes, normalize_axis
from retrofit.onnx_path.to_torch.registry import register


def _resize_mode(
    b: Builder, node: onnx.NodeProto, attrs: dict[str, Any], integer_upscale: bool
) -> tuple[str, Any]:
    """The F.interpolate mode (and align_corners) that computes this ONNX Resize exactly."""
    mode = attrs.get("mode", "nearest")
    legacy = b.since < 11 or node.op_type == "Upsample"
    transform = "asymmetric" if legacy else attrs.get("coordinate_transformation_mode",
                                                      "half_pixel")
    if attrs.get("antialias", 0):
        raise b.unsupported("Resize with antialias")
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise b.unsupported("Resize with keep_aspect_ratio_policy")
    if mode == "nearest":
        rounding = "floor" if legacy else attrs.get("nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and rounding == "floor":
            return "nearest", None
        no_ties = rounding == "round_prefer_floor" and integer_upscale
        if transform in ("half_pixel", "pytorch_half_pixel") and (
            rounding == "round_prefer_ceil" or no_ties
        ):
            return "nearest-exact", None  # floor((x + 0.5) / scale): no ties at integer scales
        raise b.unsupported(f"Resize nearest with {transform} and {rounding}")
    if mode == "linear":
        if transform in ("half_pixel", "pytorch_half_pixel"):
            return "linear", False
        if transform == "align_corners":
            return "linear", True
        raise b.unsupported(f"Resize linear with {transform}")
    raise b.unsupported(f"Resize with mode={mode}")


@register("Resize", "Upsample", since={"Resize": (10, 11, 13, 18, 19), "Upsample": (7, 9, 10)})
def _resize(b: Builder, node: onnx.NodeProto) -> Any:
    attrs = attributes(node)
    x = b.tensor(node.input[0])
    rank = b.rank(node.input[0], node.op_type)
    axes = list(attrs.get("axes", range(rank)))
    axes = [normalize_axis(a, rank) for a in axes]
    scales: list[float] | None = None
    sizes: list[Any] | None = None
    if node.op_type == "Upsample" and "scales" in attrs:
        scales = list(attrs["scales"])
    elif b.since < 11 or node.op_type == "Upsample":
        scales = b.floats(node.input[1], "Resize scales")
    else:
        if b.has(node, 2) and b.static(node.input[2]) is not None and b.static(
            node.input[2]
        ).numel():
            scales = b.floats(node.input[2], "Resize scales")
        elif b.has(node, 3):
            found = b.sizes(node.input[3])
            if not isinstance(found, list):
                raise b.unsupported("Resize with sizes computed from tensor data")
            sizes = found
        else:
            raise b.unsupported("Resize with scales computed at run time")
    per_axis = scales if scales is not None else sizes
    full: dict[int, Any] = dict(zip(axes, per_axis))
    if any(full.get(a, 1) not in (1, 1.0) for a in (0, 1)) and sizes is None:
        raise b.unsupported("Resize of the batch or channel dimension")
    spatial = list(range(2, rank))
    if not 1 <= len(spatial) <= 3:
        raise b.unsupported(f"Resize of a rank-{rank} tensor")
    integer_upscale = scales is not None and all(
        float(full.get(a, 1.0)).is_integer() and full.get(a, 1.0) >= 1 for a in spatial
    )
    mode, align_corners = _resize_mode(b, node, attrs, integer_upscale)
    if mode == "linear":
        mode = ("linear", "bilinear", "trilinear")[len(spatial) - 1]
    kwargs: dict[str, Any] = {"mode": mode}
    if align_corners is not None:
        kwargs["align_corners"] = align_corners
    if scales is not None:
        kwargs["scale_factor"] = [float(full.get(a, 1.0)) for a in spatial]
    else:
        kwargs["size"] = [full[a] if a in full else b.dim(x, a) for a in spatial]
    return b.call(F.interpolate, x, **kwargs)
