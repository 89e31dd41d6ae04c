"""Data against the model: labels it can predict, class names two datasets agree on, and the one
line for samples whose shape the model refuses."""

from __future__ import annotations

from collections.abc import Sequence

from retrofit.errors import BadInputError, first_line
from retrofit.evaluation.datasets.base import ClassificationData
from retrofit.evaluation.datasets.names import preview


def check_labels_fit(dataset: ClassificationData, num_outputs: int) -> None:
    """Raise BadInputError when a label has no model output to match it, or when class names
    were sorted into indices for a model with another number of outputs: that mapping is then
    a guess, and the scores it gives mean nothing."""
    classes = getattr(dataset, "classes", None)  # duck-typed datasets may have no names
    if classes is not None and classes.sorted_names and len(classes.index) != num_outputs:
        names = list(classes.index)
        raise BadInputError(
            f"{dataset.source} names {len(names)} classes ({preview(names)}), sorted into "
            f"indices 0 to {len(names) - 1}, but the model has {num_outputs} outputs, so which "
            f"output each name stands for is a guess: name the classes by their index "
            f"(0 to {num_outputs - 1})"
        )
    targets = dataset.targets
    if len(targets) == 0:
        return
    highest = int(targets.max())
    if highest >= num_outputs:
        named = " (integer class names are their own index)" if classes is not None else ""
        raise BadInputError(
            f"labels in {dataset.source} go up to {highest} but the model has {num_outputs} "
            f"outputs{named}"
        )


def check_same_classes(val: ClassificationData, train: ClassificationData) -> None:
    """Sorted names index each dataset on its own: when validation and training data name
    different classes, one name would stand for two indices, so that is refused."""
    a, b = val.classes, train.classes
    if a is None or b is None or a.index == b.index or not (a.sorted_names or b.sorted_names):
        return
    only = [(sorted(set(one.index) - set(other.index)), source)
            for one, other, source in ((a, b, val.source), (b, a, train.source))]
    detail = "; ".join(f"{preview(names)} only in {source}" for names, source in only if names)
    raise BadInputError(
        f"{val.source} and {train.source} name different classes "
        f"({detail or 'the same names, read as different indices'}), so their indices would "
        "not match: give both the same class names, or name the classes by their index"
    )


def model_input_error(error: BaseException, sample_shape: Sequence[int]) -> BadInputError:
    """The one-line error for data that the model cannot take (wrong shape, channels, rank)."""
    return BadInputError(
        f"data samples of shape {tuple(sample_shape)} do not fit the model: "
        f"{first_line(error)}"
    )


MODEL_CALL_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError, ValueError, AssertionError, IndexError)
"""What a model call raises when its input does not fit (``AssertionError``: a torch.export
guard such as a fixed batch size; ``IndexError``: a token id beyond an embedding table)."""
