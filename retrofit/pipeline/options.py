"""The user's options become the job's configs here, checked before any work: a value out of
range, or an option that does not apply to the job asked for (``--k`` with ``--to mrepu``,
``--epochs`` without ``--finetune``, a gate without data to score), is a usage error (exit code
2) rather than silently ignored.

Options are named as the command line spells them without the dashes (``blend_ramp`` for
``--blend-ramp``); the CLI passes all its values and the names of those the user set, and
:func:`retrofit_request` and :func:`compare_request` build the request, both through
:func:`activation_configs` for the activations and :func:`_job` for the rest.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from retrofit.config import CONFIGS, ActivationConfig, CompetitiveReLUConfig
from retrofit.errors import UsageError
from retrofit.inputs import InputShape
from retrofit.pipeline.compare import COMPARED, CompareRequest, candidates, compared_activations
from retrofit.pipeline.request import DataOptions, Gates, RetrofitRequest, flag
from retrofit.sites import SiteSelector
from retrofit.torch_path.arch import parse_arch_kwargs
from retrofit.training.config import FinetuneConfig

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
too: :class:`~retrofit.pipeline.request.RetrofitRequest` refuses them without it, for library
callers alike."""


def activation_configs(activations: Sequence[str], options: Mapping[str, Any]
                       ) -> dict[str, ActivationConfig]:
    """The config of each of ``activations`` (carelu, mrepu, repu) from the activation options
    the user set (``options``, by name): each option configures the activations it belongs to,
    and one that configures none of them is refused by name."""
    unknown = [name for name in activations if name not in CONFIGS]
    if unknown:
        raise UsageError(f"unknown activation {unknown[0]!r}: choose one of "
                         f"{', '.join(CONFIGS)}")
    for option in options:
        if not any(option in _ACTIVATION_FIELDS[name] for name in activations):
            users = " or ".join(name for name, own in _ACTIVATION_FIELDS.items() if option in own)
            chosen = (f"not to --to {activations[0]}" if len(activations) == 1
                      else f"which is not among {', '.join(activations)}")
            raise UsageError(f"{flag(option)} applies to --to {users}, {chosen}")
    configs = {}
    for name in activations:
        fields = _ACTIVATION_FIELDS[name]
        try:
            configs[name] = CONFIGS[name](**{fields[option]: value for option, value
                                             in options.items() if option in fields})
        except ValueError as error:
            raise UsageError(f"--to {name}: {error}") from None
    return configs


def check_options_apply(given: Collection[str], *, data: bool, finetune: bool) -> None:
    """Refuse options whose job was not asked for: fine-tuning options without ``--finetune``,
    data options without data, ``--val-fraction`` when ``--data`` is the validation set."""
    for option in sorted(given):
        if option in FINETUNE_OPTIONS and not finetune:
            raise UsageError(f"{flag(option)} applies to fine-tuning: pass --finetune TRAIN")
        if option in DATA_OPTIONS and not (data or finetune):
            raise UsageError(f"{flag(option)} needs data to score on: pass --data VAL (or "
                             "--finetune TRAIN)")
    if "val_fraction" in given and data:
        raise UsageError("--val-fraction splits a validation set off --finetune's data; with "
                         "--data that is the validation set")


def retrofit_request(options: Mapping[str, Any], given: Collection[str]) -> RetrofitRequest:
    """``cadrelu retrofit``'s options as a request."""
    _check_apply(options, given)
    (config,) = activation_configs([options["to"]], _activation_options(options, given)).values()
    return _job(options, config, options["seed"],
                checkpoint=options["checkpoint"], resume=options["resume"],
                output=options["output"], force=options["force"],
                control=options["control"], export_onnx=options["export_onnx"],
                onnx_functions=options["onnx_functions"], plot=options["plot"],
                markdown=options["markdown"])


def compare_request(options: Mapping[str, Any], given: Collection[str]) -> CompareRequest:
    """``cadrelu compare``'s options as a request: every arm's shared job, and the candidates
    (``--to``, ``--measures``) configured by the activation options that are theirs."""
    _check_apply(options, given)
    seeds = _seeds(options["seeds"])
    job = _job(options, CompetitiveReLUConfig(), seeds[0], force=options["force"])
    activations = compared_activations(_listed(options["to"]) or list(COMPARED))
    configs = activation_configs(activations, _activation_options(options, given))
    return CompareRequest(job, candidates(configs, _listed(options["measures"])), seeds,
                          options["out_dir"], options["resume"], options["markdown"],
                          options["plot"])


def inspect_request(options: Mapping[str, Any]) -> RetrofitRequest:
    """``cadrelu inspect``'s options: the model, how to open it, and the sites to select."""
    return RetrofitRequest(options["model"], **_opening(options))


def data_options(options: Mapping[str, Any], val_fraction: float = 0.2) -> DataOptions:
    """The data options (``data``, ``finetune`` when the command has it, and how samples are
    prepared) as :class:`~retrofit.pipeline.request.DataOptions`."""
    return DataOptions(options["data"], options.get("finetune"), val_fraction,
                       options["image_size"], options["crop_size"],
                       _floats(options["mean"], "--mean"), _floats(options["std"], "--std"),
                       options["label_column"], options["batch_size"])


def _check_apply(options: Mapping[str, Any], given: Collection[str]) -> None:
    check_options_apply(given, data=options["data"] is not None,
                        finetune=options["finetune"] is not None)


def _activation_options(options: Mapping[str, Any], given: Collection[str]) -> dict[str, Any]:
    return {name: options[name] for name in given if name in ACTIVATION_OPTIONS}


def _job(options: Mapping[str, Any], config: ActivationConfig, seed: int, *,
         checkpoint: Path | None = None, resume: bool = False, **fields: Any) -> RetrofitRequest:
    """What ``retrofit`` and every ``compare`` arm share: the model and how to open it, the
    sites, the data, the fine-tuning budget, the device, the tolerance and the gates."""
    data = data_options(options, options["val_fraction"])
    budget = None
    if options["finetune"] is not None:
        budget = FinetuneConfig(
            epochs=options["epochs"], batch_size=options["batch_size"],
            optimizer=options["optimizer"], lr=options["lr"],
            activation_lr=options["activation_lr"], weight_decay=options["weight_decay"],
            warmup_fraction=options["warmup"], grad_clip=options["grad_clip"], seed=seed,
            deterministic=options["deterministic"], amp=options["amp"],
            device=options["device"], checkpoint=checkpoint, resume=resume)
    return RetrofitRequest(
        model=options["model"], config=config, tolerance=options["tolerance"], seed=seed,
        device=options["device"], data=data, finetune=budget,
        gates=Gates(options["max_drop"], options["min_gain"]), **_opening(options), **fields)


def _opening(options: Mapping[str, Any]) -> dict[str, Any]:
    """How to open the model and which of its sites to select: every command's options."""
    return dict(
        select=SiteSelector(tuple(options["include"] or ()), tuple(options["exclude"] or ())),
        arch=options["arch"], arch_kwargs=parse_arch_kwargs(options["arch_kwargs"] or ()),
        trust_pickle=options["trust_pickle"],
        input_shapes=tuple(InputShape.parse(text) for text in options["input_shape"] or ()))


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{option} takes numbers separated by commas, got {text!r}") from None


def _listed(values: Sequence[str] | None) -> list[str] | None:
    """A repeatable option whose values may also be comma-separated, as one list (None when
    not given: the command line holds an option it was not given as an empty tuple)."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _seeds(values: Sequence[str] | None) -> tuple[int, ...]:
    try:
        return tuple(int(value) for value in _listed(values) or ["0"])
    except ValueError:
        raise UsageError(f"--seeds takes whole numbers, got {', '.join(values or [])}") from None
