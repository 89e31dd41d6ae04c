"""CSV (or tab/semicolon separated) text with a header row: one label column, float features."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retrofit.errors import BadInputError
from retrofit.evaluation.datasets.names import ClassNames, indices_of_names

LABEL_COLUMN_NAMES = ("label", "target", "class", "y")
"""CSV header names (any case) taken as the label column when none is named; else the last."""


def read_csv(
    path: Path, label_column: str | None
) -> tuple[Tensor, np.ndarray, ClassNames | None, dict[str, Any]]:
    """Float features, class indices, class names (text labels) and what the report records.
    The delimiter is whichever of comma, semicolon and tab the header line holds most."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            first_line = handle.readline()
            delimiter = max(",;\t", key=first_line.count) if first_line.strip() else ","
            handle.seek(0)
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if header is None or not any(cell.strip() for cell in header):
                raise BadInputError(f"{path} is empty; expected a header row and data rows")
            header = [cell.strip() for cell in header]
            if all(_is_number(cell) for cell in header):
                raise BadInputError(
                    f"{path} line 1 looks like data; CSV files need a header row naming the columns"
                )
            label_index = _label_column_index(header, label_column, path)
            feature_names = [name for i, name in enumerate(header) if i != label_index]
            if not feature_names:
                raise BadInputError(f"{path} has only a label column and no feature columns")
            rows, labels, lines = _csv_rows(reader, header, label_index, path)
    except UnicodeDecodeError as error:
        raise BadInputError(f"{path} is not UTF-8 text: {error.reason}") from error
    except csv.Error as error:
        raise BadInputError(f"{path} is not valid CSV: {error}") from error
    except OSError as error:
        raise BadInputError(f"cannot read {path}: {error.strerror or error}") from error
    if not rows:
        raise BadInputError(f"{path} has a header but no data rows")
    y, classes = _csv_labels(labels, lines, path)
    x = torch.tensor(rows, dtype=torch.float32)
    info = {
        "format": "csv",
        "label_column": header[label_index],
        "feature_columns": len(feature_names),
    }
    return x, y, classes, info


def _label_column_index(header: list[str], label_column: str | None, path: Path) -> int:
    if label_column is not None:
        if label_column not in header:
            raise BadInputError(
                f"{path} has no column {label_column!r} (columns: {', '.join(header)})"
            )
        return header.index(label_column)
    lowered = [name.lower() for name in header]
    for candidate in LABEL_COLUMN_NAMES:
        if candidate in lowered:
            return lowered.index(candidate)
    return len(header) - 1


def _csv_rows(
    reader: Any, header: list[str], label_index: int, path: Path
) -> tuple[list[list[float]], list[str], list[int]]:
    rows: list[list[float]] = []
    labels: list[str] = []
    lines: list[int] = []
    width = len(header)
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != width:
            raise BadInputError(
                f"{path} line {line} has {len(row)} values but the header names {width} columns"
            )
        label = row[label_index].strip()
        if not label:
            raise BadInputError(
                f"{path} line {line}: missing label in column {header[label_index]!r}"
            )
        values: list[float] = []
        for i, cell in enumerate(row):
            if i == label_index:
                continue
            try:
                value = float(cell)
            except ValueError:
                shown = cell.strip()
                what = f"{shown!r} is not a number" if shown else "is empty"
                raise BadInputError(f"{path} line {line}, column {header[i]!r}: {what}") from None
            if not math.isfinite(value):
                raise BadInputError(
                    f"{path} line {line}, column {header[i]!r}: {cell.strip()} (NaN or Inf)"
                )
            values.append(value)
        rows.append(values)
        labels.append(label)
        lines.append(line)
    return rows, labels, lines


def _csv_labels(
    labels: list[str], lines: list[int], path: Path
) -> tuple[np.ndarray, ClassNames | None]:
    """Numeric labels are class indices; if any label is text, all are class names."""
    if not all(_is_number(label) for label in labels):
        return indices_of_names(labels, str(path))
    indices = np.empty(len(labels), dtype=np.int64)
    for i, (label, line) in enumerate(zip(labels, lines)):
        value = float(label)
        if not math.isfinite(value) or value != int(value):
            raise BadInputError(
                f"{path} line {line}: label {label!r} is not an integer class index"
            )
        if value < 0:
            raise BadInputError(
                f"{path} line {line}: label {label} is negative; labels must be >= 0"
            )
        indices[i] = int(value)
    return indices, None



def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
