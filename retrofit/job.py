"""The retrofit job end to end, as library calls: load, score, rewrite, verify, fine-tune,
score again, gate, save, report.

``cadrelu retrofit``, ``inspect`` and ``evaluate`` are thin wrappers over :func:`retrofit_file`,
:func:`inspect_file` and :func:`evaluate_file`; a Python user gets the same behaviour and the
same report objects. The format-specific work is done by a :class:`~retrofit.subjects.Subject`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from retrofit.atomic import check_output_path
from retrofit.options import flag, require_finite
from retrofit.config import ActivationConfig, CompetitiveReLUConfig, MRePUConfig
from retrofit.batching import exact_batches_note
from retrofit.data import (
    ClassificationData, as_float_inputs, as_token_ids, check_same_classes, load_dataset,
    split_train_val,
)
from retrofit.distributed import is_main_process, world_size
from retrofit.errors import OutputError, RetrofitError, UnsupportedModelError, UsageError
from retrofit.evaluate import EvalResult, evaluate, resolve_device
from retrofit.inputs import InputShape
from retrofit.metrics import PairedDelta, paired_delta_ci
from retrofit.model_io import ModelFormat, default_output_path, detect_format
from retrofit.sites import ReluSite, RetrofitResult, SiteSelector
from retrofit.retrofit_record import RetrofitStep
from retrofit.subjects import NO_SAMPLE_INPUT, Subject, TorchSubject, final_config, open_subject
from retrofit.verify import OutputParity


_MREPU_GROWTH = (
    "MRePU grows like |x|^3, and pre-activations of a few units compound through deep or "
    "residual stacks (a longer --blend-ramp delays this but did not prevent it on the sample "
    "CNN, bench/results/repro_retrofit_budget.md); MRePU retrofits shallow networks such as the "
    "sample MLP, and CompetitiveReLU, which starts as ReLU, retrofits both"
)


@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how images are prepared (see :func:`retrofit.data.load_dataset`)."""

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

    ``finetune`` is a :class:`retrofit.train.FinetuneConfig` (fine-tuning runs when
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


def _dataset_summary(val: ClassificationData, train: ClassificationData | None) -> dict[str, Any]:
    """The data as the report shows it; ``class_index`` maps class names to the indices they
    were read as (None when the labels were indices already)."""
    return {
        "validation": val.source, "validation_samples": len(val),
        "train": train.source if train is not None else None,
        "train_samples": len(train) if train is not None else 0,
        "classes": val.num_classes, "preprocessing": val.preprocessing,
        "class_index": dict(val.classes.index) if val.classes is not None else None,
    }


def _score(subject: Subject, model: Any, val: ClassificationData, request: RetrofitRequest,
           name: str) -> Stage:
    predictor = subject.predictor(model, request.device)
    return Stage(name, evaluate(predictor, val, batch_size=request.data.batch_size,
                                description=f"scoring {name}"))


def _gates(report: RetrofitReport, gates: Gates) -> list[GateResult]:
    if not gates.any:
        return []
    assert report.stages, "a gate without data is refused by RetrofitRequest"
    change = report.stages[-1].result.top1 - report.stages[0].result.top1
    results = []
    if gates.max_drop is not None:
        results.append(GateResult("max_drop", gates.max_drop, -change, -change <= gates.max_drop))
    if gates.min_gain is not None:
        results.append(GateResult("min_gain", gates.min_gain, change, change >= gates.min_gain))
    return results


def _open(request: RetrofitRequest, val: ClassificationData | None) -> Subject:
    model_format = detect_format(request.model)
    sample = None
    if val is not None:
        sample = torch.stack([val[i][0] for i in range(min(2, len(val)))])
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
    result = _score(subject, subject.original, val, request, "model").result
    return EvaluateReport(result, _dataset_summary(val, None), list(subject.notes))


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
    from retrofit.onnx_io import external_data_path

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


def retrofit_file(request: RetrofitRequest) -> RetrofitReport:
    """Rewrite the model file, verify, score and fine-tune it, and write it; the input is never
    modified and nothing is written when a step fails.

    Raises :class:`~retrofit.errors.ParityError` when an identity-init rewrite does not
    reproduce the original outputs within ``request.tolerance``, and any other
    :class:`~retrofit.errors.RetrofitError` found before the report exists. What fails after it
    (a fine-tune that diverged, an output that cannot be written) is ``report.failure``, and
    failed gates are in ``report.gates``: the caller shows the report, then acts on them.
    """
    output = _check_outputs(request, detect_format(request.model))
    val, train = _load_data(request.data, request.seed)
    subject = _open(request, val)
    val, train = _fed_to(subject, val), _fed_to(subject, train)
    result = _rewrite(subject, request)
    report = RetrofitReport(request.model, subject.format, request.config.name, request.config,
                            result.sites, subject.notes + result.notes,
                            subject.parity(result.model), request.config.is_identity_init,
                            request.tolerance, output)
    if report.parity is not None and report.preserves_function:
        report.parity.require(request.tolerance,
                              "the identity-initialised retrofit changed the outputs")
    final = result.model
    if val is not None:
        report.dataset = _dataset_summary(val, train)
        report.stages.append(_score(subject, subject.original, val, request, "before"))
        report.stages.append(_score(subject, result.model, val, request, "after swap"))
    checkpoints: list[Path] = []  # the fine-tune's, kept until the outputs are written
    if train is not None and val is not None:
        from retrofit.train import TrainingDiverged

        try:
            final, checkpoints = _finetune(subject, request, train, val, report)
        except TrainingDiverged as diverged:
            report.notes.append(f"fine-tuning stopped: {diverged}")
            report.failure = diverged
    elif not report.preserves_function:
        report.notes.append(f"{request.config.name} does not start as ReLU: the model computes a "
                            "different function now; fine-tune it (--finetune) to recover accuracy")
    if isinstance(request.config, MRePUConfig) and report.parity and not math.isfinite(
            report.parity.max_abs_diff):
        report.notes.append(f"MRePU overflows in this network right after the swap. {_MREPU_GROWTH}")
    _compare(report, request.seed)
    if report.failure is None:
        report.gates = _gates(report, request.gates)
        if is_main_process():
            _write_outputs(subject, final, request, report, checkpoints)
    return report


def _write_outputs(subject: Subject, final: Any, request: RetrofitRequest,
                   report: RetrofitReport, checkpoints: list[Path]) -> None:
    """The ONNX export, then the model; the fine-tune's checkpoints go only once both are
    written (those the user named stay), so an interrupt or a full disk before that loses no
    training (``--resume``). An output that cannot be written is ``report.failure``; the export
    is checked before it is written, so a failed check writes nothing at all."""
    from retrofit.train import TrainingInterrupted

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


def _finetune(subject: Subject, request: RetrofitRequest, train: ClassificationData,
              val: ClassificationData, report: RetrofitReport) -> tuple[Any, list[Path]]:
    """Fine-tune the retrofitted model (and the ReLU control when asked); returns the final
    model in the subject's format and the runs' checkpoints. Ctrl-C after the fine-tune
    finished says which checkpoint keeps it."""
    from retrofit.train import TrainingInterrupted

    assert report.output is not None
    checkpoint = _checkpoint_path(request, report.output)
    config = replace(request.finetune, device=request.device, checkpoint=checkpoint)
    if subject.fixed_batch is not None:
        config = replace(config, batch_size=subject.fixed_batch, exact_batches=True)
        report.notes.append(exact_batches_note(subject.fixed_batch, request.finetune.batch_size,
                                               len(train), world_size()))
    trained = _finetune_once(subject.trainable(request.config, request.select), train, val,
                             config, request, report)
    try:
        report.finetune = trained
        if request.plot is not None:
            from retrofit.plots import save_training_plot

            save_training_plot(trained.history, request.plot)
            report.written.append(request.plot)
        final, report.trained_parity = subject.from_trained(trained.model, request.config,
                                                           request.select)
        if report.trained_parity is not None:
            report.trained_parity.require(request.tolerance * 10,
                                          "the fine-tuned ONNX model disagrees with torch")
        report.stages.append(_score(subject, final, val, request, "after fine-tune"))
        kept = [checkpoint]
        if request.control:
            control_checkpoint = _control_checkpoint(checkpoint)
            control = _finetune_once(subject.trainable_original(), train, val,
                                     replace(config, checkpoint=control_checkpoint), request,
                                     report)
            kept.append(control_checkpoint)
            report.control = Stage("control", _score_torch(control.model, val, request,
                                                           subject.fixed_batch))
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted after the fine-tune finished", trained,
                                  checkpoint) from None
    return final, kept


def _finetune_once(model: Any, train: ClassificationData, val: ClassificationData,
                   config: Any, request: RetrofitRequest, report: RetrofitReport) -> Any:
    """One fine-tuning run. Its checkpoint stays until the job's outputs are written. With
    ``--resume`` a run whose checkpoint is missing (a control arm never started) starts anew;
    one that had finished only loads its final state."""
    from retrofit.train import TrainingDiverged, finetune

    checkpoint = Path(config.checkpoint)
    if request.force and not config.resume:
        checkpoint.unlink(missing_ok=True)
    if config.resume:
        if checkpoint.exists():
            report.resumed = True
        elif report.finetune is not None:  # the retrofitted arm was resumed: this one is new
            config = replace(config, resume=False)
    try:
        result = finetune(model, train, val, config)
    except TrainingDiverged as diverged:
        if isinstance(request.config, MRePUConfig):
            raise TrainingDiverged(f"{diverged} {_MREPU_GROWTH}", diverged.result) from None
        raise
    report.notes.extend(note for note in result.notes if note not in report.notes)
    return result


def _score_torch(module: Any, val: ClassificationData, request: RetrofitRequest,
                 fixed_batch: int | None) -> EvalResult:
    from retrofit.evaluate import torch_predictor

    return evaluate(torch_predictor(module, device=request.device, fixed_batch=fixed_batch), val,
                    batch_size=request.data.batch_size, description="scoring control")


def _export(subject: Subject, final: Any, request: RetrofitRequest, report: RetrofitReport) -> None:
    """Write the ONNX export: a torch model is exported and checked against onnxruntime; an
    ONNX model is already ONNX and is saved as it is."""
    path = request.export_onnx
    assert path is not None
    if isinstance(subject, TorchSubject):
        from retrofit.onnx_export import export_onnx

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
