"""Labelled classification datasets read from an image folder, ``.npz``, ``.pt`` or CSV.

:func:`load_dataset` finds the format from the path and the file's first bytes, checks the data
once (labels, shapes, NaN/Inf) and returns a :class:`ClassificationData`: a map-style torch
``Dataset`` of ``(float32 tensor, int label)`` pairs that also says how many classes there are,
where the data came from and how it was preprocessed, so the report can show it.

Anything wrong with the data raises :class:`~retrofit.errors.BadInputError` with one line that
names the file, the row or the sample index. Image folders are decoded lazily, one image per
item, so a broken image is reported (by file name) when it is first read; tensor files and CSV
are read and checked in full when loaded.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from retrofit.errors import BadInputError, UsageError, first_line

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
"""File suffixes (lower case) read as images inside class folders; other files are skipped."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The usual torchvision/timm normalisation, for callers whose model was trained with it."""

LABEL_COLUMN_NAMES = ("label", "target", "class", "y")
"""CSV header names (any case) taken as the label column when none is named; else the last."""

_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_CHANNEL_PROBE_LIMIT = 16
_INTEGER_NAME = re.compile(r"[0-9]+")
_PREVIEW_NAMES = 3


@dataclass(frozen=True)
class ClassNames:
    """How class names (folder names, text labels) became class indices: ``index[name]``.

    Names that are all integers ("3", "7") are their own indices, so folders named after some
    classes of a larger model keep their meaning. Other names (cat/dog, ImageNet wnids, a mix
    of numbers and words) are sorted into 0..n-1, torchvision's ``ImageFolder`` order: a guess
    that can only be right for a model with n outputs (:func:`check_labels_fit` refuses the
    rest). ``index`` is ordered by class index.
    """

    index: dict[str, int]
    sorted_names: bool

    @property
    def rule(self) -> str:
        """The rule in words, for the report."""
        return "names sorted into class indices" if self.sorted_names else "names are class indices"


def class_names(names: Iterable[str], source: str) -> ClassNames:
    """The class index of every distinct name (see :class:`ClassNames`)."""
    distinct = sorted(set(names))
    if not all(_INTEGER_NAME.fullmatch(name) for name in distinct):
        return ClassNames({name: i for i, name in enumerate(distinct)}, sorted_names=True)
    index: dict[str, int] = {}
    for name in sorted(distinct, key=int):
        twin = next((other for other, value in index.items() if value == int(name)), None)
        if twin is not None:
            raise BadInputError(f"class names {twin} and {name} in {source} both mean class "
                                f"{int(name)}; keep one of them")
        index[name] = int(name)
    return ClassNames(index, sorted_names=False)


def shown_name(name: str) -> str:
    """A class name as it reads unambiguously in a comma-separated, one-line list: quoted
    (``repr``) when it is empty, has edge spaces, unprintable characters or list marks."""
    plain = bool(name) and name.isprintable() and name.strip() == name and not any(
        mark in name for mark in (",", "→", "…", "'", '"'))
    return name if plain else repr(name)


def _preview(names: Sequence[str]) -> str:
    shown = ", ".join(shown_name(name) for name in names[:_PREVIEW_NAMES])
    return shown + (f" and {len(names) - _PREVIEW_NAMES} more" if len(names) > _PREVIEW_NAMES else "")


class ClassificationData(Dataset):
    """A labelled dataset: ``dataset[i] -> (x, y)`` with ``x`` a float32 tensor of
    ``sample_shape`` (int64 token ids after :func:`as_token_ids`) and ``y`` an ``int`` class
    index in ``[0, num_classes)``.

    Attributes the caller may rely on:

    - ``num_classes``: one more than the largest label.
    - ``classes``: how class names became indices (image folders, text labels), else None.
    - ``source``: the path the data was read from, for messages and the report.
    - ``preprocessing``: a JSON-friendly dict of what was done to the raw data.
    - ``notes``: what the user must hear about how the samples are fed (uint8 scaling).
    - ``sample_shape``: the shape of one ``x``.
    - ``targets``: every label as an int64 tensor, in dataset order, without decoding samples.
    """

    num_classes: int
    classes: ClassNames | None = None
    notes: tuple[str, ...] = ()
    source: str
    preprocessing: dict[str, Any]
    sample_shape: tuple[int, ...]

    @property
    def targets(self) -> Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, sample_shape={self.sample_shape})"
        )


class TensorClassificationData(ClassificationData):
    """Samples held in memory (``.npz``, ``.pt``, CSV), already checked.

    ``x`` is kept as stored: floats, or integers until the model says how it takes them
    (:func:`as_token_ids`, :func:`as_float_inputs`). Each sample is handed out as
    ``feed_dtype``; as float32 it is ``(x / divisor - mean) / std``, per channel (the sample's
    first axis), in the order image folders use, computed per sample so that uint8 data stays
    uint8 in memory.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        source: str,
        preprocessing: dict[str, Any],
        classes: ClassNames | None = None,
        feed_dtype: torch.dtype = torch.float32,
        divisor: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.x = x
        self.y = y
        self.source = source
        self.preprocessing = preprocessing
        self.classes = classes
        self.feed_dtype = feed_dtype
        self.divisor = divisor
        self.mean = mean
        self.std = std
        self.notes = notes
        self.num_classes = int(y.max()) + 1
        self.sample_shape = tuple(x.shape[1:])
        per_channel = (-1,) + (1,) * (x.ndim - 2)
        self._mean = None if mean is None else torch.tensor(mean).view(per_channel)
        self._std = None if std is None else torch.tensor(std).view(per_channel)

    def replaced(self, **changes: Any) -> TensorClassificationData:
        """The same samples with some constructor arguments changed."""
        fields = {"source": self.source, "preprocessing": self.preprocessing,
                  "classes": self.classes, "feed_dtype": self.feed_dtype, "divisor": self.divisor,
                  "mean": self.mean, "std": self.std, "notes": self.notes}
        return TensorClassificationData(self.x, self.y, **{**fields, **changes})

    @property
    def targets(self) -> Tensor:
        return self.y

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.x[index].to(self.feed_dtype)
        if self.feed_dtype == torch.float32:
            if self.divisor is not None:
                sample = sample / self.divisor
            if self._mean is not None and self._std is not None:
                sample = (sample - self._mean) / self._std
        return sample, int(self.y[index])


class ImageFolderData(ClassificationData):
    """Images in one sub-folder per class, decoded with Pillow when an item is read.

    Class indices come from the sub-folder names (:class:`ClassNames`): integer names are
    their own indices, other names are sorted as strings (the order torchvision's
    ``ImageFolder`` uses, so a model trained with it sees the same indices).
    """

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        *,
        classes: ClassNames,
        source: str,
        channels: int,
        image_size: int | None,
        crop_size: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        sample_shape: tuple[int, ...],
        preprocessing: dict[str, Any],
    ) -> None:
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.classes = classes
        self.num_classes = int(self.labels.max()) + 1
        self.source = source
        self.channels = channels
        self.image_size = image_size
        self.crop_size = crop_size
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.sample_shape = sample_shape
        self.preprocessing = preprocessing

    @property
    def targets(self) -> Tensor:
        return self.labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.files[index]
        with _open_image(path, load=True) as decoded:
            image = decoded.convert("L" if self.channels == 1 else "RGB")
        if self.image_size is not None:
            image = _resize_shorter_side(image, self.image_size)
        if self.crop_size is not None:
            image = _center_crop(image, self.crop_size, path)
        array = np.array(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        if tuple(x.shape) != self.sample_shape:
            raise BadInputError(
                f"image {path} is {x.shape[2]}x{x.shape[1]} but the first image is "
                f"{self.sample_shape[2]}x{self.sample_shape[1]}; set an image/crop size to "
                "resize them to one size"
            )
        x = (x - self._mean) / self._std
        return x, int(self.labels[index])


class ClassificationSubset(ClassificationData):
    """Some samples of a :class:`ClassificationData`, in the order of ``indices``; keeps the
    parent's classes, source, preprocessing and notes."""

    def __init__(self, dataset: ClassificationData, indices: Sequence[int], *, name: str) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(list(indices), dtype=torch.int64)
        self.name = name
        self.num_classes = dataset.num_classes
        self.classes = dataset.classes
        self.source = dataset.source
        self.preprocessing = dataset.preprocessing
        self.notes = dataset.notes
        self.sample_shape = dataset.sample_shape

    @property
    def targets(self) -> Tensor:
        return self.dataset.targets[self.indices]

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.dataset[int(self.indices[index])]


# --------------------------------------------------------------------------- loading


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
      :func:`as_token_ids` (ids) or :func:`as_float_inputs` (uint8 pixels scaled to [0, 1]).
    - CSV with a header row: the label column is ``label_column``, else a column named
      label/target/class/y, else the last one; every other column is a float feature.
      Numeric labels are class indices.

    Class names (folder names, text labels) become indices by :func:`class_names`: integer
    names are their own index, other names are sorted.

    ``mean``/``std`` (one value, or one per channel: the sample's first axis) normalise
    ``(x - mean) / std``, after pixels are scaled to [0, 1]. They default to 0 and 1, i.e. no
    normalisation: the tool cannot know how a model was trained, and a silent ImageNet guess
    would hide that; pass :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD` for torchvision-style
    models. Every choice, defaults included, is recorded in ``dataset.preprocessing``.
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
        return _load_image_folder(path, image_size, crop_size, mean, std, channels)

    image_options = (("image_size", image_size), ("crop_size", crop_size), ("channels", channels))
    for name, value in image_options:
        if value is not None:
            raise UsageError(f"{name} applies to image folders, not to {path.name}")
    kind = _detect_file_format(path)
    if label_column is not None and kind != "csv":
        raise UsageError(f"a label column applies to CSV data, not to {path.name}")
    if kind == "npz":
        x, y, classes, info = _read_npz(path)
    elif kind == "pt":
        x, y, classes, info = _read_pt(path)
    else:
        x, y, classes, info = _read_csv(path, label_column)
    return _tensor_dataset(path, x, y, classes, info, mean, std)


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


# --------------------------------------------------------------------------- image folders


def _open_image(path: str, *, load: bool) -> Any:
    from PIL import Image

    try:
        image = Image.open(path)
        if load:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadInputError(f"cannot read image {path}: {first_line(error)}") from error
    return image


def _image_mode(path: str) -> str:
    with _open_image(path, load=False) as image:
        return image.mode


def _resize_shorter_side(image: Any, size: int) -> Any:
    from PIL import Image

    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new = (size, max(1, int(size * height / width)))
    else:
        new = (max(1, int(size * width / height)), size)
    return image.resize(new, Image.BILINEAR)


def _center_crop(image: Any, size: int, path: str) -> Any:
    width, height = image.size
    if width < size or height < size:
        raise BadInputError(
            f"image {path} is {width}x{height}, smaller than the crop size {size}; "
            "set an image size to resize it first"
        )
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _load_image_folder(
    root: Path,
    image_size: int | None,
    crop_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int | None,
) -> ImageFolderData:
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as error:
        raise BadInputError(f"cannot read folder {root}: {error.strerror or error}") from error
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not class_dirs:
        loose = [e for e in entries if Path(e.name).suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            raise BadInputError(
                f"{root} holds images but no class sub-folders; put each class's images in "
                "a sub-folder named after the class"
            )
        raise BadInputError(f"{root} has no class sub-folders (expected one folder per class)")

    classes = class_names((d.name for d in class_dirs), str(root))
    files: list[str] = []
    labels: list[int] = []
    first_files: list[str] = []
    skipped = 0
    for class_dir in class_dirs:
        label = classes.index[class_dir.name]
        class_files, class_skipped = _image_files(Path(class_dir.path))
        skipped += class_skipped
        if not class_files:
            raise BadInputError(f"class folder {class_dir.path} holds no images")
        first_files.append(class_files[0])
        files.extend(class_files)
        labels.extend([label] * len(class_files))

    if image_size is not None and crop_size is None:
        crop_size = image_size
    if channels is None:
        probes = first_files[:_CHANNEL_PROBE_LIMIT]
        channels = 1 if all(_image_mode(f) in _GRAYSCALE_MODES for f in probes) else 3
    if crop_size is not None:
        sample_shape: tuple[int, ...] = (channels, crop_size, crop_size)
    else:
        with _open_image(files[0], load=False) as first:
            width, height = first.size
        sample_shape = (channels, height, width)
    mean_values, std_values = _normalisation(mean, std, channels, str(root))
    _check_pixel_units(mean_values, std_values, str(root))
    preprocessing = {
        "format": "image folder",
        "images": len(files),
        "skipped_files": skipped,
        "channels": channels,
        "image_size": image_size,
        "crop_size": crop_size,
        "resize": "shorter side, bilinear" if image_size is not None else "none (native size)",
        "scale": "pixels / 255",
        "mean": mean_values,
        "std": std_values,
        "labels": classes.rule,
    }
    return ImageFolderData(
        files,
        labels,
        classes=classes,
        source=str(root),
        channels=channels,
        image_size=image_size,
        crop_size=crop_size,
        mean=mean_values,
        std=std_values,
        sample_shape=sample_shape,
        preprocessing=preprocessing,
    )


def _image_files(folder: Path) -> tuple[list[str], int]:
    """Image files under ``folder`` (recursively, sorted, hidden names skipped) and how many
    other files were skipped."""
    found: list[str] = []
    skipped = 0
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(directory, name))
            else:
                skipped += 1
    return found, skipped


def _normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int, source: str
) -> tuple[list[float], list[float]]:
    mean_values = [0.0] * channels if mean is None else [float(v) for v in mean]
    std_values = [1.0] * channels if std is None else [float(v) for v in std]
    for name, values in (("mean", mean_values), ("std", std_values)):
        if len(values) == 1:
            values *= channels
        if len(values) != channels:
            raise UsageError(
                f"{name} has {len(values)} values but samples of {source} have {channels} "
                "channels; give one value or one per channel"
            )
        if not all(math.isfinite(v) for v in values):
            raise UsageError(f"{name} must hold finite numbers, got {values}")
    if any(v == 0 for v in std_values):
        raise UsageError(f"std must not contain 0, got {std_values}")
    return mean_values, std_values


def _check_pixel_units(mean: Sequence[float], std: Sequence[float], source: str) -> None:
    """Pixels are scaled to [0, 1] before normalising: a mean outside [0, 1] or a std above 1
    cannot describe them, it was given in 0..255 units (123.675, 58.395...)."""
    if any(not 0.0 <= v <= 1.0 for v in mean) or any(v > 1.0 for v in std):
        raise UsageError(
            f"mean {list(mean)} / std {list(std)} are not in the units of {source}'s pixels, "
            "which are scaled to [0, 1] first: divide 0..255 values by 255"
        )


# --------------------------------------------------------------------------- tensor files


def _read_npz(path: Path) -> tuple[Tensor, np.ndarray, ClassNames | None, dict[str, Any]]:
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


def _read_pt(path: Path) -> tuple[Tensor, np.ndarray, ClassNames | None, dict[str, Any]]:
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
        return _indices_of_names([str(v) for v in y], str(path))
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


def _tensor_dataset(
    path: Path,
    x: Tensor,
    y: np.ndarray,
    classes: ClassNames | None,
    info: dict[str, Any],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> TensorClassificationData:
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
    mean_values, std_values = (_normalisation(mean, std, x.shape[1], str(path)) if normalise
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


# --------------------------------------------------------------------------- CSV


def _read_csv(
    path: Path, label_column: str | None
) -> tuple[Tensor, np.ndarray, ClassNames | None, dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            first_line = handle.readline()
            delimiter = max(",;\t", key=first_line.count) if first_line.strip() else ","
            handle.seek(0)
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if header is None or not any(cell.strip() for cell in header):
                raise BadInputError(f"{path} is empty; expected a header row and data rows")
            header = [cell.strip() for cell in header]
            if all(_is_number(cell) for cell in header):
                raise BadInputError(
                    f"{path} line 1 looks like data; CSV files need a header row naming the columns"
                )
            label_index = _label_column_index(header, label_column, path)
            feature_names = [name for i, name in enumerate(header) if i != label_index]
            if not feature_names:
                raise BadInputError(f"{path} has only a label column and no feature columns")
            rows, labels, lines = _csv_rows(reader, header, label_index, path)
    except UnicodeDecodeError as error:
        raise BadInputError(f"{path} is not UTF-8 text: {error.reason}") from error
    except csv.Error as error:
        raise BadInputError(f"{path} is not valid CSV: {error}") from error
    except OSError as error:
        raise BadInputError(f"cannot read {path}: {error.strerror or error}") from error
    if not rows:
        raise BadInputError(f"{path} has a header but no data rows")
    y, classes = _csv_labels(labels, lines, path)
    x = torch.tensor(rows, dtype=torch.float32)
    info = {
        "format": "csv",
        "label_column": header[label_index],
        "feature_columns": len(feature_names),
    }
    return x, y, classes, info


def _label_column_index(header: list[str], label_column: str | None, path: Path) -> int:
    if label_column is not None:
        if label_column not in header:
            raise BadInputError(
                f"{path} has no column {label_column!r} (columns: {', '.join(header)})"
            )
        return header.index(label_column)
    lowered = [name.lower() for name in header]
    for candidate in LABEL_COLUMN_NAMES:
        if candidate in lowered:
            return lowered.index(candidate)
    return len(header) - 1


def _csv_rows(
    reader: Any, header: list[str], label_index: int, path: Path
) -> tuple[list[list[float]], list[str], list[int]]:
    rows: list[list[float]] = []
    labels: list[str] = []
    lines: list[int] = []
    width = len(header)
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != width:
            raise BadInputError(
                f"{path} line {line} has {len(row)} values but the header names {width} columns"
            )
        label = row[label_index].strip()
        if not label:
            raise BadInputError(
                f"{path} line {line}: missing label in column {header[label_index]!r}"
            )
        values: list[float] = []
        for i, cell in enumerate(row):
            if i == label_index:
                continue
            try:
                value = float(cell)
            except ValueError:
                shown = cell.strip()
                what = f"{shown!r} is not a number" if shown else "is empty"
                raise BadInputError(f"{path} line {line}, column {header[i]!r}: {what}") from None
            if not math.isfinite(value):
                raise BadInputError(
                    f"{path} line {line}, column {header[i]!r}: {cell.strip()} (NaN or Inf)"
                )
            values.append(value)
        rows.append(values)
        labels.append(label)
        lines.append(line)
    return rows, labels, lines


def _csv_labels(
    labels: list[str], lines: list[int], path: Path
) -> tuple[np.ndarray, ClassNames | None]:
    """Numeric labels are class indices; if any label is text, all are class names."""
    if not all(_is_number(label) for label in labels):
        return _indices_of_names(labels, str(path))
    indices = np.empty(len(labels), dtype=np.int64)
    for i, (label, line) in enumerate(zip(labels, lines)):
        value = float(label)
        if not math.isfinite(value) or value != int(value):
            raise BadInputError(
                f"{path} line {line}: label {label!r} is not an integer class index"
            )
        if value < 0:
            raise BadInputError(
                f"{path} line {line}: label {label} is negative; labels must be >= 0"
            )
        indices[i] = int(value)
    return indices, None


def _indices_of_names(labels: list[str], source: str) -> tuple[np.ndarray, ClassNames]:
    classes = class_names(labels, source)
    return np.array([classes.index[label] for label in labels], dtype=np.int64), classes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- splits and checks


def split_train_val(
    dataset: ClassificationData, val_fraction: float = 0.2, seed: int = 0
) -> tuple[ClassificationSubset, ClassificationSubset]:
    """Split into (train, val), stratified by class, the same for the same seed.

    Each class gives ``val_fraction`` of its samples to val (rounded, largest remainders
    first, so the total is ``len * val_fraction`` rounded half up), never its last sample, so a
    class with one sample stays in train only. Both parts list their samples in dataset order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    targets = dataset.targets
    n = len(targets)
    total_val = int(math.floor(n * val_fraction + 0.5))
    if total_val < 1 or total_val > n - 1:
        raise BadInputError(
            f"{dataset.source} has {n} samples, too few to split {val_fraction:.0%} off "
            "for validation"
        )
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(targets).tolist()
    members = [torch.nonzero(targets == c).flatten() for c in classes]
    exact = [len(m) * val_fraction for m in members]
    counts = [min(int(math.floor(e)), len(m) - 1) for e, m in zip(exact, members)]
    remainder = sorted(range(len(members)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in remainder:
        if sum(counts) >= total_val:
            break
        if counts[i] + 1 <= len(members[i]) - 1:
            counts[i] += 1
    val_parts = []
    for class_members, count in zip(members, counts):
        order = torch.randperm(len(class_members), generator=generator)
        val_parts.append(class_members[order[:count]])
    is_val = torch.zeros(n, dtype=torch.bool)
    if val_parts:
        is_val[torch.cat(val_parts)] = True
    train_indices = torch.nonzero(~is_val).flatten().tolist()
    val_indices = torch.nonzero(is_val).flatten().tolist()
    return (
        ClassificationSubset(dataset, train_indices, name="train"),
        ClassificationSubset(dataset, val_indices, name="val"),
    )


def check_labels_fit(dataset: ClassificationData, num_outputs: int) -> None:
    """Raise BadInputError when a label has no model output to match it, or when class names
    were sorted into indices for a model with another number of outputs: that mapping is then
    a guess, and the scores it gives mean nothing."""
    classes = getattr(dataset, "classes", None)  # duck-typed datasets may have no names
    if classes is not None and classes.sorted_names and len(classes.index) != num_outputs:
        names = list(classes.index)
        raise BadInputError(
            f"{dataset.source} names {len(names)} classes ({_preview(names)}), sorted into "
            f"indices 0 to {len(names) - 1}, but the model has {num_outputs} outputs, so which "
            f"output each name stands for is a guess: name the classes by their index "
            f"(0 to {num_outputs - 1})"
        )
    targets = dataset.targets
    if len(targets) == 0:
        return
    highest = int(targets.max())
    if highest >= num_outputs:
        named = " (integer class names are their own index)" if classes is not None else ""
        raise BadInputError(
            f"labels in {dataset.source} go up to {highest} but the model has {num_outputs} "
            f"outputs{named}"
        )


def check_same_classes(val: ClassificationData, train: ClassificationData) -> None:
    """Sorted names index each dataset on its own: when validation and training data name
    different classes, one name would stand for two indices, so that is refused."""
    a, b = val.classes, train.classes
    if a is None or b is None or a.index == b.index or not (a.sorted_names or b.sorted_names):
        return
    only = [(sorted(set(one.index) - set(other.index)), source)
            for one, other, source in ((a, b, val.source), (b, a, train.source))]
    detail = "; ".join(f"{_preview(names)} only in {source}" for names, source in only if names)
    raise BadInputError(
        f"{val.source} and {train.source} name different classes "
        f"({detail or 'the same names, read as different indices'}), so their indices would "
        "not match: give both the same class names, or name the classes by their index"
    )


def _on_tensors(dataset: ClassificationData,
                change: Callable[[ClassificationData], ClassificationData]) -> ClassificationData:
    """``change`` applied to the dataset that holds the samples (a subset's parent)."""
    if isinstance(dataset, ClassificationSubset):
        return ClassificationSubset(_on_tensors(dataset.dataset, change),
                                    dataset.indices.tolist(), name=dataset.name)
    return change(dataset)


def as_token_ids(dataset: ClassificationData) -> ClassificationData:
    """The same samples handed out as int64, for a model that takes integer inputs (token ids).

    Only integer data qualifies: float values (or integers normalised with mean/std, which only
    apply to float inputs) would be truncated into wrong ids, so they are refused in one line.
    """
    return _on_tensors(dataset, _token_ids)


def _token_ids(dataset: ClassificationData) -> ClassificationData:
    preprocessing = dataset.preprocessing
    if preprocessing.get("normalised"):
        raise UsageError(f"--mean/--std apply to float inputs, but the model takes integer token "
                         f"ids: leave them out for {dataset.source}")
    if not isinstance(dataset, TensorClassificationData) or dataset.x.is_floating_point():
        stored = preprocessing.get("stored_dtype", "float")
        raise BadInputError(f"{dataset.source} holds {stored} values but the model takes integer "
                            "inputs (token ids): store x as integers (int64)")
    return dataset.replaced(feed_dtype=torch.int64, preprocessing={
        **preprocessing, "values": "as stored, as int64 (token ids)"})


def as_float_inputs(dataset: ClassificationData) -> ClassificationData:
    """The samples as a model with float inputs takes them: float32.

    Float and bool ``x`` are fed as stored (bool as 0 and 1). uint8 ``x`` are pixels: scaled
    to [0, 1] (/255) before mean/std, as image folders are, and a note says so. Other integer
    types have no such convention (16-bit images? counts?): they are refused in one line rather
    than fed in a scale the model may not expect.
    """
    return _on_tensors(dataset, _float_inputs)


def _float_inputs(dataset: ClassificationData) -> ClassificationData:
    if not isinstance(dataset, TensorClassificationData) or dataset.x.is_floating_point() or (
            dataset.x.dtype == torch.bool):
        return dataset
    stored = str(dataset.x.dtype).replace("torch.", "")
    if dataset.x.dtype != torch.uint8:
        raise BadInputError(
            f"x in {dataset.source} holds {stored} values but the model takes floats, and only "
            "uint8 has a rule (pixels, scaled to [0, 1]): store x as float32, in the scale the "
            "model was trained on"
        )
    normalised = dataset.mean is not None and dataset.std is not None
    if normalised:
        _check_pixel_units(dataset.mean, dataset.std, dataset.source)  # type: ignore[arg-type]
    note = (f"x in {dataset.source} is uint8: fed as pixels scaled to [0, 1] (/255)"
            f"{', then normalised with mean/std' if normalised else ''}, as image folders are; "
            "store x as float32 to feed other values")
    return dataset.replaced(
        divisor=255.0, notes=(*dataset.notes, note),
        preprocessing={**dataset.preprocessing, "values": "uint8 pixels / 255, as float32",
                       "scale": "pixels / 255"})


def model_input_error(error: BaseException, sample_shape: Sequence[int]) -> BadInputError:
    """The one-line error for data that the model cannot take (wrong shape, channels, rank)."""
    return BadInputError(
        f"data samples of shape {tuple(sample_shape)} do not fit the model: "
        f"{first_line(error)}"
    )


MODEL_CALL_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError, ValueError, AssertionError, IndexError)
"""What a model call raises when its input does not fit (``AssertionError``: a torch.export
guard such as a fixed batch size; ``IndexError``: a token id beyond an embedding table)."""


def check_input_fits(forward: Callable[[Tensor], Tensor], sample: Tensor) -> Tensor:
    """Run ``forward`` on one sample (batch of 1) and return its output; a shape problem becomes
    a one-line BadInputError naming the sample shape. Out-of-memory errors pass through."""
    try:
        return forward(sample.unsqueeze(0))
    except torch.OutOfMemoryError:
        raise
    except MODEL_CALL_ERRORS as error:
        raise model_input_error(error, sample.shape) from error
