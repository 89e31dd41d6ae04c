"""retrofit.evaluation.data: every format loads, every kind of bad data names the file or row."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrofit.evaluation.data import (
    ClassificationData,
    as_float_inputs,
    as_token_ids,
    check_input_fits,
    check_labels_fit,
    check_same_classes,
    class_names,
    load_dataset,
    split_train_val,
)
from retrofit.errors import BadInputError, UsageError
from retrofit.pipeline.job import evaluate_file, retrofit_file
from retrofit.pipeline.request import DataOptions, RetrofitRequest
from retrofit.pipeline.report import classes_line, report_to_dict, report_to_markdown
from tests.conftest import SAMPLES, run_cli

CNN = SAMPLES / "models" / "digits_cnn.pt2"
VAL = SAMPLES / "data" / "digits_val.npz"


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
    assert data.classes is None
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
    assert data.classes is not None and data.classes.index == {"setosa": 0, "virginica": 1}
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


# --------------------------------------------------------------------------- integer pixels


def _digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(VAL) as stored:
        return stored["x"], stored["y"]


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    if path.suffix == ".pt":
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    else:
        np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_uint8_pixels_score_as_their_float_version_on_the_sample_model(
        tmp_path: Path, suffix: str) -> None:
    """Fed raw (0..255) the sample CNN scores 16 %; as pixels / 255, what the float data does."""
    x, y = _digits()
    pixels = np.round(x * 255).astype(np.uint8)
    as_uint8 = evaluate_file(CNN, DataOptions(val=_save(tmp_path / f"u8{suffix}", pixels, y)),
                             device="cpu")
    as_float = evaluate_file(CNN, DataOptions(val=_save(tmp_path / f"f32{suffix}",
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
    arrays = _save(tmp_path / "u8.npz", values.reshape(1, 1, 16, 16).repeat(2, 0), np.array([0, 1]))
    folder = load_dataset(tmp_path / "folder", mean=[0.25], std=[0.5])
    pixels = as_float_inputs(load_dataset(arrays, mean=[0.25], std=[0.5]))
    assert pixels[0][0].dtype == torch.float32
    assert torch.equal(pixels[0][0], folder[0][0])
    assert torch.equal(pixels[1][0], (torch.from_numpy(values).float().view(1, 16, 16) / 255
                                      - 0.25) / 0.5)


def test_uint8_stays_token_ids_for_a_model_that_takes_ids(tmp_path: Path) -> None:
    ids = np.array([[0, 7, 255], [3, 2, 1]], dtype=np.uint8)
    data = as_token_ids(load_dataset(_save(tmp_path / "ids.npz", ids, np.array([0, 1]))))
    assert data[0][0].dtype == torch.int64 and data[0][0].tolist() == [0, 7, 255]
    assert data.notes == ()


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32])
def test_other_integer_types_for_a_float_model_are_refused_in_one_line(
        tmp_path: Path, dtype: type) -> None:
    data = load_dataset(_save(tmp_path / "x.npz", np.ones((4, 3), dtype=dtype), np.arange(4)))
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
    data = as_float_inputs(load_dataset(_save(tmp_path / "x.npz", x, np.array([0]))))
    assert data[0][0].dtype == torch.float32 and data[0][0].tolist() == expected
    assert data.notes == () and "scale" not in data.preprocessing


@pytest.mark.parametrize(("mean", "std"), [([123.675], [58.395]), ([0.5], [58.0]), ([-0.5], [1.0])])
def test_mean_and_std_in_0_to_255_units_for_pixels_are_a_usage_error(
        tmp_path: Path, image_folder: Path, mean: list[float], std: list[float]) -> None:
    with pytest.raises(UsageError, match=r"scaled to \[0, 1\] first: divide 0\.\.255 values"):
        load_dataset(image_folder, mean=mean, std=std)
    pixels = load_dataset(_save(tmp_path / "u8.npz", np.zeros((2, 3), np.uint8), np.array([0, 1])),
                          mean=mean, std=std)
    with pytest.raises(UsageError, match=r"u8\.npz's pixels, which are scaled to \[0, 1\] first"):
        as_float_inputs(pixels)


# --------------------------------------------------------------------------- class names


@pytest.mark.parametrize(("names", "index", "sorted_names"), [
    (["7", "3"], {"3": 3, "7": 7}, False),
    (["10", "2", "0"], {"0": 0, "2": 2, "10": 10}, False),  # by value, not "10" < "2"
    (["007", "12"], {"007": 7, "12": 12}, False),
    (["dog", "cat"], {"cat": 0, "dog": 1}, True),
    (["3", "cat"], {"3": 0, "cat": 1}, True),  # a mix is names
    (["-1", "2"], {"-1": 0, "2": 1}, True),
    (["n02", "n01"], {"n01": 0, "n02": 1}, True),
    (["3", "٣"], {"3": 0, "٣": 1}, True),  # only ASCII digits make an index
])
def test_integer_names_are_their_index_other_names_are_sorted(
        names: list[str], index: dict[str, int], sorted_names: bool) -> None:
    classes = class_names(names, "src")
    assert classes.index == index and list(classes.index.items()) == sorted(
        index.items(), key=lambda item: item[1])
    assert classes.sorted_names is sorted_names


def test_two_names_for_one_class_index_are_refused() -> None:
    with pytest.raises(BadInputError, match="class names 07 and 7 in src both mean class 7"):
        class_names(["7", "07", "1"], "src")


def _digit_folder(root: Path, names: dict[str, int], per_class: int = 15) -> Path:
    x, y = _digits()
    for name, digit in names.items():
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(y == digit)[:per_class]:
            pixels = np.round(x[i, 0] * 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root


def test_class_folders_named_3_and_7_are_classes_3_and_7_of_a_10_class_model(
        tmp_path: Path) -> None:
    folder = _digit_folder(tmp_path / "val", {"3": 3, "7": 7})
    data = load_dataset(folder)
    assert sorted(set(data.targets.tolist())) == [3, 7] and data.num_classes == 8
    report = evaluate_file(CNN, DataOptions(val=folder), device="cpu")
    assert report.result.top1 > 90.0  # sorted into 0 and 1 it scored 0 %
    assert report.dataset["class_index"] == {"3": 3, "7": 7}
    assert report.dataset["preprocessing"]["labels"] == "names are class indices"


def test_twelve_integer_folders_keep_their_values(tmp_path: Path) -> None:
    for name in map(str, range(12)):
        _save_png(tmp_path / name / "0.png", 0)
    data = load_dataset(tmp_path)
    assert data.classes is not None and data.classes.index["10"] == 10
    assert data.targets.tolist() == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]  # folders read sorted


def test_sorted_names_must_match_the_model_outputs(image_folder: Path) -> None:
    data = load_dataset(image_folder)
    check_labels_fit(data, 3)
    for outputs in (2, 4, 10):
        with pytest.raises(BadInputError, match=rf"names 3 classes \(cat, dog, emu\), sorted into "
                                                rf"indices 0 to 2, but the model has {outputs} "
                                                r"outputs, so which output .* is a guess"):
            check_labels_fit(split_train_val(data, 0.5)[1], outputs)


def test_integer_names_beyond_the_outputs_say_how_they_were_read(tmp_path: Path) -> None:
    for name in ("3", "12"):
        _save_png(tmp_path / name / "0.png", 0)
    with pytest.raises(BadInputError, match=r"go up to 12 but the model has 10 outputs \(integer "
                                            r"class names are their own index\)"):
        check_labels_fit(load_dataset(tmp_path), 10)


@pytest.mark.parametrize(("labels", "index"), [
    (["cat", "dog", "cat"], {"cat": 0, "dog": 1}),
    (["7", "3", "7"], None),  # numbers: class indices as they are
    (["3.0", "7", "3"], None),
    (["3", "cat", "3"], {"3": 0, "cat": 1}),  # any text: all are names
])
def test_csv_labels_follow_the_same_rule(tmp_path: Path, labels: list[str],
                                         index: dict[str, int] | None) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label\n" + "".join(f"{i},{label}\n" for i, label in enumerate(labels)))
    data = load_dataset(path)
    if index is None:
        assert data.classes is None and data.targets.tolist() == [int(float(v)) for v in labels]
    else:
        assert data.classes is not None and data.classes.index == index
        assert data.targets.tolist() == [index[label] for label in labels]
        assert data.preprocessing["labels"] == "names sorted into class indices"


@pytest.mark.parametrize("labels", [np.array(["7", "3", "7"]), np.array([b"7", b"3", b"7"])])
def test_npz_text_labels_follow_the_same_rule(tmp_path: Path, labels: np.ndarray) -> None:
    data = load_dataset(_save(tmp_path / "d.npz", np.zeros((3, 2), np.float32), labels))
    assert data.classes is not None and data.classes.index == {"3": 3, "7": 7}
    assert data.targets.tolist() == [7, 3, 7]
    names = load_dataset(_save(tmp_path / "n.npz", np.zeros((2, 2), np.float32),
                               np.array([b"dog", b"cat"])))
    assert names.classes is not None and names.classes.index == {"cat": 0, "dog": 1}


def test_validation_and_training_data_must_name_the_same_classes(
        tmp_path: Path, image_folder: Path) -> None:
    other = tmp_path / "other"
    for name in ("cat", "dog", "fox"):
        _save_png(other / name / "0.png", 0)
    same, different = load_dataset(image_folder), load_dataset(other)
    check_same_classes(same, load_dataset(image_folder))
    with pytest.raises(BadInputError, match=r"name different classes \(emu only in .*images; "
                                            r"fox only in .*other\)"):
        check_same_classes(same, different)
    numbered = tmp_path / "numbered"
    for name in ("1", "2"):
        _save_png(numbered / "a" / name / "0.png", 0)
        _save_png(numbered / "b" / name / "0.png", 0)
    _save_png(numbered / "b" / "5" / "0.png", 0)
    check_same_classes(load_dataset(numbered / "a"), load_dataset(numbered / "b"))  # values agree


# --------------------------------------------------------------------------- the label mapping


@pytest.mark.parametrize(("index", "line"), [
    (None, None),
    ({"cat": 0, "dog": 1}, "classes: cat→0, dog→1 (names sorted into class indices)"),
    ({"a,b": 0, " c": 1, "d\ne": 2}, ("classes: 'a,b'→0, ' c'→1, 'd\\ne'→2 (names sorted "
                                       "into class indices)")),
    ({f"n{i:02}": i for i in range(12)},
     ("classes: n00→0, n01→1, n02→2, n03→3, n04→4, n05→5, …, n11→11 (12 names, all in --json; "
      "names sorted into class indices)")),
])
def test_classes_line_shows_the_mapping_unambiguously(index: dict[str, int] | None,
                                                      line: str | None) -> None:
    dataset = {"class_index": index,
               "preprocessing": {"labels": "names sorted into class indices"}}
    assert classes_line(dataset) == line


def test_the_label_mapping_is_in_the_table_markdown_and_json(tmp_path: Path) -> None:
    folder = _digit_folder(tmp_path / "val", {"3": 3, "7": 7}, per_class=4)
    report = retrofit_file(RetrofitRequest(CNN, data=DataOptions(val=folder), device="cpu",
                                           output=tmp_path / "out.pt2"))
    assert report_to_dict(report)["dataset"]["class_index"] == {"3": 3, "7": 7}
    assert "classes: 3→3, 7→7 (names are class indices)" in report_to_markdown(report)
    table = run_cli("retrofit", CNN, "--data", folder, "--device", "cpu", "-o",
                    tmp_path / "again.pt2")
    assert table.exit_code == 0, table.output
    assert "classes: 3→3, 7→7 (names are class indices)" in table.stdout
    scored = run_cli("evaluate", CNN, "--data", folder, "--device", "cpu")
    assert "classes: 3→3, 7→7 (names are class indices)" in scored.stdout

