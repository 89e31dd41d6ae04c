"""Files the dataset tests read: small PNG folders and arrays saved as .npz or .pt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import SAMPLES

CNN = SAMPLES / "models" / "digits_cnn.pt2"
VAL = SAMPLES / "data" / "digits_val.npz"


def save_png(path: Path, value: int, size: tuple[int, int] = (6, 8), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for label, name in enumerate(["cat", "dog", "emu"]):
        for i in range(2):
            save_png(root / name / f"{i}.png", 50 * label + 10 * i)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(VAL) as stored:
        return stored["x"], stored["y"]


def save_arrays(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    if path.suffix == ".pt":
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    else:
        np.savez(path, x=x, y=y)
    return path


def digit_folder(root: Path, names: dict[str, int], per_class: int = 15) -> Path:
    x, y = digits()
    for name, digit in names.items():
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(y == digit)[:per_class]:
            pixels = np.round(x[i, 0] * 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root
