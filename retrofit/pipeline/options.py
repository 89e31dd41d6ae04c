"""The user's options, checked before any work: a value out of range, or an option that does not
apply to the job asked for (``--k`` with ``--to mrepu``, ``--epochs`` without ``--finetune``, a
gate without data to score), is a usage error (exit code 2) rather than silently ignored.

Options are named as the command line spells them without the dashes (``blend_ramp`` for
``--blend-ramp``); the CLI passes the ones the user set and this module turns them into configs.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from retrofit.config import CONFIGS, ActivationConfig
from retrofit.errors import UsageError

_ACTIVATION_FIELDS: dict[str, dict[str, str]] = {
    # activation: {option: its config field}
    "carelu": {"measure": "measure", "k": "k", "reduce": "reduce"},
    "mrepu": {"p": "p", "c": "c", "blend_ramp": "ramp_fraction", "calibrate": "calibrate"},
    "repu": {"p": "p"},
}
ACTIVATION_OPTIONS = frozenset(option for fields in _ACTIVATION_FIELDS.values() for option in fields)
"""Options that configure one activation or another (``--k`` is CompetitiveReLU's)."""

FINETUNE_OPTIONS = frozenset({
    "epochs", "optimizer", "lr", "activation_lr", "weight_decay", "warmup", "grad_clip",
    "blend_ramp", "amp", "deterministic", "checkpoint", "resume", "control", "val_fraction",
    "plot",
})
"""Options that only a fine-tune (``--finetune``) uses."""

DATA_OPTIONS = frozenset({
    "image_size", "crop_size", "mean", "std", "label_column", "batch_size",
})
"""Options that only scoring on data (``--data`` or ``--finetune``) uses. The gates need data
too: :class:`retrofit.pipeline.job.RetrofitRequest` refuses them without it, for library callers alike."""


def flag(option: str) -> str:
    """The command-line spelling of an option name: ``blend_ramp`` is ``--blend-ramp``."""
    return "--" + option.replace("_", "-")


def activation_config(activation: str, options: Mapping[str, Any]) -> ActivationConfig:
    """The config of ``activation`` (carelu, mrepu, repu) from the options the user set; one of
    another activation's options is refused by name."""
    if activation not in CONFIGS:
        raise UsageError(f"unknown activation {activation!r}: choose one of "
                         f"{', '.join(CONFIGS)}")
    fields = _ACTIVATION_FIELDS[activation]
    for option in options:
        if option not in fields:
            users = [name for name, own in _ACTIVATION_FIELDS.items() if option in own]
            raise UsageError(f"{flag(option)} applies to --to {' or '.join(users)}, not to "
                             f"--to {activation}")
    try:
        return CONFIGS[activation](**{fields[name]: value for name, value in options.items()})
    except ValueError as error:
        raise UsageError(f"--to {activation}: {error}") from None


def options_by_activation(activations: Iterable[str], options: Mapping[str, Any]
                          ) -> dict[str, dict[str, Any]]:
    """``options`` shared out among several ``activations`` (``cadrelu compare``): each gets
    those that configure it (``--k`` CompetitiveReLU, ``--p`` MRePU); an option that configures
    none of them is refused by name, as :func:`activation_config` refuses it for one."""
    activations = list(activations)
    for option in options:
        if not any(option in _ACTIVATION_FIELDS[name] for name in activations):
            users = [name for name, own in _ACTIVATION_FIELDS.items() if option in own]
            raise UsageError(f"{flag(option)} applies to --to {' or '.join(users)}, which is "
                             f"not among {', '.join(activations)}")
    return {name: {option: value for option, value in options.items()
                   if option in _ACTIVATION_FIELDS[name]} for name in activations}


def check_options_apply(given: Iterable[str], *, data: bool, finetune: bool) -> None:
    """Refuse options whose job was not asked for: fine-tuning options without ``--finetune``,
    data options without data, ``--val-fraction`` when ``--data`` is the validation set."""
    given = set(given)
    for option in sorted(given):
        if option in FINETUNE_OPTIONS and not finetune:
            raise UsageError(f"{flag(option)} applies to fine-tuning: pass --finetune TRAIN")
        if option in DATA_OPTIONS and not (data or finetune):
            raise UsageError(f"{flag(option)} needs data to score on: pass --data VAL (or "
                             "--finetune TRAIN)")
    if "val_fraction" in given and data:
        raise UsageError("--val-fraction splits a validation set off --finetune's data; with "
                         "--data that is the validation set")


def require_finite(option: str, value: Any) -> None:
    """NaN or infinity in a numeric option is a usage error (a NaN threshold never fails)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag(option)} must be a finite number, got {value}")
