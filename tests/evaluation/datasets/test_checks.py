"""retrofit.evaluation.datasets.checks: labels the model cannot predict, and class names that
would be a guess or disagree between datasets, are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrofit.errors import BadInputError
from retrofit.evaluation.datasets.checks import check_labels_fit, check_same_classes
from retrofit.evaluation.datasets.load import load_dataset
from retrofit.evaluation.datasets.splits import split_train_val
from tests.evaluation.datasets.conftest import save_png


def test_check_labels_fit_states_both_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.array([0, 11, 4]))
    data = load_dataset(path)
    check_labels_fit(data, 12)
    with pytest.raises(BadInputError, match="labels in .* go up to 11 but the model has 10 outp"):
        check_labels_fit(data, 10)


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
        save_png(tmp_path / name / "0.png", 0)
    with pytest.raises(BadInputError, match=r"go up to 12 but the model has 10 outputs \(integer "
                                            r"class names are their own index\)"):
        check_labels_fit(load_dataset(tmp_path), 10)


def test_validation_and_training_data_must_name_the_same_classes(
        tmp_path: Path, image_folder: Path) -> None:
    other = tmp_path / "other"
    for name in ("cat", "dog", "fox"):
        save_png(other / name / "0.png", 0)
    same, different = load_dataset(image_folder), load_dataset(other)
    check_same_classes(same, load_dataset(image_folder))
    with pytest.raises(BadInputError, match=r"name different classes \(emu only in .*images; "
                                            r"fox only in .*other\)"):
        check_same_classes(same, different)
    numbered = tmp_path / "numbered"
    for name in ("1", "2"):
        save_png(numbered / "a" / name / "0.png", 0)
        save_png(numbered / "b" / name / "0.png", 0)
    save_png(numbered / "b" / "5" / "0.png", 0)
    check_same_classes(load_dataset(numbered / "a"), load_dataset(numbered / "b"))  # values agree
