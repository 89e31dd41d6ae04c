"""retrofit.data: every format loads, every kind of bad data names the file or row."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrofit.data import (
    ClassificationData,
    check_input_fits,
    check_labels_fit,
    load_dataset,
    split_train_val,
)
from retrofit.errors import BadInputError, UsageError


def _save_png(path: Path, value: int, size: tuple[int, int] = (6, 8), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for label, name in enumerate(["cat", "dog", "emu"]):
        for i in range(2):
            _save_png(root / name / f"{i}.png", 50 * label + 10 * i)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


# --------------------------------------------------------------------------- image folders


def test_image_folder_maps_sorted_class_folders_to_indices(image_folder: Path) -> None:
    data = load_dataset(image_folder)
    assert isinstance(data, ClassificationData)
    assert data.class_names == ["cat", "dog", "emu"]
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
        _save_png(tmp_path / name / "0.png", 100, mode="L")
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
    _save_png(image_folder / "emu" / "1.png", 0, size=(9, 9))
    data = load_dataset(image_folder)
    with pytest.raises(BadInputError, match=r"emu/1\.png is 9x9"):
        data[5]


def test_empty_class_folder_is_named(image_folder: Path) -> None:
    (image_folder / "fox").mkdir()
    with pytest.raises(BadInputError, match=r"class folder .*fox holds no images"):
        load_dataset(image_folder)


def test_folder_without_class_folders_is_refused(tmp_path: Path) -> None:
    _save_png(tmp_path / "loose.png", 0)
    with pytest.raises(BadInputError, match="no class sub-folders"):
        load_dataset(tmp_path)


def test_missing_path_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_crop_larger_than_resize_is_a_usage_error(image_folder: Path) -> None:
    with pytest.raises(UsageError):
        load_dataset(image_folder, image_size=4, crop_size=8)


# --------------------------------------------------------------------------- npz / pt


def test_npz_loads_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(12, dtype=np.float64).reshape(4, 3), y=np.array([0, 2, 1, 2]))
    data = load_dataset(path)
    assert len(data) == 4 and data.num_classes == 3 and data.sample_shape == (3,)
    x, y = data[1]
    assert x.dtype == torch.float32 and x.tolist() == [3.0, 4.0, 5.0] and y == 2
    assert data.class_names is None
    assert data.preprocessing["format"] == "npz"


def test_npz_found_by_content_not_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 3)), y=np.array([0, 1]))
    renamed = tmp_path / "data.bin"
    path.rename(renamed)
    assert len(load_dataset(renamed)) == 2


def test_npz_missing_array_lists_what_is_there(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 3)), y=np.array([0, 1]))
    with pytest.raises(BadInputError, match=r"d\.npz lacks array x \(found: images, y\)"):
        load_dataset(path)


def test_npz_length_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.array([0, 1]))
    with pytest.raises(BadInputError, match=r"d\.npz has 3 samples in x but 2 labels"):
        load_dataset(path)


def test_npz_object_array_is_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([[1.0], [2.0]], dtype=object), y=np.array([0, 1]))
    with pytest.raises(BadInputError, match=r"array x in .*d\.npz is a pickled object array"):
        load_dataset(path)


def test_nan_sample_index_is_named(tmp_path: Path) -> None:
    x = np.zeros((5, 2))
    x[3, 1] = np.nan
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.zeros(5, dtype=int))
    with pytest.raises(BadInputError, match=r"sample 3 in .*d\.npz contains NaN or Inf"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, -1, 2]), r"label of sample 1 .* is -1"),
        (np.array([0.0, 1.5, 2.0]), r"label of sample 1 .* not an integer"),
    ],
)
def test_bad_labels_are_named(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2)), y=labels)
    with pytest.raises(BadInputError, match=message):
        load_dataset(path)


def test_truncated_npz_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((50, 4)), y=np.zeros(50, dtype=int))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(BadInputError, match=r"d\.npz"):
        load_dataset(path)


def test_pt_dict_loads(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    x = torch.ones(4, 1, 2, 2, dtype=torch.float16)
    torch.save({"x": x, "y": torch.tensor([1, 0, 1, 3])}, path)
    data = load_dataset(path, mean=[1.0], std=[2.0])
    assert data.sample_shape == (1, 2, 2) and data.num_classes == 4
    x, y = data[3]
    assert x.dtype == torch.float32 and torch.all(x == 0) and y == 3


def test_pt_with_code_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    torch.save({"x": torch.zeros(2, 2), "y": torch.tensor([0, 1]), "f": zipfile.ZipInfo()}, path)
    with pytest.raises(BadInputError, match=r"d\.pt holds objects other than tensors"):
        load_dataset(path)


def test_pt_dataset_never_runs_pickled_code(malicious_pickle: tuple[Path, Path]) -> None:
    path, marker = malicious_pickle
    with pytest.raises(BadInputError, match=r"evil\.pt"):
        load_dataset(path)
    assert not marker.exists()


def test_pt_missing_y_and_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    torch.save({"x": torch.zeros(2, 2)}, path)
    with pytest.raises(BadInputError, match=r"d\.pt lacks y"):
        load_dataset(path)
    torch.save({"x": torch.zeros(200, 2), "y": torch.zeros(200, dtype=torch.long)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(BadInputError, match=r"d\.pt"):
        load_dataset(path)


# --------------------------------------------------------------------------- CSV


def test_csv_finds_label_column_by_name(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,Target,b\n1,0,2\n3,2,4\n\n5,1,6\n")
    data = load_dataset(path)
    assert len(data) == 3 and data.num_classes == 3 and data.sample_shape == (2,)
    assert data[2][0].tolist() == [5.0, 6.0] and data[2][1] == 1
    assert data.preprocessing["label_column"] == "Target"


def test_csv_label_defaults_to_last_column_and_text_labels_become_names(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,species\n1,2,setosa\n3,4,virginica\n5,6,setosa\n")
    data = load_dataset(path)
    assert data.class_names == ["setosa", "virginica"]
    assert data.targets.tolist() == [0, 1, 0]


def test_csv_explicit_label_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("kind,a,b\n1,2,3\n0,4,5\n")
    data = load_dataset(path, label_column="kind")
    assert data.targets.tolist() == [1, 0] and data[0][0].tolist() == [2.0, 3.0]
    with pytest.raises(BadInputError, match="no column 'nope'"):
        load_dataset(path, label_column="nope")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("1,2,0\n3,,1\n", r"line 3, column 'b': is empty"),
        ("1,2,0\n3,x,1\n", r"line 3, column 'b': 'x' is not a number"),
        ("1,2,0\nnan,4,1\n", r"line 3, column 'a': nan \(NaN or Inf\)"),
        ("1,2,0\n3,4,\n", r"line 3: missing label"),
        ("1,2,0\n3,4,1.5\n", r"line 3: label '1.5' is not an integer"),
        ("1,2,0\n3,4,-2\n", r"line 3: label -2 is negative"),
        ("1,2,0\n3,4\n", r"line 3 has 2 values but the header names 3 columns"),
    ],
)
def test_csv_bad_rows_are_named(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n" + body)
    with pytest.raises(BadInputError, match=r"d\.csv " + message):
        load_dataset(path)


def test_csv_without_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("1,2,0\n3,4,1\n")
    with pytest.raises(BadInputError, match="header row"):
        load_dataset(path)


# --------------------------------------------------------------------------- splits and checks


def test_split_is_stratified_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    y = np.array([0] * 10 + [1] * 20 + [2] * 5)
    np.savez(path, x=np.arange(35, dtype=float).reshape(35, 1), y=y)
    data = load_dataset(path)
    train, val = split_train_val(data, val_fraction=0.2, seed=3)
    assert len(train) + len(val) == 35 and len(val) == 7
    assert torch.bincount(val.targets, minlength=3).tolist() == [2, 4, 1]
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    again_train, again_val = split_train_val(data, val_fraction=0.2, seed=3)
    assert again_val.indices.tolist() == val.indices.tolist()
    other = split_train_val(data, val_fraction=0.2, seed=4)[1]
    assert other.indices.tolist() != val.indices.tolist()
    assert val.num_classes == 3 and val.sample_shape == (1,)
    x, label = val[0]
    assert label == int(y[int(x)])


def test_split_hands_out_rounding_remainders_to_reach_the_total(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((9, 1)), y=np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    train, val = split_train_val(load_dataset(path), val_fraction=0.5)
    assert len(val) == 5 and len(train) == 4
    assert sorted(torch.bincount(val.targets, minlength=3).tolist()) == [1, 2, 2]


def test_split_keeps_a_singleton_class_in_train(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 1)), y=np.array([0, 0, 0, 0, 1]))
    train, val = split_train_val(load_dataset(path), val_fraction=0.4)
    assert 1 in train.targets.tolist() and 1 not in val.targets.tolist()


def test_check_labels_fit_states_both_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.array([0, 11, 4]))
    data = load_dataset(path)
    check_labels_fit(data, 12)
    with pytest.raises(BadInputError, match="labels in .* go up to 11 but the model has 10 outp"):
        check_labels_fit(data, 10)


def test_check_input_fits_turns_shape_errors_into_one_line() -> None:
    model = torch.nn.Conv2d(3, 4, 3)
    assert check_input_fits(model, torch.zeros(3, 8, 8)).shape == (1, 4, 6, 6)
    message = r"data samples of shape \(1, 8, 8\) do not fit the model: "
    with pytest.raises(BadInputError, match=message) as info:
        check_input_fits(model, torch.zeros(1, 8, 8))
    assert "\n" not in str(info.value)
