"""Samples held as arrays: ``.npz`` and ``.pt`` files, and the checks every in-memory dataset
(CSV included) passes before it becomes a :class:`TensorClassificationData`."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retrofit.errors import BadInputError, first_line
from retrofit.evaluation.datasets.base import TensorClassificationData
from retrofit.evaluation.datasets.names import ClassNames, indices_of_names
from retrofit.evaluation.datasets.normalise import normalisation


def read_npz(path: Path) -> tuple[Tensor, np.ndarray, ClassNames | None, dict[str, Any]]:
    """``x``, class indices, class names (text labels) and what the report records, from
    arrays ``x`` and ``y``; never unpickled, since an object array could run code."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BadInputError(f"cannot read {path}: {first_line(error)}") from error
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise BadInputError(
                f"{path} lacks array {' and '.join(missing)} (found: "
                f"{', '.join(archive.files) or 'nothing'}); "
                "save with numpy.savez(path, x=..., y=...)"
            )
        arrays = {}
        for key in ("x", "y"):
            try:
                arrays[key] = archive[key]
            except ValueError as error:
                if "allow_pickle" in str(error):
                    raise BadInputError(
                        f"array {key} in {path} is a pickled object array, which is never "
                        "loaded (it could run code); save plain numeric arrays"
                    ) from error
                raise BadInputError(
                    f"cannot read array {key} in {path}: {first_line(error)}"
                ) from error
            except (OSError, EOFError, zipfile.BadZipFile) as error:
                raise BadInputError(
                    f"cannot read array {key} in {path} (damaged or truncated): "
                    f"{first_line(error)}"
                ) from error
    x_array = arrays["x"]
    if x_array.dtype.kind not in "biuf":
        raise BadInputError(f"x in {path} holds {x_array.dtype} values; it must be numeric")
    x = torch.from_numpy(np.ascontiguousarray(x_array))
    y, classes = _labels_from_array(arrays["y"], path)
    return x, y, classes, {"format": "npz", "stored_dtype": str(x_array.dtype)}


def read_pt(path: Path) -> tuple[Tensor, np.ndarray, ClassNames | None, dict[str, Any]]:
    """As :func:`read_npz`, from a ``torch.save`` dict ``{"x": tensor, "y": tensor}`` read
    with ``weights_only=True``, so that no pickled code runs."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise BadInputError(
            f"{path} holds objects other than tensors and is not unpickled; save a dict "
            "{'x': tensor, 'y': tensor}"
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise BadInputError(
            f"cannot read {path} (damaged or truncated?): {first_line(error)}"
        ) from error
    if not isinstance(data, dict):
        raise BadInputError(f"{path} holds a {type(data).__name__}; expected a dict with x and y")
    missing = [key for key in ("x", "y") if key not in data]
    if missing:
        found = ", ".join(str(k) for k in data) or "nothing"
        raise BadInputError(f"{path} lacks {' and '.join(missing)} (found: {found})")
    x, y = data["x"], data["y"]
    for key, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise BadInputError(f"{key} in {path} is a {type(value).__name__}, not a tensor")
    if x.is_complex() or not (x.is_floating_point() or x.dtype in _INT_DTYPES):
        raise BadInputError(f"x in {path} holds {x.dtype} values; it must be real numbers")
    if not (y.is_floating_point() or y.dtype in _INT_DTYPES):
        raise BadInputError(f"y in {path} holds {y.dtype} values; it must be class indices")
    y_wide = y.detach().to(torch.float64 if y.is_floating_point() else torch.int64)
    y_array, classes = _labels_from_array(y_wide.numpy(), path)
    info = {"format": "pt", "stored_dtype": str(x.dtype).replace("torch.", "")}
    return x.detach(), y_array, classes, info


_INT_DTYPES = frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
     torch.uint32, torch.uint64}
)


def _labels_from_array(y: np.ndarray, path: Path) -> tuple[np.ndarray, ClassNames | None]:
    """Class indices (int64) from a label array; text labels are class names."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise BadInputError(
            f"y in {path} has shape {tuple(y.shape)}; it must hold one class index per sample"
            + (" (one-hot? store the argmax)" if y.ndim == 2 else "")
        )
    if y.dtype.kind == "S":
        try:
            y = np.char.decode(y, "utf-8")
        except UnicodeDecodeError as error:
            raise BadInputError(f"y in {path} holds bytes that are not UTF-8 text: "
                                f"{error.reason}") from error
    if y.dtype.kind == "U":
        return indices_of_names([str(v) for v in y], str(path))
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            raise BadInputError(
                f"label of sample {bad[0]} in {path} is {y[bad[0]]!r}, not an integer class index"
            )
    elif y.dtype.kind not in "biu":
        raise BadInputError(f"y in {path} holds {y.dtype} values; it must be class indices")
    y = y.astype(np.int64)
    negative = np.flatnonzero(y < 0)
    if negative.size:
        raise BadInputError(
            f"label of sample {negative[0]} in {path} is {y[negative[0]]}; labels must be >= 0"
        )
    return y, None


def tensor_dataset(
    path: Path,
    x: Tensor,
    y: np.ndarray,
    classes: ClassNames | None,
    info: dict[str, Any],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> TensorClassificationData:
    """The dataset of samples read into memory, checked once (shape, count, NaN/Inf) so that
    no bad sample surfaces mid-training; float ``x`` becomes float32, integers stay as stored."""
    if x.ndim < 2:
        raise BadInputError(
            f"x in {path} has shape {tuple(x.shape)}; it must be (samples, ...) with at least "
            "one feature axis"
        )
    if x.shape[0] != y.shape[0]:
        raise BadInputError(f"{path} has {x.shape[0]} samples in x but {y.shape[0]} labels in y")
    if x.shape[0] == 0:
        raise BadInputError(f"{path} holds no samples")
    if x.is_floating_point():
        x = x.to(torch.float32).contiguous()
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            first = int(torch.nonzero(~finite)[0, 0])
            raise BadInputError(f"sample {first} in {path} contains NaN or Inf")
    else:  # integers stay as stored until the model says how it takes them
        x = x.contiguous()
    normalise = mean is not None or std is not None
    mean_values, std_values = (normalisation(mean, std, x.shape[1], str(path)) if normalise
                               else ([0.0], [1.0]))
    preprocessing = {
        **info,
        "samples": int(x.shape[0]),
        "values": "as stored, as float32",
        "mean": mean_values,
        "std": std_values,
    }
    if normalise:
        preprocessing["normalised"] = True
    if classes is not None:
        preprocessing["labels"] = classes.rule
    return TensorClassificationData(
        x,
        torch.from_numpy(y),
        source=str(path),
        preprocessing=preprocessing,
        classes=classes,
        mean=mean_values if normalise else None,
        std=std_values if normalise else None,
    )

