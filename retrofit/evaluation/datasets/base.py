"""The dataset classes every format becomes: samples in memory, and subsets of them.

(Image folders, decoded lazily, are :class:`~retrofit.evaluation.datasets.images.ImageFolderData`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from retrofit.evaluation.datasets.names import ClassNames


class ClassificationData(Dataset):
    """A labelled dataset: ``dataset[i] -> (x, y)`` with ``x`` a float32 tensor of
    ``sample_shape`` (int64 token ids after
    :func:`~retrofit.evaluation.datasets.feeding.as_token_ids`) and ``y`` an ``int`` class
    index in ``[0, num_classes)``.

    Attributes the caller may rely on:

    - ``num_classes``: one more than the largest label.
    - ``classes``: how class names became indices (image folders, text labels), else None.
    - ``source``: the path the data was read from, for messages and the report.
    - ``preprocessing``: a JSON-friendly dict of what was done to the raw data.
    - ``notes``: what the user must hear about how the samples are fed (uint8 scaling).
    - ``sample_shape``: the shape of one ``x``.
    - ``targets``: every label as an int64 tensor, in dataset order, without decoding samples.
    """

    num_classes: int
    classes: ClassNames | None = None
    notes: tuple[str, ...] = ()
    source: str
    preprocessing: dict[str, Any]
    sample_shape: tuple[int, ...]

    @property
    def targets(self) -> Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, sample_shape={self.sample_shape})"
        )


class TensorClassificationData(ClassificationData):
    """Samples held in memory (``.npz``, ``.pt``, CSV), already checked.

    ``x`` is kept as stored: floats, or integers until the model says how it takes them
    (:mod:`~retrofit.evaluation.datasets.feeding`). Each sample is handed out as
    ``feed_dtype``; as float32 it is ``(x / divisor - mean) / std``, per channel (the sample's
    first axis), in the order image folders use, computed per sample so that uint8 data stays
    uint8 in memory.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        source: str,
        preprocessing: dict[str, Any],
        classes: ClassNames | None = None,
        feed_dtype: torch.dtype = torch.float32,
        divisor: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.x = x
        self.y = y
        self.source = source
        self.preprocessing = preprocessing
        self.classes = classes
        self.feed_dtype = feed_dtype
        self.divisor = divisor
        self.mean = mean
        self.std = std
        self.notes = notes
        self.num_classes = int(y.max()) + 1
        self.sample_shape = tuple(x.shape[1:])
        per_channel = (-1,) + (1,) * (x.ndim - 2)
        self._mean = None if mean is None else torch.tensor(mean).view(per_channel)
        self._std = None if std is None else torch.tensor(std).view(per_channel)

    def replaced(self, **changes: Any) -> TensorClassificationData:
        """The same samples with some constructor arguments changed."""
        fields = {"source": self.source, "preprocessing": self.preprocessing,
                  "classes": self.classes, "feed_dtype": self.feed_dtype, "divisor": self.divisor,
                  "mean": self.mean, "std": self.std, "notes": self.notes}
        return TensorClassificationData(self.x, self.y, **{**fields, **changes})

    @property
    def targets(self) -> Tensor:
        return self.y

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.x[index].to(self.feed_dtype)
        if self.feed_dtype == torch.float32:
            if self.divisor is not None:
                sample = sample / self.divisor
            if self._mean is not None and self._std is not None:
                sample = (sample - self._mean) / self._std
        return sample, int(self.y[index])



class ClassificationSubset(ClassificationData):
    """Some samples of a :class:`ClassificationData`, in the order of ``indices``; keeps the
    parent's classes, source, preprocessing and notes."""

    def __init__(self, dataset: ClassificationData, indices: Sequence[int], *, name: str) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(list(indices), dtype=torch.int64)
        self.name = name
        self.num_classes = dataset.num_classes
        self.classes = dataset.classes
        self.source = dataset.source
        self.preprocessing = dataset.preprocessing
        self.notes = dataset.notes
        self.sample_shape = dataset.sample_shape

    @property
    def targets(self) -> Tensor:
        return self.dataset.targets[self.indices]

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.dataset[int(self.indices[index])]

