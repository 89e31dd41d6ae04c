"""Output parity: how far a rewritten model's outputs are from the original's.

Both paths report the same figure: the largest absolute difference over all outputs, and that
difference relative to the outputs' scale (the largest absolute reference value, at least 1), so
a tolerance means the same thing for logits of size 10 and of size 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from retrofit.errors import ParityError


@dataclass(frozen=True)
class OutputParity:
    """``max_abs_diff`` over all outputs; ``scale`` = max(1, largest |reference| value)."""

    max_abs_diff: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_abs_diff / self.scale

    def require(self, tolerance: float, what: str) -> None:
        """Raise :class:`ParityError` when the relative difference exceeds ``tolerance``."""
        if not self.relative <= tolerance:  # also catches NaN
            raise ParityError(
                f"{what}: outputs differ by {self.max_abs_diff:.3g} "
                f"({self.relative:.3g} of the output scale; tolerance {tolerance:g})"
            )


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> OutputParity:
    """Parity of two lists of outputs with the same shapes."""
    if len(reference) != len(candidate):
        raise ParityError(f"the models return {len(reference)} and {len(candidate)} outputs")
    diff, scale = 0.0, 1.0
    for ref, cand in zip(reference, candidate):
        ref64, cand64 = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        if ref64.shape != cand64.shape:
            raise ParityError(f"output shapes differ: {ref64.shape} and {cand64.shape}")
        if ref64.size:
            gap = float(np.max(np.abs(ref64 - cand64)))
            # NaN or inf anywhere is an infinite difference, never hidden by max().
            diff = max(diff, gap if np.isfinite(gap) else float("inf"))
            scale = max(scale, float(np.max(np.abs(ref64))))
    return OutputParity(diff, scale)


def flatten_outputs(output: object) -> list[np.ndarray]:
    """A model's output (tensor, tuple, list or dict of them) as a flat list of arrays."""
    if isinstance(output, torch.Tensor):
        return [output.detach().float().cpu().numpy()]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [array for item in output for array in flatten_outputs(item)]
    return []


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode and restore its mode afterwards.

    Modules of ``torch.export`` programs refuse ``eval()``: their mode was fixed when they were
    exported, so they are used as they are.
    """
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError:
        was_training = None
    try:
        yield module
    finally:
        if was_training:
            module.train()


def torch_outputs(module: nn.Module, inputs: Iterable[torch.Tensor]) -> list[np.ndarray]:
    """Outputs of ``module`` in eval mode, without autograd."""
    with eval_mode(module), torch.no_grad():
        return flatten_outputs(module(*inputs))


def torch_parity(original: nn.Module, rewritten: nn.Module,
                 inputs: tuple[torch.Tensor, ...]) -> OutputParity:
    """Parity of two torch modules on the same inputs."""
    return compare_outputs(torch_outputs(original, inputs), torch_outputs(rewritten, inputs))
