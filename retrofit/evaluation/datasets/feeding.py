"""How stored samples are fed once the model's input type is known: integer data as token ids,
or as floats (uint8 pixels scaled to [0, 1])."""

from __future__ import annotations

from collections.abc import Callable

import torch

from retrofit.errors import BadInputError, UsageError
from retrofit.evaluation.datasets.base import (
    ClassificationData,
    ClassificationSubset,
    TensorClassificationData,
)
from retrofit.evaluation.datasets.normalise import check_pixel_units


def _on_tensors(dataset: ClassificationData,
                change: Callable[[ClassificationData], ClassificationData]) -> ClassificationData:
    """``change`` applied to the dataset that holds the samples (a subset's parent)."""
    if isinstance(dataset, ClassificationSubset):
        return ClassificationSubset(_on_tensors(dataset.dataset, change),
                                    dataset.indices.tolist(), name=dataset.name)
    return change(dataset)


def as_token_ids(dataset: ClassificationData) -> ClassificationData:
    """The same samples handed out as int64, for a model that takes integer inputs (token ids).

    Only integer data qualifies: float values (or integers normalised with mean/std, which only
    apply to float inputs) would be truncated into wrong ids, so they are refused in one line.
    """
    return _on_tensors(dataset, _token_ids)


def _token_ids(dataset: ClassificationData) -> ClassificationData:
    preprocessing = dataset.preprocessing
    if preprocessing.get("normalised"):
        raise UsageError(f"--mean/--std apply to float inputs, but the model takes integer token "
                         f"ids: leave them out for {dataset.source}")
    if not isinstance(dataset, TensorClassificationData) or dataset.x.is_floating_point():
        stored = preprocessing.get("stored_dtype", "float")
        raise BadInputError(f"{dataset.source} holds {stored} values but the model takes integer "
                            "inputs (token ids): store x as integers (int64)")
    return dataset.replaced(feed_dtype=torch.int64, preprocessing={
        **preprocessing, "values": "as stored, as int64 (token ids)"})


def as_float_inputs(dataset: ClassificationData) -> ClassificationData:
    """The samples as a model with float inputs takes them: float32.

    Float and bool ``x`` are fed as stored (bool as 0 and 1). uint8 ``x`` are pixels: scaled
    to [0, 1] (/255) before mean/std, as image folders are, and a note says so. Other integer
    types have no such convention (16-bit images? counts?): they are refused in one line rather
    than fed in a scale the model may not expect.
    """
    return _on_tensors(dataset, _float_inputs)


def _float_inputs(dataset: ClassificationData) -> ClassificationData:
    if not isinstance(dataset, TensorClassificationData) or dataset.x.is_floating_point() or (
            dataset.x.dtype == torch.bool):
        return dataset
    stored = str(dataset.x.dtype).replace("torch.", "")
    if dataset.x.dtype != torch.uint8:
        raise BadInputError(
            f"x in {dataset.source} holds {stored} values but the model takes floats, and only "
            "uint8 has a rule (pixels, scaled to [0, 1]): store x as float32, in the scale the "
            "model was trained on"
        )
    normalised = dataset.mean is not None and dataset.std is not None
    if normalised:
        check_pixel_units(dataset.mean, dataset.std, dataset.source)  # type: ignore[arg-type]
    note = (f"x in {dataset.source} is uint8: fed as pixels scaled to [0, 1] (/255)"
            f"{', then normalised with mean/std' if normalised else ''}, as image folders are; "
            "store x as float32 to feed other values")
    return dataset.replaced(
        divisor=255.0, notes=(*dataset.notes, note),
        preprocessing={**dataset.preprocessing, "values": "uint8 pixels / 255, as float32",
                       "scale": "pixels / 255"})

