"""retrofit.evaluation.datasets.names: integer names are their index, other names are sorted, in
every format; the mapping reads unambiguously in the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrofit.errors import BadInputError
from retrofit.evaluation.datasets.load import load_dataset
from retrofit.evaluation.datasets.names import class_names
from retrofit.pipeline.request import DataOptions, RetrofitRequest
from retrofit.pipeline.job import evaluate_file, retrofit_file
from retrofit.pipeline.report import classes_line, report_to_dict, report_to_markdown
from tests.conftest import run_cli
from tests.evaluation.datasets.conftest import CNN, digit_folder, save_arrays, save_png


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


def test_class_folders_named_3_and_7_are_classes_3_and_7_of_a_10_class_model(
        tmp_path: Path) -> None:
    folder = digit_folder(tmp_path / "val", {"3": 3, "7": 7})
    data = load_dataset(folder)
    assert sorted(set(data.targets.tolist())) == [3, 7] and data.num_classes == 8
    report = evaluate_file(CNN, DataOptions(val=folder), device="cpu")
    assert report.result.top1 > 90.0  # sorted into 0 and 1 it scored 0 %
    assert report.dataset["class_index"] == {"3": 3, "7": 7}
    assert report.dataset["preprocessing"]["labels"] == "names are class indices"


def test_twelve_integer_folders_keep_their_values(tmp_path: Path) -> None:
    for name in map(str, range(12)):
        save_png(tmp_path / name / "0.png", 0)
    data = load_dataset(tmp_path)
    assert data.classes is not None and data.classes.index["10"] == 10
    assert data.targets.tolist() == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]  # folders read sorted


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
    data = load_dataset(save_arrays(tmp_path / "d.npz", np.zeros((3, 2), np.float32), labels))
    assert data.classes is not None and data.classes.index == {"3": 3, "7": 7}
    assert data.targets.tolist() == [7, 3, 7]
    names = load_dataset(save_arrays(tmp_path / "n.npz", np.zeros((2, 2), np.float32),
                               np.array([b"dog", b"cat"])))
    assert names.classes is not None and names.classes.index == {"cat": 0, "dog": 1}


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
    folder = digit_folder(tmp_path / "val", {"3": 3, "7": 7}, per_class=4)
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
