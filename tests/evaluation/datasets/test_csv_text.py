"""retrofit.evaluation.datasets.csv_text: the label column is found, bad rows name their line."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrofit.errors import BadInputError
from retrofit.evaluation.datasets.load import load_dataset


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
