"""Plain configuration objects for the activations that replace ReLU.

One config describes one activation choice for every selected site; the torch rewrite turns it
into a module per site and the ONNX rewrite into nodes per site, so both paths read the same
object (activations.md gives the math).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union, get_args

from retrofit.errors import UsageError

# Each choice set is written once, as a Literal type: configs, modules and the CLI's options
# (Typer reads Literal choices) all take their values from here.
ActivationName = Literal["carelu", "mrepu", "repu"]
Measure = Literal["energy", "l1", "count"]
Reduction = Literal["auto", "sample", "channel", "last"]
MEASURES: tuple[str, ...] = get_args(Measure)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def check_choice(value: str, choices: Sequence[str], what: str) -> None:
    """Refuse a value outside its choice set, naming the choices (exit code 2)."""
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class CompetitiveReLUConfig:
    """CAReLU: ``ReLU(K * tanh(alpha * p(z) + beta) * z)`` with trainable alpha, beta per site.

    ``reduce`` says over which axes the competition ``p(z)`` is measured:
    ``sample`` all non-batch axes; ``channel`` the spatial axes of each (sample, channel);
    ``last`` the last axis only (tokens of a sequence are independent); ``auto`` is ``last`` for
    3-D inputs (sequences, features last) and ``sample`` otherwise.
    ``alpha_init``/``beta_init`` default to the identity retrofit: alpha=0, beta=atanh(1/K), so
    the scale is exactly 1 and the network computes what it computed before the swap.
    """

    measure: Measure = "energy"
    k: float = 2.0
    eps: float = 1e-6
    reduce: Reduction = "auto"
    alpha_init: float = 0.0
    beta_init: float | None = None

    name = "carelu"
    identity_at_init = True

    def __post_init__(self) -> None:
        check_choice(self.measure, MEASURES, "measure")
        check_choice(self.reduce, REDUCTIONS, "reduce")
        if not 1 < self.k < math.inf:  # NaN fails every comparison
            raise ValueError(f"K must be a finite number greater than 1, got {self.k}")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"eps must be a finite positive number, got {self.eps}")

    @property
    def beta(self) -> float:
        """The beta a new site starts with."""
        return math.atanh(1.0 / self.k) if self.beta_init is None else self.beta_init

    @property
    def is_identity_init(self) -> bool:
        """True when a fresh site computes exactly ReLU (scale 1 for every input)."""
        return self.alpha_init == 0.0 and self.beta_init is None


@dataclass(frozen=True)
class MRePUConfig:
    """MRePU: ``x * max(0, x + c)^p``, per site ``(1-lam)*ReLU(x) + lam*b*MRePU(a*x)``.

    ``calibrate``: fit each site's gains a, b to the ReLU it replaces before any fine-tuning
    (the calibrated swap, :mod:`retrofit.pipeline.calibrate`); without it a = b = 1, the paper's MRePU.
    A retrofit without fine-tuning uses lam=1 (the real MRePU). Fine-tuning with
    ``ramp_fraction > 0`` starts at lam=0 (the pretrained function) and ramps lam to 1 over that
    fraction of the training steps; the default 0 fine-tunes the calibrated MRePU from the first
    step, which beat a ramp on the sample CNN (bench/results/repro_retrofit_budget.md).
    """

    p: float = 2.0
    c: float = 1.0
    blend: float = 1.0
    ramp_fraction: float = 0.0
    calibrate: bool = True

    name = "mrepu"
    identity_at_init = False

    def __post_init__(self) -> None:
        _check_power(self.p)
        if not math.isfinite(self.c):
            raise ValueError(f"c must be a finite number, got {self.c}")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"blend must lie in [0, 1], got {self.blend}")
        if not 0.0 <= self.ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must lie in [0, 1], got {self.ramp_fraction}")

    @property
    def is_identity_init(self) -> bool:
        """True only for lam=0, where the blend is still plain ReLU."""
        return self.blend == 0.0


@dataclass(frozen=True)
class RePUConfig:
    """RePU ``max(0, x)^p``: kept for comparison experiments, not recommended for retrofits."""

    p: float = 2.0

    name = "repu"
    identity_at_init = False
    is_identity_init = False

    def __post_init__(self) -> None:
        _check_power(self.p)


def _check_power(p: float) -> None:
    if not 1 < p < math.inf:
        raise ValueError(f"p must be a finite number greater than 1, got {p}")


ActivationConfig = Union[CompetitiveReLUConfig, MRePUConfig, RePUConfig]

CONFIGS: dict[ActivationName, type] = {
    "carelu": CompetitiveReLUConfig,
    "mrepu": MRePUConfig,
    "repu": RePUConfig,
}


Config = TypeVar("Config", CompetitiveReLUConfig, MRePUConfig, RePUConfig)


def config_with(kind: type[Config], config: Optional[Config], overrides: Mapping[str, Any]
                ) -> Config:
    """The config an activation module is built from: ``config`` (``kind()`` if None) with
    ``overrides`` replacing its fields, checked again; another activation's config is refused
    (exit code 2)."""
    config = kind() if config is None else config
    if not isinstance(config, kind):
        raise UsageError(f"the {kind.name} activation is built from a {kind.__name__}, got "
                         f"{config!r}")
    return dataclasses.replace(config, **overrides) if overrides else config


def resolve_config(config: ActivationConfig | str) -> ActivationConfig:
    """A config as given, or the defaults of the activation a name names; anything else is
    refused (exit code 2)."""
    if isinstance(config, str):
        check_choice(config, tuple(CONFIGS), "activation")
        return CONFIGS[config]()  # type: ignore[index]
    if not isinstance(config, tuple(CONFIGS.values())):
        raise UsageError(f"no activation for config {config!r}; known: {', '.join(CONFIGS)}")
    return config
