"""Class names (folder names, text labels) to class indices, and how names read in messages."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from retrofit.errors import BadInputError

_INTEGER_NAME = re.compile(r"[0-9]+")
_PREVIEW_NAMES = 3


@dataclass(frozen=True)
class ClassNames:
    """How class names (folder names, text labels) became class indices: ``index[name]``.

    Names that are all integers ("3", "7") are their own indices, so folders named after some
    classes of a larger model keep their meaning. Other names (cat/dog, ImageNet wnids, a mix
    of numbers and words) are sorted into 0..n-1, torchvision's ``ImageFolder`` order: a guess
    that can only be right for a model with n outputs
    (:func:`~retrofit.evaluation.datasets.checks.check_labels_fit` refuses the rest). ``index``
    is ordered by class index.
    """

    index: dict[str, int]
    sorted_names: bool

    @property
    def rule(self) -> str:
        """The rule in words, for the report."""
        return "names sorted into class indices" if self.sorted_names else "names are class indices"


def class_names(names: Iterable[str], source: str) -> ClassNames:
    """The class index of every distinct name (see :class:`ClassNames`)."""
    distinct = sorted(set(names))
    if not all(_INTEGER_NAME.fullmatch(name) for name in distinct):
        return ClassNames({name: i for i, name in enumerate(distinct)}, sorted_names=True)
    index: dict[str, int] = {}
    for name in sorted(distinct, key=int):
        twin = next((other for other, value in index.items() if value == int(name)), None)
        if twin is not None:
            raise BadInputError(f"class names {twin} and {name} in {source} both mean class "
                                f"{int(name)}; keep one of them")
        index[name] = int(name)
    return ClassNames(index, sorted_names=False)


def shown_name(name: str) -> str:
    """A class name as it reads unambiguously in a comma-separated, one-line list: quoted
    (``repr``) when it is empty, has edge spaces, unprintable characters or list marks."""
    plain = bool(name) and name.isprintable() and name.strip() == name and not any(
        mark in name for mark in (",", "→", "…", "'", '"'))
    return name if plain else repr(name)


def preview(names: Sequence[str]) -> str:
    """The first few names, for a one-line message about many."""
    shown = ", ".join(shown_name(name) for name in names[:_PREVIEW_NAMES])
    more = len(names) - _PREVIEW_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def indices_of_names(labels: list[str], source: str) -> tuple[np.ndarray, ClassNames]:
    """The class index of every label, by :func:`class_names`, and the mapping itself."""
    classes = class_names(labels, source)
    return np.array([classes.index[label] for label in labels], dtype=np.int64), classes

