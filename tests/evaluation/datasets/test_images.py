"""retrofit.evaluation.datasets.images: class folders load lazily; sizes, channels and broken
images are one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrofit.errors import BadInputError, UsageError
from retrofit.evaluation.datasets.base import ClassificationData
from retrofit.evaluation.datasets.load import load_dataset
from tests.evaluation.datasets.conftest import save_png


def test_image_folder_maps_sorted_class_folders_to_indices(image_folder: Path) -> None:
    data = load_dataset(image_folder)
    assert isinstance(data, ClassificationData)
    assert data.classes is not None and data.classes.sorted_names
    assert data.classes.index == {"cat": 0, "dog": 1, "emu": 2}
    assert data.num_classes == 3
    assert len(data) == 6
    assert data.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.sample_shape == (3, 6, 8)
    assert data.preprocessing["skipped_files"] == 1
    x, y = data[3]
    assert x.dtype == torch.float32 and x.shape == (3, 6, 8)
    assert y == 1
    assert torch.allclose(x, torch.full((3, 6, 8), 60 / 255))


def test_image_folder_default_is_unnormalised_and_recorded(image_folder: Path) -> None:
    data = load_dataset(image_folder)
    assert data.preprocessing["mean"] == [0.0, 0.0, 0.0]
    assert data.preprocessing["std"] == [1.0, 1.0, 1.0]
    assert data.preprocessing["image_size"] is None


def test_image_folder_resizes_crops_and_normalises(image_folder: Path) -> None:
    data = load_dataset(image_folder, image_size=4, mean=[0.5], std=[0.25])
    x, _ = data[5]
    assert data.sample_shape == (3, 4, 4) and x.shape == (3, 4, 4)
    assert torch.allclose(x, torch.full((3, 4, 4), (110 / 255 - 0.5) / 0.25), atol=1e-6)
    assert data.preprocessing["crop_size"] == 4
    cropped = load_dataset(image_folder, crop_size=5)
    assert cropped[0][0].shape == (3, 5, 5)


def test_resize_uses_the_shorter_side_before_the_centre_crop(tmp_path: Path) -> None:
    ramp = np.tile((np.arange(8) * 32).astype(np.uint8), (4, 1))  # 4 high, 8 wide
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(ramp, mode="L").save(tmp_path / name / "0.png")
    x, _ = load_dataset(tmp_path, image_size=2)[0]
    # resized to 2x4 (bilinear, antialiased: 23, 80, 144, 201), then the middle 2x2
    assert x.shape == (1, 2, 2)
    assert torch.allclose(x[0, 0] * 255, torch.tensor([80.0, 144.0]), atol=1.0)


def test_grayscale_folder_gets_one_channel(tmp_path: Path) -> None:
    for name in ("a", "b"):
        save_png(tmp_path / name / "0.png", 100, mode="L")
    data = load_dataset(tmp_path)
    assert data.sample_shape == (1, 6, 8)
    assert data[1][0].shape == (1, 6, 8)


def test_broken_image_names_the_file(image_folder: Path) -> None:
    (image_folder / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data = load_dataset(image_folder)
    with pytest.raises(BadInputError, match=r"dog/1\.png"):
        data[3]


def test_truncated_image_names_the_file(image_folder: Path) -> None:
    path = image_folder / "emu" / "0.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:400])
    data = load_dataset(image_folder)
    with pytest.raises(BadInputError, match=r"emu/0\.png"):
        data[4]


def test_image_of_another_size_names_the_file(image_folder: Path) -> None:
    save_png(image_folder / "emu" / "1.png", 0, size=(9, 9))
    data = load_dataset(image_folder)
    with pytest.raises(BadInputError, match=r"emu/1\.png is 9x9"):
        data[5]


def test_empty_class_folder_is_named(image_folder: Path) -> None:
    (image_folder / "fox").mkdir()
    with pytest.raises(BadInputError, match=r"class folder .*fox holds no images"):
        load_dataset(image_folder)


def test_folder_without_class_folders_is_refused(tmp_path: Path) -> None:
    save_png(tmp_path / "loose.png", 0)
    with pytest.raises(BadInputError, match="no class sub-folders"):
        load_dataset(tmp_path)


def test_missing_path_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_crop_larger_than_resize_is_a_usage_error(image_folder: Path) -> None:
    with pytest.raises(UsageError):
        load_dataset(image_folder, image_size=4, crop_size=8)
