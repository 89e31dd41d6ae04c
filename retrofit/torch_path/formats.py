"""Which kind of PyTorch model file this is, told from its bytes, and what a loaded one carries.

The suffix only breaks ties: people save pickled modules as ``.pth``, state dicts as ``.bin`` and
programs under any name, so the content decides (:func:`detect_format`).
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit.errors import BadInputError, first_line
from retrofit.torch_path.record import RetrofitRecord


class ModelFormat(str, Enum):
    """How a model is stored; the value is what reports and ``--format`` use."""

    EXPORTED = "pt2"
    STATE_DICT = "state-dict"
    SAFETENSORS = "safetensors"
    PICKLED_MODULE = "pickled-module"
    ONNX = "onnx"



@dataclass
class TorchModel:
    """A loaded PyTorch model and what is needed to save it back in its format.

    ``example_inputs`` come from the file where the format keeps them (``.pt2``); otherwise
    from the caller (``--input-shape`` or a dataset). ``dynamic_dims`` lists, per input, the
    axes that were dynamic in the exported program so a re-export keeps them dynamic.
    ``record`` is the retrofit history a weights file carried (None for a plain file), and
    ``notes`` what loading changed that the user must hear (a module saved in training mode,
    the package imported to read its output types).
    ``program`` is the loaded ``torch.export`` program (``.pt2`` only), for a re-export with a
    dynamic batch (:func:`retrofit.evaluation.batching.reexport_dynamic_batch`).
    """

    module: nn.Module
    format: ModelFormat
    path: Path
    example_inputs: tuple[torch.Tensor, ...] | None = None
    dynamic_dims: tuple[tuple[int, ...], ...] | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    record: RetrofitRecord | None = None
    notes: list[str] = field(default_factory=list)
    program: Any = None



_PICKLE_PROTOCOL_OPS = {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}



def detect_format(path: Path) -> ModelFormat:
    """Tell the format from the bytes of the file, the suffix only breaking ties.

    A zip archive is a ``torch.export`` program when it holds export's ``archive_format``
    record, else a ``torch.save`` file; a safetensors file starts with its JSON header length;
    anything else that parses as an ONNX ``ModelProto`` is ONNX.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise BadInputError(f"{path}: the file is empty")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise BadInputError(f"{path}: damaged zip archive ({error})") from error
        if any(name.endswith("archive_format") for name in names):
            return ModelFormat.EXPORTED
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            raise BadInputError(
                f"{path} is TorchScript (torch.jit.save), whose compiled code cadrelu cannot "
                "rewrite site by site; it reads torch.export programs, state dicts, pickled "
                "modules and ONNX. From the model's Python code, save "
                "torch.export.export(model, example_inputs) with torch.export.save as .pt2, or "
                "torch.save(model.state_dict()) and pass --arch"
            )
        if any(name.endswith("data.pkl") for name in names):
            return _torch_save_kind(path)
        raise BadInputError(f"{path}: a zip archive that is neither torch.save nor torch.export")
    if head[:4] == b"PK\x03\x04":
        raise BadInputError(f"{path}: truncated or damaged zip archive (torch file?)")
    if _looks_like_safetensors(head, size):
        return ModelFormat.SAFETENSORS
    if head[:2] in _PICKLE_PROTOCOL_OPS:
        return _torch_save_kind(path)
    if _looks_like_onnx(path):
        return ModelFormat.ONNX
    raise BadInputError(
        f"{path}: not a model file cadrelu can read (expected .pt2, torch.save, safetensors "
        "or ONNX content; a truncated or damaged file reads like this too)"
    )



def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return 0 < header_length <= size - 8 and head[8:9] == b"{"



def _looks_like_onnx(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises several types for bytes that are not a ModelProto
        return False
    return model.HasField("graph") and (model.ir_version > 0 or len(model.opset_import) > 0)



def _torch_save_kind(path: Path) -> ModelFormat:
    """A ``torch.save`` file holds tensors only (a state dict) or pickled objects (a module).

    ``weights_only`` loading tells them apart without running the file's code.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return ModelFormat.PICKLED_MODULE
    except Exception as error:
        raise BadInputError(f"{path}: cannot read this torch.save file ({first_line(error)})") from error
    return ModelFormat.STATE_DICT



def default_output_path(path: Path, activation: str, model_format: ModelFormat) -> Path:
    """``model.pt2`` → ``model.carelu.pt2``: beside the input, never over it."""
    suffix = path.suffix or {
        ModelFormat.EXPORTED: ".pt2", ModelFormat.ONNX: ".onnx",
        ModelFormat.SAFETENSORS: ".safetensors",
    }.get(model_format, ".pt")
    return path.with_name(f"{path.stem}.{activation}{suffix}")


TRAINING_MODE_NOTE = (
    "the model was saved in training mode; it is verified, scored and written in eval mode "
    "(BatchNorm uses its running statistics, Dropout is off)"
)
