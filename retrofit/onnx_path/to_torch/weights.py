"""The names training and write-back share: every ONNX initializer is the torch attribute (and
state-dict key) :func:`torch_name`, and :func:`write_back_initializers` puts trained values back
into the original model by those names."""

from __future__ import annotations

import hashlib
import re
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from retrofit.errors import BadInputError, UnsupportedModelError
from retrofit.onnx_path.to_torch.context import TORCH_DTYPES

__all__ = ["initializer_torch_names", "torch_name", "write_back_initializers"]

# Characters a Python identifier cannot hold (torch attribute and fx node names).
UNSAFE_CHARS = re.compile(r"[^0-9A-Za-z_]")


def torch_name(initializer_name: str) -> str:
    """The torch attribute (and state-dict key) that holds the ONNX value ``initializer_name``.

    Deterministic and a valid Python identifier: ``onnx_`` plus the name with every character
    outside ``[0-9A-Za-z_]`` turned into ``_``; when that changed the name, 8 hex digits of its
    SHA-1 follow, so ``conv.weight`` and ``conv_weight`` get different attributes.
    """
    clean = UNSAFE_CHARS.sub("_", initializer_name)
    if clean == initializer_name:
        return f"onnx_{clean}"
    digest = hashlib.sha1(initializer_name.encode("utf-8")).hexdigest()[:8]
    return f"onnx_{clean}_{digest}"


def initializer_torch_names(model: onnx.ModelProto) -> dict[str, str]:
    """Map every initializer name of ``model``'s main graph to its :func:`torch_name`."""
    names = {init.name: torch_name(init.name) for init in model.graph.initializer}
    if len(set(names.values())) != len(names):  # a SHA-1 prefix collision; never seen
        raise BadInputError("two ONNX initializer names map to the same torch attribute name")
    return names


def _set_initializer(init: TensorProto, value: torch.Tensor) -> None:
    """Overwrite ``init``'s data with ``value`` in ``init``'s own type; name and dims stay."""
    dims = tuple(init.dims)
    if tuple(value.shape) != dims:
        raise BadInputError(
            f"trained value for ONNX initializer {init.name!r} has shape {tuple(value.shape)}, "
            f"the model expects {dims}"
        )
    dtype = TORCH_DTYPES.get(init.data_type)
    if dtype is None:
        raise UnsupportedModelError(
            f"cannot write ONNX initializer {init.name!r} of type "
            f"{TensorProto.DataType.Name(init.data_type)}"
        )
    tensor = value.detach().to(device="cpu", dtype=dtype).contiguous()
    if dtype == torch.bfloat16:
        array = tensor.view(torch.int16).numpy()
    else:
        array = tensor.numpy()
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    for field in ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                  "uint64_data", "external_data"):
        init.ClearField(field)
    init.data_location = TensorProto.DEFAULT
    init.raw_data = array.tobytes()


def write_back_initializers(
    original: onnx.ModelProto,
    state_dict: Mapping[str, torch.Tensor],
    *,
    extra: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of ``original`` whose initializers hold the trained values of ``state_dict``.

    Keys are matched through :func:`torch_name`; keys that name no initializer (the new
    activations' parameters, constant buffers) are ignored. Every written initializer keeps its
    name, type and shape (a value of another shape raises :class:`BadInputError`); the graph,
    inputs, outputs and opsets are untouched. ``extra`` sets initializers by ONNX name: an
    existing one is overwritten in its own type, a new name is added with the array's type.
    Written values are stored inline, also those that were in an external data file.
    ``original`` is never modified.
    """
    updated = onnx.ModelProto()
    updated.CopyFrom(original)
    by_attr = {torch_name(init.name): init for init in updated.graph.initializer}
    if len(by_attr) != len(updated.graph.initializer):
        raise BadInputError("two ONNX initializer names map to the same torch attribute name")
    for key, value in state_dict.items():
        init = by_attr.get(key)
        if init is not None:
            _set_initializer(init, value)
    by_name = {init.name: init for init in updated.graph.initializer}
    for name, array in (extra or {}).items():
        array = np.asarray(array)
        if name in by_name:
            _set_initializer(by_name[name], torch.from_numpy(np.array(array, copy=True)))
        else:
            updated.graph.initializer.append(numpy_helper.from_array(array, name))
    return updated
