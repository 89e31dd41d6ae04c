"""The entry point: find a dataset's format from its path and first bytes, and read it."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

from retrofit.errors import BadInputError, UsageError
from retrofit.evaluation.datasets.arrays import read_npz, read_pt, tensor_dataset
from retrofit.evaluation.datasets.base import ClassificationData
from retrofit.evaluation.datasets.csv_text import read_csv
from retrofit.evaluation.datasets.images import load_image_folder


def load_dataset(
    path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    crop_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    label_column: str | None = None,
    channels: int | None = None,
) -> ClassificationData:
    """Read a labelled dataset; the format is found from the path and the file's content.

    - A folder of class sub-folders: images read with Pillow. Without sizes the images keep
      their native size (all must then share one size). ``image_size`` resizes the shorter side
      (bilinear, antialiased) and, unless ``crop_size`` is given, centre-crops a square of that
      size; ``crop_size`` centre-crops (after the resize, if any). Pixels are scaled to [0, 1].
      ``channels`` is 1 (grayscale) or 3 (RGB); by default 1 when the first image of every class
      is grayscale, else 3.
    - ``.npz`` with arrays ``x`` and ``y`` (never unpickled); ``.pt`` holding a dict
      ``{"x": tensor, "y": tensor}`` (read with ``weights_only=True``). Float ``x`` is used as
      stored; integer ``x`` is held as stored until the model's input type is known:
      :func:`~retrofit.evaluation.datasets.feeding.as_token_ids` (ids) or
      :func:`~retrofit.evaluation.datasets.feeding.as_float_inputs` (uint8 pixels scaled to
      [0, 1]).
    - CSV with a header row: the label column is ``label_column``, else a column named
      label/target/class/y, else the last one; every other column is a float feature.
      Numeric labels are class indices.

    Class names (folder names, text labels) become indices by
    :func:`~retrofit.evaluation.datasets.names.class_names`: integer names are their own index,
    other names are sorted.

    ``mean``/``std`` (one value, or one per channel: the sample's first axis) normalise
    ``(x - mean) / std``, after pixels are scaled to [0, 1]. They default to 0 and 1, i.e. no
    normalisation: the tool cannot know how a model was trained, and a silent ImageNet guess
    would hide that. Every choice, defaults included, is recorded in ``dataset.preprocessing``.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"data path {path} does not exist")
    if channels not in (None, 1, 3):
        raise UsageError(f"channels must be 1 or 3, got {channels}")
    for name, size in (("image_size", image_size), ("crop_size", crop_size)):
        if size is not None and size < 1:
            raise UsageError(f"{name} must be a positive number of pixels, got {size}")
    if image_size is not None and crop_size is not None and crop_size > image_size:
        raise UsageError(f"crop_size {crop_size} is larger than image_size {image_size}")

    if path.is_dir():
        if label_column is not None:
            raise UsageError("a label column applies to CSV data, not to an image folder")
        return load_image_folder(path, image_size, crop_size, mean, std, channels)

    image_options = (("image_size", image_size), ("crop_size", crop_size), ("channels", channels))
    for name, value in image_options:
        if value is not None:
            raise UsageError(f"{name} applies to image folders, not to {path.name}")
    kind = _detect_file_format(path)
    if label_column is not None and kind != "csv":
        raise UsageError(f"a label column applies to CSV data, not to {path.name}")
    if kind == "npz":
        x, y, classes, info = read_npz(path)
    elif kind == "pt":
        x, y, classes, info = read_pt(path)
    else:
        x, y, classes, info = read_csv(path, label_column)
    return tensor_dataset(path, x, y, classes, info, mean, std)


def _detect_file_format(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise BadInputError(f"cannot read {path}: {error.strerror or error}") from error
    suffix = path.suffix.lower()
    if not head:
        raise BadInputError(f"{path} is empty")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise BadInputError(
                f"{path} is damaged or truncated (not a complete zip archive)"
            ) from error
        if any(name.endswith(".npy") for name in names):
            return "npz"
        if any(name.endswith("data.pkl") for name in names):
            return "pt"
        raise BadInputError(
            f"{path} is a zip archive but neither .npz arrays nor a torch.save file"
        )
    if head.startswith(b"\x93NUMPY"):
        raise BadInputError(
            f"{path} is a single .npy array and has no labels; save x and y with numpy.savez"
        )
    if head[:1] == b"\x80":  # a pickle protocol header: torch.save's legacy format
        return "pt"
    if suffix in (".npz", ".pt", ".pth"):
        raise BadInputError(f"{path} is not a valid {suffix} file (unexpected content)")
    if suffix in (".csv", ".tsv", ".txt") or _looks_like_text(path):
        return "csv"
    raise BadInputError(
        f"cannot tell the data format of {path}: expected an image folder, .npz, .pt or .csv"
    )


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as handle:
        sample = handle.read(4096)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in sample
