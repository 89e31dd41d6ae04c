"""The retrofit job end to end, as library calls: load, score, rewrite, verify, fine-tune,
score again, gate, save, report.

``cadrelu retrofit``, ``inspect`` and ``evaluate`` are thin wrappers over :func:`retrofit_file`,
:func:`inspect_file` and :func:`evaluate_file`; a Python user gets the same behaviour and the
same report objects. The format-specific work is done by a :class:`~retrofit.pipeline.subjects.Subject`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from retrofit.atomic import check_output_path
from retrofit.pipeline.options import flag, require_finite
from retrofit.config import ActivationConfig, CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.evaluation.batching import exact_batches_note
from retrofit.evaluation.datasets.base import ClassificationData
from retrofit.evaluation.datasets.checks import check_same_classes
from retrofit.evaluation.datasets.feeding import as_float_inputs, as_token_ids
from retrofit.evaluation.datasets.load import load_dataset
from retrofit.evaluation.datasets.splits import split_train_val
from retrofit.training.distributed import is_main_process, world_size
from retrofit.errors import OutputError, RetrofitError, UnsupportedModelError, UsageError
from retrofit.evaluation.evaluate import EvalResult, evaluate, resolve_device
from retrofit.inputs import InputShape
from retrofit.evaluation.metrics import PairedDelta, paired_delta_ci
from retrofit.torch_path.io import ModelFormat, default_output_path, detect_format
from retrofit.sites import ReluSite, RetrofitResult, SiteSelector
from retrofit.torch_path.record import RetrofitStep
from retrofit.pipeline.subjects import NO_SAMPLE_INPUT, Subject, TorchSubject, final_config, open_subject
from retrofit.verify import OutputParity


@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how images are prepared (see :func:`retrofit.evaluation.data.load_dataset`)."""

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
class RetrofitRequest:
    """Everything a retrofit needs; defaults are the CLI's defaults.

    ``finetune`` is a :class:`retrofit.training.loop.FinetuneConfig` (fine-tuning runs when
    ``data.train`` is given).
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
    finetune: Any = None
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


@dataclass(frozen=True)
class Stage:
    """One scored model: ``name`` is before / after swap / after fine-tune / control."""

    name: str
    result: EvalResult


@dataclass(frozen=True)
class GateResult:
    name: str
    threshold: float
    value: float
    passed: bool


@dataclass
class RetrofitReport:
    """What happened: every site, remarks, parity figures, accuracies, gates, written files.

    ``parity`` compares the rewritten model with the original on sample inputs (None when none
    were available, and then ``unverified`` says why); ``preserves_function`` says it had to
    hold within ``tolerance``.
    ``stages`` are the retrofitted model's scores in order (before, after swap, after
    fine-tune); ``control`` is the untouched ReLU model fine-tuned with the same budget.
    ``deltas`` maps a comparison name (``swap``, ``finetune``, ``vs_control``) to its paired
    difference with a confidence interval.
    """

    model: Path
    format: ModelFormat
    activation: str
    config: ActivationConfig
    sites: list[ReluSite]
    notes: list[str] = field(default_factory=list)
    parity: OutputParity | None = None
    preserves_function: bool = True
    tolerance: float = 1e-5
    output: Path | None = None
    dataset: dict[str, Any] | None = None
    stages: list[Stage] = field(default_factory=list)
    control: Stage | None = None
    deltas: dict[str, PairedDelta] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    finetune: Any = None
    trained_parity: OutputParity | None = None
    onnx_export: Path | None = None
    onnx_export_parity: OutputParity | None = None
    unverified: str = ""
    written: list[Path] = field(default_factory=list)
    """The files this run wrote, in order; ``output`` is where the model was to go."""
    failure: RetrofitError | None = None
    """What stopped the job after the report was made (a fine-tune that diverged, an output that
    could not be written): the caller shows the report, then fails with this error."""
    resumed: bool = False
    """Whether a fine-tune went on from a checkpoint (``--resume``)."""
    calibration: Any = None
    """The calibrated swap's per-site fits (:class:`retrofit.pipeline.calibrate.Calibration`), when the
    activation was calibrated."""
    overflow_scale: float | None = None
    """For an activation that grows faster than linearly (MRePU, RePU): the smallest input
    scale at which the written model's outputs on the sample inputs overflow (None: none of
    :data:`retrofit.verify.OVERFLOW_SCALES`, or not probed)."""

    def __post_init__(self) -> None:
        if self.parity is None and not self.unverified:
            self.unverified = NO_SAMPLE_INPUT

    @property
    def verified(self) -> bool:
        """Whether the rewritten model's outputs were compared with the original's."""
        return not self.unverified

    @property
    def replaced(self) -> list[ReluSite]:
        return [site for site in self.sites if site.replaced]

    @property
    def gates_passed(self) -> bool:
        return all(gate.passed for gate in self.gates)


def _load_data(options: DataOptions, seed: int) -> tuple[ClassificationData | None, ClassificationData | None]:
    """The validation and training sets; without a validation set, one is split off training."""
    prepare = dict(image_size=options.image_size, crop_size=options.crop_size, mean=options.mean,
                   std=options.std, label_column=options.label_column)
    train = load_dataset(options.train, **prepare) if options.train else None
    val = load_dataset(options.val, **prepare) if options.val else None
    if train is not None and val is not None:
        check_same_classes(val, train)
    if train is not None and val is None:
        train, val = split_train_val(train, options.val_fraction, seed)
    return val, train


def dataset_summary(val: ClassificationData, train: ClassificationData | None) -> dict[str, Any]:
    """The data as the report shows it; ``class_index`` maps class names to the indices they
    were read as (None when the labels were indices already)."""
    return {
        "validation": val.source, "validation_samples": len(val),
        "train": train.source if train is not None else None,
        "train_samples": len(train) if train is not None else 0,
        "classes": val.num_classes, "preprocessing": val.preprocessing,
        "class_index": dict(val.classes.index) if val.classes is not None else None,
    }


def score_stage(subject: Subject, model: Any, val: ClassificationData,
                request: RetrofitRequest, name: str) -> Stage:
    """``model`` (in the subject's format) scored on ``val``, as the stage ``name``."""
    predictor = subject.predictor(model, request.device)
    return Stage(name, evaluate(predictor, val, batch_size=request.data.batch_size,
                                description=f"scoring {name}"))


def _gates(report: RetrofitReport, gates: Gates) -> list[GateResult]:
    if not gates.any:
        return []
    assert report.stages, "a gate without data is refused by RetrofitRequest"
    return gate_results(gates, report.stages[-1].result.top1 - report.stages[0].result.top1)


def gate_results(gates: Gates, change: float) -> list[GateResult]:
    """Each gate asked for, against ``change``: the final top-1 minus the original's, in points."""
    results = []
    if gates.max_drop is not None:
        results.append(GateResult("max_drop", gates.max_drop, -change, -change <= gates.max_drop))
    if gates.min_gain is not None:
        results.append(GateResult("min_gain", gates.min_gain, change, change >= gates.min_gain))
    return results


def _open(request: RetrofitRequest, val: ClassificationData | None) -> Subject:
    model_format = detect_format(request.model)
    sample = _first_samples(val) if val is not None else None
    return open_subject(request.model, model_format, arch=request.arch,
                        arch_kwargs=request.arch_kwargs, trust_pickle=request.trust_pickle,
                        input_shapes=request.input_shapes, seed=request.seed,
                        as_functions=request.onnx_functions, data_sample=sample)


def _fed_to(subject: Subject, data: ClassificationData | None) -> ClassificationData | None:
    """The data as the model takes it: int64 token ids for a model with integer inputs (integer
    data only), else float32 (uint8 pixels scaled to [0, 1], other integer types refused). Only
    here is the model's input type known; how the data is fed goes into the subject's notes.

    A dataset holds one input per sample (``x``): a model that takes several is refused here,
    before any work, rather than when its first batch fails."""
    if data is None:
        return None
    names = subject.input_names
    if len(names) != 1:
        raise UnsupportedModelError(
            f"{subject.path} takes {len(names)} inputs ({', '.join(names)}); scoring and "
            "fine-tuning feed one, the data's x: save the model with that input alone (e.g. "
            "export a classifier called with input_ids only)"
        )
    fed = as_token_ids(data) if subject.takes_token_ids else as_float_inputs(data)
    subject.notes.extend(note for note in fed.notes if note not in subject.notes)
    return fed


def _rewrite(subject: Subject, request: RetrofitRequest) -> RetrofitResult[Any]:
    """The subject's rewrite. A model it cannot rewrite (no ReLU site, say) is named by its
    file: the rewriters only see a module or a graph."""
    try:
        return subject.rewrite(request.config, request.select)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{request.model}: {error}") from error


def inspect_file(request: RetrofitRequest) -> RetrofitReport:
    """A dry run: every ReLU site and whether the rewrite would replace it. Nothing is written."""
    subject = _open(request, None)
    result = _rewrite(subject, request)
    return RetrofitReport(request.model, subject.format, request.config.name, request.config,
                          result.sites, subject.notes + result.notes,
                          subject.parity(result.model), request.config.is_identity_init,
                          request.tolerance)


@dataclass(frozen=True)
class EvaluateReport:
    """What ``cadrelu evaluate`` found: the scores, the dataset, and what loading changed that
    the user must hear (a module saved in training mode, a rebuilt retrofit)."""

    result: EvalResult
    dataset: dict[str, Any]
    notes: list[str]


def evaluate_file(model: Path, data: DataOptions, *, arch: str | None = None,
                  arch_kwargs: dict[str, Any] | None = None, trust_pickle: bool = False,
                  device: str = "auto") -> EvaluateReport:
    """Top-1/top-5 of any supported model on a dataset."""
    val, _ = _load_data(data, seed=0)
    if val is None:
        raise UsageError("evaluate needs a dataset: pass --data")
    request = RetrofitRequest(model, arch=arch, arch_kwargs=dict(arch_kwargs or {}),
                              trust_pickle=trust_pickle, device=device, data=data)
    subject = _open(request, val)
    val = _fed_to(subject, val)
    assert val is not None
    result = score_stage(subject, subject.original, val, request, "model").result
    return EvaluateReport(result, dataset_summary(val, None), list(subject.notes))


def _check_outputs(request: RetrofitRequest, model_format: ModelFormat) -> Path:
    if request.onnx_functions and model_format is not ModelFormat.ONNX:
        raise UsageError(f"--onnx-functions applies to ONNX models; {request.model} is "
                         f"{model_format.value}")
    output = request.output or default_output_path(request.model, request.config.name, model_format)
    onnx_outputs = [output] if model_format is ModelFormat.ONNX else []
    check_output_path(output, inputs=[request.model], force=request.force)
    if request.export_onnx is not None:
        if request.export_onnx.resolve() == output.resolve():
            raise UsageError("--export-onnx and -o name the same file")
        check_output_path(request.export_onnx, inputs=[request.model], force=request.force)
        onnx_outputs.append(request.export_onnx)
    from retrofit.onnx_path.io import external_data_path

    for onnx_output in onnx_outputs:  # written when the weights go external: ask first
        check_output_path(external_data_path(onnx_output), inputs=[request.model],
                          force=request.force)
    # Reports follow the model's --force rule. The checkpoint's own rule (resume or refuse) is
    # the fine-tuning's; only its folder is checked here. All of it now, not after a fine-tune
    # whose result would then be lost.
    inputs = [path for path in (request.model, request.data.val, request.data.train) if path]
    for report in (request.plot, request.markdown):
        if report is not None:
            check_output_path(report, inputs=inputs, force=request.force)
    if request.finetune is not None:
        checkpoint = _checkpoint_path(request, output)
        for path in (checkpoint, _control_checkpoint(checkpoint)):
            check_output_path(path, inputs=inputs, force=True)
    return output


def _checkpoint_path(request: RetrofitRequest, output: Path) -> Path:
    """The fine-tuning checkpoint: ``--checkpoint``, else ``OUTPUT.ckpt`` beside the output."""
    assert request.finetune is not None
    return Path(request.finetune.checkpoint or output.with_name(output.name + ".ckpt"))


def _control_checkpoint(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".control" + checkpoint.suffix)


@dataclass
class OpenedModel:
    """What every arm of a job shares: the model, opened, and the data as it takes it."""

    subject: Subject
    val: ClassificationData | None
    train: ClassificationData | None


def open_model(request: RetrofitRequest) -> OpenedModel:
    """Load the data, open the model with its sample inputs, and feed the data as it takes it."""
    val, train = _load_data(request.data, request.seed)
    subject = _open(request, val)
    fed = OpenedModel(subject, _fed_to(subject, val), _fed_to(subject, train))
    if fed.val is not None:  # the sample inputs as the data is fed (uint8 pixels scaled, ...)
        subject.feed_data_sample(_first_samples(fed.val))
    return fed


def _first_samples(data: ClassificationData) -> torch.Tensor:
    """The inputs of the dataset's first two samples: the sample inputs when there are none."""
    return torch.stack([data[i][0] for i in range(min(2, len(data)))])


@dataclass
class Swapped:
    """The rewritten model in the subject's format, its report so far, and the site values
    (calibrated gains) that the torch model to fine-tune starts from."""

    report: RetrofitReport
    model: Any
    site_values: dict[str, dict[str, float]] | None


def swap(opened: OpenedModel, request: RetrofitRequest, output: Path | None = None,
         before: Stage | None = None) -> Swapped:
    """Rewrite, calibrate (MRePU), verify and score the swapped model.

    Raises :class:`~retrofit.errors.ParityError` when an identity-initialised rewrite changed
    the outputs, or when the rewritten model's outputs on the sample inputs are NaN or inf where
    the original's are finite: a model that computes no numbers is never a result. ``before``
    is the original's score when the caller has it already."""
    subject, val = opened.subject, opened.val
    result = _rewrite(subject, request)
    calibration = None
    if _calibrated(request.config):
        calibration = _calibrate(opened, request)
        if calibration is not None:
            result = subject.rewrite(request.config, request.select, calibration.site_values())
    report = RetrofitReport(request.model, subject.format, request.config.name, request.config,
                            result.sites, subject.notes + result.notes,
                            subject.parity(result.model), request.config.is_identity_init,
                            request.tolerance, output, calibration=calibration)
    if report.parity is not None:
        report.parity.require_finite(f"the {request.config.name} swap")
        if report.preserves_function:
            report.parity.require(request.tolerance,
                                  "the identity-initialised retrofit changed the outputs")
    if calibration is not None:
        report.notes.append(calibration.summary())
    if val is not None:
        report.dataset = dataset_summary(val, opened.train)
        report.stages.append(before or score_stage(subject, subject.original, val, request,
                                                   "before"))
        report.stages.append(score_stage(subject, result.model, val, request, "after swap"))
    site_values = calibration.site_values() if calibration is not None else None
    return Swapped(report, result.model, site_values)


def retrofit_file(request: RetrofitRequest) -> RetrofitReport:
    """Rewrite the model file, verify, score and fine-tune it, and write it; the input is never
    modified and nothing is written when a step fails.

    Raises :class:`~retrofit.errors.ParityError` when an identity-init rewrite does not
    reproduce the original outputs within ``request.tolerance`` or the rewritten model computes
    NaN/inf, and any other :class:`~retrofit.errors.RetrofitError` found before the report
    exists. What fails after it (a fine-tune that diverged, a fine-tuned model that computes
    NaN/inf, an output that cannot be written) is ``report.failure``, and failed gates are in
    ``report.gates``: the caller shows the report, then acts on them.
    """
    output = _check_outputs(request, detect_format(request.model))
    opened = open_model(request)
    swapped = swap(opened, request, output)
    report = swapped.report
    final = swapped.model
    checkpoints: list[Path] = []  # the fine-tune's, kept until the outputs are written
    if opened.train is not None and opened.val is not None:
        from retrofit.training.results import TrainingDiverged

        try:
            final, checkpoints = _finetune(opened, request, swapped)
        except TrainingDiverged as diverged:
            report.notes.append(f"fine-tuning stopped: {diverged}")
            report.failure = diverged
    elif not report.preserves_function:
        report.notes.append(f"{request.config.name} does not start as ReLU: the model computes a "
                            "different function now; fine-tune it (--finetune) to recover accuracy")
    _compare(report, request.seed)
    if report.failure is None:
        _probe_overflow(opened.subject, final, request, report)
        report.gates = _gates(report, request.gates)
        if is_main_process():
            _write_outputs(opened.subject, final, request, report, checkpoints)
    return report


def _probe_overflow(subject: Subject, model: Any, request: RetrofitRequest,
                    report: RetrofitReport) -> None:
    """Warn, first among the notes, when the model about to be written overflows on its sample
    inputs scaled up a little: finite on data like the samples only."""
    from retrofit.verify import overflow_scale

    if not isinstance(request.config, (MRePUConfig, RePUConfig)) or report.parity is None:
        return
    report.overflow_scale = overflow_scale(lambda scale: subject.scaled_outputs(model, scale))
    if report.overflow_scale is not None:
        report.notes.insert(0, (
            f"{request.config.name} overflows: its outputs are NaN or inf on the sample inputs "
            f"scaled by {report.overflow_scale:g}; it grows like |x|^{request.config.p + 1:g} "
            "per site, so feed it inputs at the scale of the data it was calibrated on"))


def _calibrated(config: ActivationConfig) -> bool:
    return isinstance(config, MRePUConfig) and config.calibrate


CALIBRATION_SAMPLES = 128
"""How many samples the calibrated swap fits on: the gains are two numbers per site, and each
site sees thousands of elements per sample."""


def _calibrate(opened: OpenedModel, request: RetrofitRequest) -> Any:
    """Fit the MRePU gains (a :class:`~retrofit.pipeline.calibrate.Calibration`) in the torch form of
    the model, on the device the job runs on; None when there are no inputs to fit on."""
    from retrofit.pipeline.calibrate import calibrate_gains, site_modules
    from retrofit.evaluation.evaluate import input_dtype
    from retrofit.torch_path.rewrite import retrofit_torch_model

    batches, source = _calibration_batches(opened, request)
    if not batches:
        return None
    rewritten = retrofit_torch_model(opened.subject.trainable_original(), request.config,
                                     request.select)
    model = rewritten.model
    device, cast = resolve_device(request.device), input_dtype(model)
    fed = [tuple(t.to(device, cast if cast is not None and t.is_floating_point() else t.dtype)
                 for t in batch) for batch in batches]
    model.to(device)
    return calibrate_gains(model, site_modules(rewritten), fed, source, seed=request.seed)


def _calibration_batches(opened: OpenedModel, request: RetrofitRequest
                         ) -> tuple[list[tuple[torch.Tensor, ...]], str]:
    """Up to :data:`CALIBRATION_SAMPLES` samples of the fine-tuning data, else of the
    validation data, else the sample inputs (random values: the report says so), in batches
    the model takes; and what they are, for the report."""
    from retrofit.evaluation.batching import first_row_repeated
    from retrofit.pipeline.calibrate import RANDOM_INPUTS

    subject = opened.subject
    data, source = ((opened.train, "training data") if opened.train is not None
                    else (opened.val, "validation data"))
    if data is None:
        sample = subject.sample_tensors
        return ([sample], RANDOM_INPUTS) if sample else ([], "")
    count = min(len(data), CALIBRATION_SAMPLES)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(request.seed))
    xs = torch.stack([data[int(i)][0] for i in order[:count]])
    size = subject.fixed_batch or min(request.data.batch_size, 64)
    batches = [xs[start:start + size] for start in range(0, count, size)]
    if subject.fixed_batch is not None and batches[-1].shape[0] < size:
        batches[-1] = first_row_repeated(batches[-1], size - batches[-1].shape[0])
    return [(batch,) for batch in batches], source


def _write_outputs(subject: Subject, final: Any, request: RetrofitRequest,
                   report: RetrofitReport, checkpoints: list[Path]) -> None:
    """The ONNX export, then the model; the fine-tune's checkpoints go only once both are
    written (those the user named stay), so an interrupt or a full disk before that loses no
    training (``--resume``). An output that cannot be written is ``report.failure``; the export
    is checked before it is written, so a failed check writes nothing at all."""
    from retrofit.training.results import TrainingInterrupted

    try:
        if request.export_onnx is not None:
            _export(subject, final, request, report)
            report.written.append(request.export_onnx)
        subject.save(final, report.output, _step(report))
        report.written.append(report.output)
    except OutputError as error:
        report.failure = error
        return
    except KeyboardInterrupt as interrupt:
        if not checkpoints or isinstance(interrupt, TrainingInterrupted):
            raise
        raise TrainingInterrupted("interrupted before the model was written", report.finetune,
                                  checkpoints[0]) from None
    if checkpoints and request.finetune.checkpoint is None:  # the user's own checkpoint stays
        for checkpoint in checkpoints:
            checkpoint.unlink(missing_ok=True)


def _step(report: RetrofitReport) -> RetrofitStep:
    """This retrofit as a weights file records it: the final activation and its sites."""
    return RetrofitStep(final_config(report.config), tuple(site.name for site in report.replaced))


def _compare(report: RetrofitReport, seed: int) -> None:
    """Paired differences: each later stage against "before", the final model against control."""
    if not report.stages:
        return
    before = report.stages[0].result.correct1
    for stage in report.stages[1:]:
        key = "swap" if stage.name == "after swap" else "finetune"
        report.deltas[key] = paired_delta_ci(before, stage.result.correct1, seed=seed)
    if report.control is not None:
        report.deltas["vs_control"] = paired_delta_ci(
            report.control.result.correct1, report.stages[-1].result.correct1, seed=seed)


def _finetune(opened: OpenedModel, request: RetrofitRequest,
              swapped: Swapped) -> tuple[Any, list[Path]]:
    """Fine-tune the retrofitted model (and the ReLU control when asked); returns the final
    model in the subject's format and the runs' checkpoints. A final model that computes
    NaN/inf is ``report.failure``. Ctrl-C after the fine-tune finished says which checkpoint
    keeps it."""
    from retrofit.training.results import TrainingInterrupted

    report = swapped.report
    assert report.output is not None and opened.train is not None and opened.val is not None
    config = finetune_config(opened, request, _checkpoint_path(request, report.output), report)
    trained = finetune_swapped(opened, request, swapped, config)
    checkpoint = Path(config.checkpoint)
    try:
        if request.plot is not None:
            from retrofit.pipeline.plots import save_training_plot

            save_training_plot(trained.history, request.plot)
            report.written.append(request.plot)
        final = report_trained(opened, request, report, trained)
        kept = [checkpoint]
        if request.control:
            control_checkpoint = _control_checkpoint(checkpoint)
            report.control = finetune_control(
                opened, request, report, replace(config, checkpoint=control_checkpoint))
            kept.append(control_checkpoint)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted after the fine-tune finished", trained,
                                  checkpoint) from None
    return final, kept


def finetune_config(opened: OpenedModel, request: RetrofitRequest, checkpoint: Path,
                    report: RetrofitReport) -> Any:
    """The request's :class:`~retrofit.training.loop.FinetuneConfig` for this job: its device, its
    checkpoint, and exact batches for a model that takes one batch size (said in the report)."""
    assert opened.train is not None
    config = replace(request.finetune, device=request.device, checkpoint=checkpoint)
    fixed = opened.subject.fixed_batch
    if fixed is not None:
        config = replace(config, batch_size=fixed, exact_batches=True)
        note = exact_batches_note(fixed, request.finetune.batch_size, len(opened.train),
                                  world_size())
        if note not in report.notes:
            report.notes.append(note)
    return config


def finetune_swapped(opened: OpenedModel, request: RetrofitRequest, swapped: Swapped,
                     config: Any) -> Any:
    """Fine-tune the swapped model, from its calibrated gains; the result is
    ``swapped.report.finetune``."""
    assert opened.train is not None and opened.val is not None
    model = opened.subject.trainable(request.config, request.select, swapped.site_values)
    trained = _finetune_once(model, opened.train, opened.val, config, request, swapped.report)
    swapped.report.finetune = trained
    return trained


def report_trained(opened: OpenedModel, request: RetrofitRequest, report: RetrofitReport,
                   trained: Any) -> Any:
    """The fine-tuned model in the subject's format, checked (ONNX against torch, outputs
    finite) and scored; a model that computes NaN/inf is ``report.failure``."""
    from retrofit.errors import ParityError

    assert opened.val is not None
    subject = opened.subject
    final, report.trained_parity = subject.from_trained(trained.model, request.config,
                                                       request.select)
    if report.trained_parity is not None:
        report.trained_parity.require(request.tolerance * 10,
                                      "the fine-tuned ONNX model disagrees with torch")
    parity = subject.parity(final)
    try:
        if parity is not None:
            parity.require_finite(f"the fine-tuned {request.config.name} model")
    except ParityError as error:
        report.failure = error
    report.stages.append(score_stage(subject, final, opened.val, request, "after fine-tune"))
    return final


def finetune_control(opened: OpenedModel, request: RetrofitRequest, report: RetrofitReport,
                     config: Any) -> Stage:
    """The untouched ReLU model fine-tuned with the same budget, scored."""
    assert opened.train is not None and opened.val is not None
    control = _finetune_once(opened.subject.trainable_original(), opened.train, opened.val,
                             config, request, report)
    return Stage("control", _score_torch(control.model, opened.val, request,
                                         opened.subject.fixed_batch))


def _finetune_once(model: Any, train: ClassificationData, val: ClassificationData,
                   config: Any, request: RetrofitRequest, report: RetrofitReport) -> Any:
    """One fine-tuning run. Its checkpoint stays until the job's outputs are written. With
    ``--resume`` a run whose checkpoint is missing (a control arm never started) starts anew;
    one that had finished only loads its final state."""
    from retrofit.training.loop import finetune

    checkpoint = Path(config.checkpoint)
    if request.force and not config.resume:
        checkpoint.unlink(missing_ok=True)
    if config.resume:
        if checkpoint.exists():
            report.resumed = True
        elif report.finetune is not None:  # the retrofitted arm was resumed: this one is new
            config = replace(config, resume=False)
    result = finetune(model, train, val, config)
    report.notes.extend(note for note in result.notes if note not in report.notes)
    return result


def _score_torch(module: Any, val: ClassificationData, request: RetrofitRequest,
                 fixed_batch: int | None) -> EvalResult:
    from retrofit.evaluation.evaluate import torch_predictor

    return evaluate(torch_predictor(module, device=request.device, fixed_batch=fixed_batch), val,
                    batch_size=request.data.batch_size, description="scoring control")


def _export(subject: Subject, final: Any, request: RetrofitRequest, report: RetrofitReport) -> None:
    """Write the ONNX export: a torch model is exported and checked against onnxruntime; an
    ONNX model is already ONNX and is saved as it is."""
    path = request.export_onnx
    assert path is not None
    if isinstance(subject, TorchSubject):
        from retrofit.torch_path.export import export_onnx

        if subject.inputs is None:
            raise UsageError("--export-onnx needs sample inputs: pass --input-shape or --data")
        exported = export_onnx(final, subject.inputs, path,
                               dynamic_dims=subject.loaded.dynamic_dims,
                               tolerance=request.tolerance, force=request.force)
        report.onnx_export_parity = exported.parity
        if exported.note is not None:
            report.notes.append(exported.note)
    else:
        subject.save(final, path)
    report.onnx_export = path
