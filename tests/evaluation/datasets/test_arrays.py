"""retrofit.evaluation.datasets.arrays: .npz and .pt load in memory, found by content; bad arrays
and labels name the file or sample, and nothing is unpickled."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from retrofit.errors import BadInputError
from retrofit.evaluation.datasets.load import load_dataset


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
