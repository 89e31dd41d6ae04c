"""Fixed batch sizes: find out whether a model takes batches of any size, and run one that does
not in chunks of exactly its size.

``torch.export`` records a static batch unless told otherwise, ONNX graphs may declare one, and
some graphs reshape to a fixed ``[1, N]`` behind a dynamic input axis. Such a model is either
re-exported with a dynamic batch (a ``.pt2`` whose code allows it: :func:`reexport_dynamic_batch`)
or scored in chunks of its size (:func:`run_in_batches`) and fine-tuned in batches of exactly that
size. :func:`probe_fixed_batch` tells the two kinds apart for a model of any format by running it
on batches of two sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from retrofit.errors import first_line
from retrofit.verify import compare_outputs, torch_outputs

PROBE_TOLERANCE = 1e-4
"""Relative output difference up to which two batch sizes count as computing the same rows
(kernels may pick other algorithms for other batch sizes)."""

Forward = Callable[[tuple[Tensor, ...]], Sequence[np.ndarray]]
"""Run the model on a tuple of input batches; every output as an array. Raises when the model
cannot take them."""


def run_in_batches(forward: Callable[[Tensor], Tensor], batch: Tensor, size: int) -> Tensor:
    """``forward`` over ``batch`` in chunks of exactly ``size`` rows; the last chunk is padded
    with copies of its first row (values the model handles) and the padding's outputs dropped.
    Exact in eval mode, where the rows of a batch do not interact."""
    n = batch.shape[0]
    outputs = []
    for start in range(0, n, size):
        chunk = batch[start:start + size]
        if chunk.shape[0] < size:
            chunk = first_row_repeated(chunk, size - chunk.shape[0])
        outputs.append(forward(chunk))
    return torch.cat(outputs)[:n]


def first_row_repeated(x: Tensor, rows: int = 1) -> Tensor:
    """``x`` with ``rows`` copies of its first row appended: a larger batch whose outputs are
    known for a model whose rows do not interact (see :func:`outputs_when_grown`)."""
    return torch.cat([x, x[:1].expand(rows, *x.shape[1:])])


def grown_by_one(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Every input with its first row appended: a batch one larger whose outputs are known."""
    return tuple(first_row_repeated(x) for x in inputs)


def outputs_when_grown(reference: Sequence[np.ndarray], n: int, rows: int = 1
                       ) -> list[np.ndarray]:
    """What a model whose rows do not interact returns once its batch of ``n`` is grown by
    ``rows`` copies of row 0: each output with that batch axis gets the copies of its row 0;
    outputs without one are as they were."""
    return [np.concatenate([ref, np.repeat(ref[:1], rows, axis=0)])
            if np.ndim(ref) and np.shape(ref)[0] == n else ref for ref in reference]


def _same_rows(reference: Sequence[np.ndarray], grown: Sequence[np.ndarray], n: int) -> bool:
    """The grown batch's outputs are the reference's rows plus a copy of row 0, for every output
    with a batch axis (outputs without one, a scalar say, cannot tell and are not compared)."""
    if len(grown) != len(reference):
        return False
    batched = [i for i, r in enumerate(reference) if np.ndim(r) and np.shape(r)[0] == n]
    if any(np.shape(grown[i])[:1] != (n + 1,) for i in batched):
        return False
    expected = outputs_when_grown(reference, n)
    try:
        return compare_outputs([expected[i] for i in batched],
                               [grown[i] for i in batched]).relative <= PROBE_TOLERANCE
    except Exception:  # noqa: BLE001 - shapes that differ beyond the batch axis: not the same rows
        return False


def _runs(forward: Forward, inputs: tuple[Tensor, ...]) -> Sequence[np.ndarray] | str:
    """The outputs, or the first line of why the model refused these inputs."""
    try:
        return forward(inputs)
    except Exception as error:  # noqa: BLE001 - the model's code or runtime refusing this batch
        return first_line(error)


@dataclass(frozen=True)
class BatchProbe:
    """What :func:`probe_fixed_batch` found: ``fixed`` is the only batch size the model takes
    (None: any, or nothing could be learnt); ``inputs`` are the sample inputs to use, cut to one
    row when only a batch of 1 runs; ``failure`` says why neither the inputs' batch nor a batch
    of 1 ran (None when one did)."""

    fixed: int | None
    inputs: tuple[Tensor, ...]
    failure: str | None = None


def probe_fixed_batch(forward: Forward, inputs: tuple[Tensor, ...]) -> BatchProbe:
    """Run the model at the inputs' batch size B and at B + 1 (when B does not run: at 1 and 2).

    The batch is free when the larger batch runs and gives the same rows; fixed at the size that
    ran otherwise. Inputs whose first axes differ have no common batch axis and are not probed.
    """
    sizes = {x.shape[0] for x in inputs if x.ndim}
    if len(sizes) != 1 or len(inputs) != sum(1 for x in inputs if x.ndim):
        return BatchProbe(None, inputs)
    reference = _runs(forward, inputs)
    if isinstance(reference, str) and inputs[0].shape[0] > 1:
        reference = _runs(forward, tuple(x[:1] for x in inputs))
        if not isinstance(reference, str):
            inputs = tuple(x[:1] for x in inputs)
    if isinstance(reference, str):
        return BatchProbe(None, inputs, reference)
    n = inputs[0].shape[0]
    grown = _runs(forward, grown_by_one(inputs))
    if not isinstance(grown, str) and _same_rows(reference, grown, n):
        return BatchProbe(None, inputs)
    return BatchProbe(n, inputs)


def torch_forward(module: nn.Module) -> Forward:
    """A :data:`Forward` for a torch module (eval mode, no autograd)."""
    return lambda inputs: torch_outputs(module, inputs)


def static_batch(example: tuple[Tensor, ...], dynamic_dims: Sequence[Sequence[int]] | None
                 ) -> int | None:
    """The batch size a ``.pt2`` program was exported with when no input has a dynamic axis 0
    (None when some input's batch axis is dynamic, or the inputs share no batch size)."""
    if dynamic_dims is not None and any(0 in dims for dims in dynamic_dims):
        return None
    sizes = {x.shape[0] for x in example if x.ndim}
    return sizes.pop() if len(sizes) == 1 else None


def reexport_dynamic_batch(program: Any, example: tuple[Tensor, ...],
                           dynamic_dims: Sequence[Sequence[int]] | None) -> nn.Module | None:
    """The program re-exported with a dynamic batch axis, or None when torch.export refuses
    (the model's code fixes the batch) or the result differs from the original at its own batch
    size or at one more. The other dynamic axes stay dynamic."""
    axes = list(dynamic_dims) if dynamic_dims else [()] * len(example)
    shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in {0, *dims}} for dims in axes)
    try:
        # Clones: a failed export leaves its dynamic marks on the tensors it was given, and the
        # examples are needed again, static, to save the program.
        flexible = torch.export.export(program.module(check_guards=False),
                                       tuple(x.clone() for x in example),
                                       dynamic_shapes=shapes).module()
        reference = torch_outputs(program.module(), example)
        same = compare_outputs(reference, torch_outputs(flexible, example)).relative
        grown = torch_outputs(flexible, grown_by_one(example))
    except Exception:  # noqa: BLE001 - torch.export's many refusals all mean "keep the batch fixed"
        return None
    if same > PROBE_TOLERANCE or not _same_rows(reference, grown, example[0].shape[0]):
        return None
    return flexible


def fixed_batch_note(source: str, size: int, why: str) -> str:
    """The report note for a model scored and fine-tuned in chunks of its fixed batch."""
    return (f"{source} takes batches of exactly {size} ({why}): it is scored in batches of {size}, "
            "the last one padded and the padding's outputs dropped")


def exact_batches_note(size: int, asked: int, train_samples: int, processes: int = 1) -> str:
    """The report note for fine-tuning in batches of exactly the model's size (per process:
    a step takes ``size * processes`` samples)."""
    left = train_samples % (size * processes)
    adapted = (f"in batches of {size} instead of --batch-size {asked}" if asked != size
               else f"in batches of exactly {size}")
    skipped = ("no sample is left out" if left == 0 else
               f"each epoch leaves out the last {left} of {train_samples} training samples "
               "(a different set each epoch: the order is reshuffled)")
    return f"fine-tuned {adapted}, the model's fixed batch; {skipped}"
