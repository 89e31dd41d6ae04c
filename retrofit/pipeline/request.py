"""What a retrofit job is asked to do, checked before any file is read, and the CI gates it must
pass: the gates are decided here, so a Python caller and the command line fail alike.

Option names in messages are the command line's (:func:`flag`): the library's checks are the
CLI's, and a Python caller reads the option the field stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from retrofit.config import ActivationConfig, CompetitiveReLUConfig
from retrofit.errors import GateError, UsageError
from retrofit.evaluation.evaluate import resolve_device
from retrofit.inputs import InputShape
from retrofit.sites import SiteSelector
from retrofit.training.config import FinetuneConfig


def flag(option: str) -> str:
    """The command-line spelling of an option name: ``blend_ramp`` is ``--blend-ramp``."""
    return "--" + option.replace("_", "-")


def require_finite(option: str, value: Any) -> None:
    """NaN or infinity in a numeric option is a usage error (a NaN threshold never fails)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag(option)} must be a finite number, got {value}")


@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how images are prepared (see :func:`retrofit.evaluation.datasets.load.load_dataset`)."""

    val: Path | None = None
    train: Path | None = None
    val_fraction: float = 0.2
    image_size: int | None = None
    crop_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    label_column: str | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must lie strictly between 0 and 1, got "
                             f"{self.val_fraction}")
        for option, size in (("image_size", self.image_size), ("crop_size", self.crop_size)):
            if size is not None and size < 1:
                raise UsageError(f"{flag(option)} must be at least 1 pixel, got {size}")
        for option, values in (("mean", self.mean), ("std", self.std)):
            for value in values or ():
                require_finite(option, value)
        if self.std is not None and not all(value > 0 for value in self.std):
            raise UsageError(f"--std values divide the data: each must be positive, got "
                             f"{', '.join(f'{v:g}' for v in self.std)}")

    @property
    def given(self) -> bool:
        """Whether there is any data to score on."""
        return self.val is not None or self.train is not None


@dataclass(frozen=True)
class Gates:
    """CI gates in percentage points of top-1: the final model may lose at most ``max_drop``
    against the original and must gain at least ``min_gain``."""

    max_drop: float | None = None
    min_gain: float | None = None

    def __post_init__(self) -> None:
        for option, value in (("max_drop", self.max_drop), ("min_gain", self.min_gain)):
            if value is not None:
                require_finite(option, float(value))

    @property
    def any(self) -> bool:
        return self.max_drop is not None or self.min_gain is not None


@dataclass(frozen=True)
class GateResult:
    name: str
    threshold: float
    value: float
    passed: bool


def gate_results(gates: Gates, change: float) -> list[GateResult]:
    """Each gate asked for, against ``change``: the final top-1 minus the original's, in points."""
    results = []
    if gates.max_drop is not None:
        results.append(GateResult("max_drop", gates.max_drop, -change, -change <= gates.max_drop))
    if gates.min_gain is not None:
        results.append(GateResult("min_gain", gates.min_gain, change, change >= gates.min_gain))
    return results


def gate_error(results: Sequence[GateResult], on: str | None = None) -> GateError | None:
    """The error for the gates that failed (None when all passed); ``on`` names what they were
    applied to when that is not the job's one model (``compare``'s top-ranked candidate)."""
    failed = [result.name for result in results if not result.passed]
    if not failed:
        return None
    return GateError(f"gate failed: {', '.join(failed)}" + (f" (on {on})" if on else ""))


@dataclass(frozen=True)
class RetrofitRequest:
    """Everything a retrofit needs; defaults are the CLI's defaults.

    Fine-tuning runs when ``data.train`` and ``finetune`` are both given.
    """

    model: Path
    config: ActivationConfig = CompetitiveReLUConfig()
    select: SiteSelector = SiteSelector()
    output: Path | None = None
    force: bool = False
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    input_shapes: tuple[InputShape, ...] = ()
    tolerance: float = 1e-5
    seed: int = 0
    device: str = "auto"
    data: DataOptions = DataOptions()
    finetune: FinetuneConfig | None = None
    control: bool = False
    gates: Gates = Gates()
    export_onnx: Path | None = None
    onnx_functions: bool = False
    plot: Path | None = None
    markdown: Path | None = None
    """Where the caller will write the Markdown report; only checked here, before any work."""

    def __post_init__(self) -> None:
        """What can be checked without reading a file, checked before anything is read."""
        if not 0 < self.tolerance < math.inf:
            raise UsageError(f"--tolerance must be a finite positive number, got {self.tolerance}")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must lie in 0 .. 2**32-1, got {self.seed}")
        resolve_device(self.device)  # used or not: a wrong --device is never ignored
        if self.gates.any and not self.data.given:
            raise UsageError("a gate needs data to score on: pass --data VAL (or --finetune "
                             "TRAIN); without it --max-drop and --min-gain could never fail")
        if (self.data.train is None) != (self.finetune is None):
            raise UsageError("fine-tuning needs both training data (data.train, --finetune) "
                             "and a FinetuneConfig (request.finetune)")
