"""The first half of a retrofit, shared by every arm of a job: open the model with its data,
score the original, and swap its ReLUs (rewrite, calibrate MRePU, verify, score).

The swap is done once per arm: its rewrite in the model's format, and its torch form
(:class:`Swapped`'s ``trainable``) once something needs it, the calibration or a fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit.config import ActivationConfig, MRePUConfig
from retrofit.errors import UnsupportedModelError
from retrofit.evaluation.datasets.base import ClassificationData
from retrofit.evaluation.datasets.feeding import as_float_inputs, as_token_ids
from retrofit.evaluation.datasets.checks import check_same_classes
from retrofit.evaluation.datasets.load import load_dataset
from retrofit.evaluation.datasets.splits import split_train_val
from retrofit.evaluation.evaluate import device_kept, evaluate, resolve_device
from retrofit.pipeline.calibrate import Calibration
from retrofit.pipeline.report import RetrofitReport, Stage
from retrofit.pipeline.request import DataOptions, RetrofitRequest
from retrofit.pipeline.subjects import Model, Subject, open_subject
from retrofit.sites import RetrofitResult
from retrofit.torch_path.formats import detect_format

CALIBRATION_SAMPLES = 128
"""How many samples the calibrated swap fits on: the gains are two numbers per site, and each
site sees thousands of elements per sample."""


@dataclass
class OpenedModel:
    """What every arm of a job shares: the model, opened, and the data as it takes it."""

    subject: Subject
    val: ClassificationData | None
    train: ClassificationData | None


def load_data(options: DataOptions, seed: int
              ) -> tuple[ClassificationData | None, ClassificationData | None]:
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


def score_stage(subject: Subject, model: Model, val: ClassificationData,
                request: RetrofitRequest, name: str) -> Stage:
    """``model`` (in the subject's format) scored on ``val``, as the stage ``name``."""
    with device_kept(model):
        predictor = subject.predictor(model, request.device)
        return Stage(name, evaluate(predictor, val, batch_size=request.data.batch_size,
                                    description=f"scoring {name}"))


def open_subject_for(request: RetrofitRequest, val: ClassificationData | None) -> Subject:
    """The request's model, opened with the first samples of ``val`` for sample inputs."""
    sample = first_samples(val) if val is not None else None
    return open_subject(request.model, detect_format(request.model), arch=request.arch,
                        arch_kwargs=request.arch_kwargs, trust_pickle=request.trust_pickle,
                        input_shapes=request.input_shapes, seed=request.seed,
                        as_functions=request.onnx_functions, data_sample=sample)


def fed_to(subject: Subject, data: ClassificationData | None) -> ClassificationData | None:
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


def open_model(request: RetrofitRequest) -> OpenedModel:
    """Load the data, open the model with its sample inputs, and feed the data as it takes it."""
    val, train = load_data(request.data, request.seed)
    subject = open_subject_for(request, val)
    fed = OpenedModel(subject, fed_to(subject, val), fed_to(subject, train))
    if fed.val is not None:  # the sample inputs as the data is fed (uint8 pixels scaled, ...)
        subject.feed_data_sample(first_samples(fed.val))
    return fed


def first_samples(data: ClassificationData) -> torch.Tensor:
    """The inputs of the dataset's first two samples: the sample inputs when there are none."""
    return torch.stack([data[i][0] for i in range(min(2, len(data)))])


def rewrite(subject: Subject, request: RetrofitRequest) -> RetrofitResult[Model]:
    """The subject's rewrite. A model it cannot rewrite (no ReLU site, say) is named by its
    file: the rewriters only see a module or a graph."""
    try:
        return subject.rewrite(request.config, request.select)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{request.model}: {error}") from error


@dataclass
class Swapped:
    """One arm's swap: its report so far, the rewritten model in the subject's format, and
    that rewrite's torch form once made (:func:`torch_form`)."""

    report: RetrofitReport
    rewritten: RetrofitResult[Model]
    trainable: RetrofitResult[nn.Module] | None = None

    @property
    def model(self) -> Model:
        return self.rewritten.model


def torch_form(opened: OpenedModel, request: RetrofitRequest,
               swapped: Swapped) -> RetrofitResult[nn.Module]:
    """The swapped model as torch modules (calibrated where it was), made on first use."""
    if swapped.trainable is None:
        swapped.trainable = opened.subject.trainable(swapped.rewritten, request.config,
                                                     request.select)
    return swapped.trainable


def swap(opened: OpenedModel, request: RetrofitRequest, output: Path | None = None,
         before: Stage | None = None) -> Swapped:
    """Rewrite, calibrate (MRePU), verify and score the swapped model.

    Raises :class:`~retrofit.errors.ParityError` when an identity-initialised rewrite changed
    the outputs, or when the rewritten model's outputs on the sample inputs are NaN or inf where
    the original's are finite: a model that computes no numbers is never a result. ``before``
    is the original's score when the caller has it already."""
    subject, val = opened.subject, opened.val
    rewritten = rewrite(subject, request)
    trainable, calibration = None, None
    if _calibrated(request.config):
        trainable = subject.trainable(rewritten, request.config, request.select)
        calibration = _calibrate(opened, request, trainable)
        if calibration is not None:
            rewritten = _with_gains(subject, request, rewritten, trainable)
    report = RetrofitReport(request.model, subject.format, request.config.name, request.config,
                            rewritten.sites, subject.notes + rewritten.notes,
                            subject.parity(rewritten.model), request.config.is_identity_init,
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
        report.stages.append(score_stage(subject, rewritten.model, val, request, "after swap"))
    return Swapped(report, rewritten, trainable)


def _calibrated(config: ActivationConfig) -> bool:
    return isinstance(config, MRePUConfig) and config.calibrate


def _calibrate(opened: OpenedModel, request: RetrofitRequest,
               trainable: RetrofitResult[nn.Module]) -> Calibration | None:
    """Fit the MRePU gains of the swap's torch form in place, on the device the job runs on;
    None when there are no inputs to fit on."""
    from retrofit.evaluation.evaluate import input_dtype
    from retrofit.pipeline.calibrate import calibrate_gains, site_modules

    batches, source = _calibration_batches(opened, request)
    if not batches:
        return None
    model = trainable.model
    device, cast = resolve_device(request.device), input_dtype(model)
    fed = [tuple(t.to(device, cast if cast is not None and t.is_floating_point() else t.dtype)
                 for t in batch) for batch in batches]
    model.to(device)
    return calibrate_gains(model, site_modules(trainable), fed, source, seed=request.seed)


def _with_gains(subject: Subject, request: RetrofitRequest, rewritten: RetrofitResult[Model],
                trainable: RetrofitResult[nn.Module]) -> RetrofitResult[Model]:
    """The swap holding the calibrated gains of its torch form."""
    model, parity = subject.with_values(rewritten, request.config, trainable.model,
                                        trainable.sites)
    if parity is not None:
        parity.require(request.tolerance * 10, "the calibrated ONNX model disagrees with torch")
    return replace(rewritten, model=model)


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
