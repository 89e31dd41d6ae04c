"""Sample inputs for verification: from the model file, or from shapes the user gives.

Parity checks and ``.pt2`` export need concrete inputs. A ``torch.export`` program carries its
own; a state dict or a pickled module does not, so the user names shapes
(``--input-shape 1,1,8,8``, or ``name:1,3,224,224`` for a named ONNX input) or gives a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from retrofit.errors import UsageError


@dataclass(frozen=True)
class InputShape:
    """A shape for one model input; ``name`` is only needed for models with named inputs."""

    dims: tuple[int, ...]
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> "InputShape":
        """``"1,3,32,32"`` or ``"image:1,3,32,32"``."""
        name, _, dims_text = text.rpartition(":")
        try:
            dims = tuple(int(part) for part in dims_text.replace("x", ",").split(",") if part)
        except ValueError:
            dims = ()
        if not dims or any(dim <= 0 for dim in dims):
            raise UsageError(f"--input-shape {text!r} must look like 1,3,32,32 or name:1,3,32,32")
        return cls(dims, name or None)


def random_inputs(
    shapes: Sequence[InputShape], dtypes: Sequence[torch.dtype] | None = None, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal tensors of the given shapes (float32 unless told)."""
    generator = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(shapes)
    return tuple(
        torch.randn(shape.dims, generator=generator).to(dtype)
        for shape, dtype in zip(shapes, dtypes)
    )
