"""The one way cadrelu opens an onnxruntime session: for parity runs and for evaluation alike.

Both need the same things, so they get them from here: the CPU provider unless CUDA is asked
for and this onnxruntime build has it; a model over the 2 GiB protobuf limit handed over as a
file with external data (onnxruntime cannot take it as bytes); onnxruntime's own log off below
errors, because the caller reports a failure once, in one line; and a model onnxruntime refuses
as a project error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import onnx

from retrofit.errors import BadInputError, UnsupportedModelError, first_line
from retrofit.onnx_path.io import fits_one_protobuf, save_onnx

if TYPE_CHECKING:
    import onnxruntime

ModelSource = Union[onnx.ModelProto, bytes, str, os.PathLike]
"""A model in memory, its serialized bytes, or an ONNX file (its external data beside it)."""

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


def onnxruntime_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises (its pybind classes derive from ``Exception``
    only, so nothing narrower catches them all)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = [value for value in vars(state).values()
             if isinstance(value, type) and issubclass(value, Exception)]
    return (*found, RuntimeError)


def inference_session(
    model: ModelSource, *, cuda: bool = False, providers: Sequence[str] | None = None
) -> onnxruntime.InferenceSession:
    """An onnxruntime session for ``model``.

    ``providers`` is used as given; without it the session runs on CUDA (falling back to the
    CPU per op) when ``cuda`` is asked for and onnxruntime has it, else on the CPU. Raises
    :class:`UnsupportedModelError` when onnxruntime has no kernel for an op of the model and
    :class:`BadInputError` when it cannot load the model, each with one line.
    """
    import onnxruntime

    if providers is None:
        available = onnxruntime.get_available_providers()
        providers = [_CUDA, _CPU] if cuda and _CUDA in available else [_CPU]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the caller says what failed
    try:
        if not isinstance(model, onnx.ModelProto):
            source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else bytes(model)
            return onnxruntime.InferenceSession(source, options, providers=list(providers))
        if fits_one_protobuf(model):
            return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                providers=list(providers))
        with tempfile.TemporaryDirectory(prefix="cadrelu-ort-") as folder:
            target = save_onnx(model, Path(folder) / "model.onnx", external_data=True)
            return onnxruntime.InferenceSession(os.fspath(target), options,
                                                providers=list(providers))
    except onnxruntime_errors() as error:
        if "NOT_IMPLEMENTED" in str(error) or type(error).__name__ == "NotImplemented":
            raise UnsupportedModelError(
                f"onnxruntime cannot run the model: {first_line(error)}") from error
        raise BadInputError(f"onnxruntime cannot load the model: {first_line(error)}") from error
