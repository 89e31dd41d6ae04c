"""retrofit.evaluation.datasets.feeding: uint8 is pixels for a float model and ids for a token
model; other integers are refused for floats, floats and bools are fed as stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrofit.errors import BadInputError, UsageError
from retrofit.evaluation.datasets.feeding import as_float_inputs, as_token_ids
from retrofit.evaluation.datasets.load import load_dataset
from retrofit.evaluation.datasets.splits import split_train_val
from retrofit.pipeline.request import DataOptions
from retrofit.pipeline.job import evaluate_file
from tests.evaluation.datasets.conftest import CNN, digits, save_arrays


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_uint8_pixels_score_as_their_float_version_on_the_sample_model(
        tmp_path: Path, suffix: str) -> None:
    """Fed raw (0..255) the sample CNN scores 16 %; as pixels / 255, what the float data does."""
    x, y = digits()
    pixels = np.round(x * 255).astype(np.uint8)
    as_uint8 = evaluate_file(CNN, DataOptions(val=save_arrays(tmp_path / f"u8{suffix}", pixels, y)),
                             device="cpu")
    as_float = evaluate_file(CNN, DataOptions(val=save_arrays(tmp_path / f"f32{suffix}",
                                                        pixels.astype(np.float32) / 255, y)),
                             device="cpu")
    assert torch.equal(as_uint8.result.correct1, as_float.result.correct1)
    assert as_uint8.result.top1 > 90.0
    assert as_uint8.dataset["preprocessing"]["scale"] == "pixels / 255"
    assert any("is uint8: fed as pixels scaled to [0, 1]" in note for note in as_uint8.notes)


def test_uint8_pixels_are_scaled_before_mean_and_std_as_image_folders_are(tmp_path: Path) -> None:
    values = np.arange(256, dtype=np.uint8)
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.fromarray(values.reshape(16, 16), mode="L").save(tmp_path / "folder" / name / "0.png")
    arrays = save_arrays(tmp_path / "u8.npz", values.reshape(1, 1, 16, 16).repeat(2, 0),
                         np.array([0, 1]))
    folder = load_dataset(tmp_path / "folder", mean=[0.25], std=[0.5])
    pixels = as_float_inputs(load_dataset(arrays, mean=[0.25], std=[0.5]))
    assert pixels[0][0].dtype == torch.float32
    assert torch.equal(pixels[0][0], folder[0][0])
    assert torch.equal(pixels[1][0], (torch.from_numpy(values).float().view(1, 16, 16) / 255
                                      - 0.25) / 0.5)


def test_uint8_stays_token_ids_for_a_model_that_takes_ids(tmp_path: Path) -> None:
    ids = np.array([[0, 7, 255], [3, 2, 1]], dtype=np.uint8)
    data = as_token_ids(load_dataset(save_arrays(tmp_path / "ids.npz", ids, np.array([0, 1]))))
    assert data[0][0].dtype == torch.int64 and data[0][0].tolist() == [0, 7, 255]
    assert data.notes == ()


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32])
def test_other_integer_types_for_a_float_model_are_refused_in_one_line(
        tmp_path: Path, dtype: type) -> None:
    data = load_dataset(save_arrays(tmp_path / "x.npz", np.ones((4, 3), dtype=dtype), np.arange(4)))
    train, _ = split_train_val(data, 0.25)
    with pytest.raises(BadInputError, match=rf"holds {np.dtype(dtype).name} values but the model "
                                            "takes floats") as info:
        as_float_inputs(train)  # a split's parent holds the samples: refused through it too
    assert "\n" not in str(info.value)
    assert as_token_ids(data)[0][0].tolist() == [1, 1, 1]  # the same data stays valid ids


@pytest.mark.parametrize(("x", "expected"), [
    (np.array([[0.5, 2.0]], dtype=np.float32), [0.5, 2.0]),
    (np.array([[300.0, 2.0]], dtype=np.float64), [300.0, 2.0]),  # floats are the user's units
    (np.array([[True, False]]), [1.0, 0.0]),
])
def test_float_and_bool_data_are_fed_as_stored(tmp_path: Path, x: np.ndarray,
                                               expected: list[float]) -> None:
    data = as_float_inputs(load_dataset(save_arrays(tmp_path / "x.npz", x, np.array([0]))))
    assert data[0][0].dtype == torch.float32 and data[0][0].tolist() == expected
    assert data.notes == () and "scale" not in data.preprocessing


@pytest.mark.parametrize(("mean", "std"), [([123.675], [58.395]), ([0.5], [58.0]), ([-0.5], [1.0])])
def test_mean_and_std_in_0_to_255_units_for_pixels_are_a_usage_error(
        tmp_path: Path, image_folder: Path, mean: list[float], std: list[float]) -> None:
    with pytest.raises(UsageError, match=r"scaled to \[0, 1\] first: divide 0\.\.255 values"):
        load_dataset(image_folder, mean=mean, std=std)
    stored = save_arrays(tmp_path / "u8.npz", np.zeros((2, 3), np.uint8), np.array([0, 1]))
    pixels = load_dataset(stored, mean=mean, std=std)
    with pytest.raises(UsageError, match=r"u8\.npz's pixels, which are scaled to \[0, 1\] first"):
        as_float_inputs(pixels)
