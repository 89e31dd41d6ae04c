"""Image folders: one sub-folder per class, images decoded with Pillow when an item is read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retrofit.errors import BadInputError, first_line
from retrofit.evaluation.datasets.base import ClassificationData
from retrofit.evaluation.datasets.names import ClassNames, class_names
from retrofit.evaluation.datasets.normalise import check_pixel_units, normalisation

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
"""File suffixes (lower case) read as images inside class folders; other files are skipped."""

_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_CHANNEL_PROBE_LIMIT = 16


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


def load_image_folder(
    root: Path,
    image_size: int | None,
    crop_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int | None,
) -> ImageFolderData:
    """The image folder at ``root`` (see :func:`~retrofit.evaluation.datasets.load.load_dataset`);
    only the file list is read now, and the first images' size and mode."""
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
    mean_values, std_values = normalisation(mean, std, channels, str(root))
    check_pixel_units(mean_values, std_values, str(root))
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
