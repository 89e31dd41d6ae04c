"""Output parity: how far a rewritten model's outputs are from the original's.

Both paths report the same figure: the largest absolute difference over all outputs, and that
difference relative to the outputs' scale (the largest absolute reference value, at least 1), so
a tolerance means the same thing for logits of size 10 and of size 1e-3.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from retrofit.errors import BadInputError, ParityError


@dataclass(frozen=True)
class OutputParity:
    """``max_abs_diff`` over all outputs; ``scale`` = max(1, largest finite |reference| value).

    Values that are NaN in both outputs, or the same infinity, agree. ``nonfinite_reference``
    counts the reference's NaN/Inf values: a model that already computes NaN or Inf on the sample
    inputs cannot show that a rewrite kept its function, which :meth:`require` reports as a bad
    input rather than a parity failure.
    """

    max_abs_diff: float
    scale: float
    nonfinite_reference: int = 0
    nonfinite_candidate: int = 0
    """Values that are NaN or inf in the rewritten model's outputs where the original's are
    finite."""

    @property
    def relative(self) -> float:
        return self.max_abs_diff / self.scale

    def require(self, tolerance: float, what: str) -> None:
        """Raise :class:`ParityError` when the relative difference exceeds ``tolerance``
        (:class:`BadInputError` when the reference itself holds NaN or Inf there)."""
        if self.relative <= tolerance:  # "not <=" below also catches NaN
            return
        if self.nonfinite_reference:
            raise BadInputError(
                f"{what}: the original model computes NaN or Inf on the sample inputs "
                f"({self.nonfinite_reference} output value(s)), so the outputs cannot be "
                "compared; check its weights or give sample inputs it handles (--input-shape, "
                "--data)"
            )
        raise ParityError(
            f"{what}: outputs differ by {self.max_abs_diff:.3g} "
            f"({self.relative:.3g} of the output scale; tolerance {tolerance:g})"
        )

    def require_finite(self, what: str) -> None:
        """Raise :class:`ParityError` when the rewritten model computes NaN or inf where the
        original computes numbers: whatever the activation, such a model is no result."""
        if self.nonfinite_candidate:
            raise ParityError(
                f"{what} computes NaN or inf on the sample inputs ({self.nonfinite_candidate} "
                "output value(s)) where the original's outputs are finite; nothing was written"
            )


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> OutputParity:
    """Parity of two lists of outputs with the same shapes."""
    if not reference:
        raise BadInputError("the model returns no tensor on the sample inputs, so its outputs "
                            "cannot be compared")
    if len(reference) != len(candidate):
        raise ParityError(f"the models return {len(reference)} and {len(candidate)} outputs")
    diff, scale, nonfinite, broken = 0.0, 1.0, 0, 0
    for ref, cand in zip(reference, candidate):
        ref64, cand64 = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        if ref64.shape != cand64.shape:
            raise ParityError(f"output shapes differ: {ref64.shape} and {cand64.shape}")
        if not ref64.size:
            continue
        finite = np.isfinite(ref64)
        nonfinite += int(ref64.size - np.count_nonzero(finite))
        broken += int(np.count_nonzero(finite & ~np.isfinite(cand64)))
        agree = (np.isnan(ref64) & np.isnan(cand64)) | (np.isinf(ref64) & (ref64 == cand64))
        with np.errstate(invalid="ignore", over="ignore"):
            gaps = np.where(agree, 0.0, np.abs(ref64 - cand64))
        # NaN or inf where the outputs disagree is an infinite difference, never hidden by max().
        gap = float(np.max(np.where(np.isnan(gaps), np.inf, gaps)))
        diff = max(diff, gap)
        if finite.any():
            scale = max(scale, float(np.max(np.abs(ref64[finite]))))
    return OutputParity(diff, scale, nonfinite, broken)


OVERFLOW_SCALES = (1.25, 1.5, 2.0, 4.0)
"""Input scales at which a model that grows faster than linearly (MRePU) is probed for NaN/inf."""


def overflow_scale(outputs_at: Callable[[float], Sequence[np.ndarray]]) -> float | None:
    """The smallest of :data:`OVERFLOW_SCALES` at which ``outputs_at(scale)`` (the outputs on
    the sample inputs times ``scale``) hold NaN or inf; None when they are finite at every one.
    A ReLU network is positively homogeneous and does not care; MRePU grows like |x|^3 per site,
    so a deep stack can be finite on its data and overflow on inputs a little larger."""
    for scale in OVERFLOW_SCALES:
        if not all(np.isfinite(output).all() for output in outputs_at(scale)):
            return scale
    return None


def flatten_outputs(output: object) -> list[np.ndarray]:
    """A model's output (tensor, tuple, list or mapping of them, nested) as a flat list of arrays.

    Only tensors count: a Hugging Face ``ModelOutput`` is a mapping of its fields that are set
    (None fields are left out), and other values in it (a key-value cache object) are skipped.
    """
    if isinstance(output, torch.Tensor):
        return [output.detach().float().cpu().numpy()]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [array for item in output for array in flatten_outputs(item)]
    return []


def set_training(model: nn.Module, mode: bool) -> bool:
    """``model.train(mode)``; False for torch.export modules, which refuse to switch (their mode
    was fixed when they were exported)."""
    try:
        model.train(mode)
    except NotImplementedError:
        return False
    return True


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode and restore its mode afterwards.

    Modules of ``torch.export`` programs refuse ``eval()``: their mode was fixed when they were
    exported, so they are used as they are.
    """
    was_training = module.training
    switched = set_training(module, False)  # every submodule too, whatever the top one says
    try:
        yield module
    finally:
        if was_training and switched:
            module.train()


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy; modules of ``torch.export`` programs warn about their own pytree specs when
    copied (a torch-internal FutureWarning the user can do nothing about), so that is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*LeafSpec", FutureWarning)
        return copy.deepcopy(module)


def torch_outputs(module: nn.Module, inputs: Iterable[torch.Tensor]) -> list[np.ndarray]:
    """Outputs of ``module`` in eval mode, without autograd."""
    with eval_mode(module), torch.no_grad():
        return flatten_outputs(module(*inputs))


def torch_parity(original: nn.Module, rewritten: nn.Module,
                 inputs: tuple[torch.Tensor, ...]) -> OutputParity:
    """Parity of two torch modules on the same inputs."""
    return compare_outputs(torch_outputs(original, inputs), torch_outputs(rewritten, inputs))
