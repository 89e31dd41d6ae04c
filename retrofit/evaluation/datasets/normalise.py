"""Mean/std normalisation: the values per channel, and the check that pixels' values are in [0, 1]
units."""

from __future__ import annotations

import math
from collections.abc import Sequence

from retrofit.errors import UsageError


def normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int, source: str
) -> tuple[list[float], list[float]]:
    """One mean and std per channel (defaults 0 and 1; one value stands for every channel)."""
    mean_values = [0.0] * channels if mean is None else [float(v) for v in mean]
    std_values = [1.0] * channels if std is None else [float(v) for v in std]
    for name, values in (("mean", mean_values), ("std", std_values)):
        if len(values) == 1:
            values *= channels
        if len(values) != channels:
            raise UsageError(
                f"{name} has {len(values)} values but samples of {source} have {channels} "
                "channels; give one value or one per channel"
            )
        if not all(math.isfinite(v) for v in values):
            raise UsageError(f"{name} must hold finite numbers, got {values}")
    if any(v == 0 for v in std_values):
        raise UsageError(f"std must not contain 0, got {std_values}")
    return mean_values, std_values


def check_pixel_units(mean: Sequence[float], std: Sequence[float], source: str) -> None:
    """Pixels are scaled to [0, 1] before normalising: a mean outside [0, 1] or a std above 1
    cannot describe them, it was given in 0..255 units (123.675, 58.395...)."""
    if any(not 0.0 <= v <= 1.0 for v in mean) or any(v > 1.0 for v in std):
        raise UsageError(
            f"mean {list(mean)} / std {list(std)} are not in the units of {source}'s pixels, "
            "which are scaled to [0, 1] first: divide 0..255 values by 255"
        )
