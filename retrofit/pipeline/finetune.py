"""The second half of a retrofit: fine-tune the swapped model (and the ReLU control), check the
result and score it. ``cadrelu retrofit`` and every arm of ``cadrelu compare`` are these steps.

Every fine-tune is :func:`retrofit.training.loop.finetune`, on the swap's torch form
(:func:`~retrofit.pipeline.swap.torch_form`, made once) or on the original's
(:meth:`~retrofit.pipeline.subjects.Subject.torch_original`, made once for all arms).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from torch import nn

from retrofit.errors import ParityError
from retrofit.evaluation.batching import exact_batches_note
from retrofit.evaluation.datasets.base import ClassificationData
from retrofit.evaluation.evaluate import EvalResult, evaluate
from retrofit.pipeline.report import RetrofitReport, Stage
from retrofit.pipeline.request import RetrofitRequest
from retrofit.pipeline.subjects import Model, final_config
from retrofit.pipeline.swap import OpenedModel, Swapped, score_stage, torch_form
from retrofit.training.distributed import world_size
from retrofit.training.config import FinetuneConfig
from retrofit.training.results import FinetuneResult


def checkpoint_path(request: RetrofitRequest, output: Path) -> Path:
    """The fine-tuning checkpoint: ``--checkpoint``, else ``OUTPUT.ckpt`` beside the output."""
    assert request.finetune is not None
    return Path(request.finetune.checkpoint or output.with_name(output.name + ".ckpt"))


def control_checkpoint(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".control" + checkpoint.suffix)


@contextmanager
def keeps_finished(trained: FinetuneResult, checkpoint: Path) -> Iterator[None]:
    """Ctrl-C after a fine-tune finished, while its result is checked and scored, says which
    checkpoint keeps that fine-tune: ``--resume`` then loads it instead of training again."""
    from retrofit.training.results import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted after the fine-tune finished", trained,
                                  checkpoint) from None


def finetune_job(opened: OpenedModel, request: RetrofitRequest,
                 swapped: Swapped) -> tuple[Model, list[Path]]:
    """Fine-tune the retrofitted model (and the ReLU control when asked); returns the final
    model in the subject's format and the runs' checkpoints. A final model that computes
    NaN/inf is ``report.failure``."""
    report = swapped.report
    assert report.output is not None and request.finetune is not None
    config = finetune_config(opened, request, checkpoint_path(request, report.output), report)
    trained = finetune_swapped(opened, request, swapped, config)
    checkpoint = Path(config.checkpoint)  # type: ignore[arg-type]
    with keeps_finished(trained, checkpoint):
        if request.plot is not None:
            from retrofit.pipeline.plots import save_training_plot

            save_training_plot(trained.history, request.plot)
            report.written.append(request.plot)
        final = report_trained(opened, request, swapped, trained)
        kept = [checkpoint]
        if request.control:
            control = control_checkpoint(checkpoint)
            report.control = finetune_control(opened, request, report,
                                              replace(config, checkpoint=control))
            kept.append(control)
    return final, kept


def finetune_config(opened: OpenedModel, request: RetrofitRequest, checkpoint: Path,
                    report: RetrofitReport) -> FinetuneConfig:
    """The request's fine-tuning config for this job: its device, its checkpoint, and exact
    batches for a model that takes one batch size (said in the report)."""
    assert opened.train is not None and request.finetune is not None
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
                     config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune the swap's torch form, from its calibrated gains; the result is
    ``swapped.report.finetune``."""
    assert opened.train is not None and opened.val is not None
    model = torch_form(opened, request, swapped).model
    trained = _finetune_once(model, opened.train, opened.val, config, request, swapped.report)
    swapped.report.finetune = trained
    return trained


def report_trained(opened: OpenedModel, request: RetrofitRequest, swapped: Swapped,
                   trained: FinetuneResult) -> Model:
    """The fine-tuned model in the subject's format, checked (ONNX against torch, outputs
    finite) and scored; a model that computes NaN/inf is ``report.failure``."""
    assert opened.val is not None
    subject, report = opened.subject, swapped.report
    config = final_config(request.config)
    rewritten = swapped.rewritten
    if config != request.config:  # an MRePU blend below 1 ends at 1: another graph
        rewritten = subject.rewrite(config, request.select)
    sites = torch_form(opened, request, swapped).sites
    final, report.trained_parity = subject.with_values(rewritten, config, trained.model, sites)
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
                     config: FinetuneConfig) -> Stage:
    """The untouched ReLU model fine-tuned with the same budget, scored."""
    assert opened.train is not None and opened.val is not None
    control = _finetune_once(opened.subject.torch_original(), opened.train, opened.val,
                             config, request, report)
    return Stage("control", _score_torch(control.model, opened.val, request,
                                         opened.subject.fixed_batch))


def _finetune_once(model: nn.Module, train: ClassificationData, val: ClassificationData,
                   config: FinetuneConfig, request: RetrofitRequest,
                   report: RetrofitReport) -> FinetuneResult:
    """One fine-tuning run (on a copy of ``model``). Its checkpoint stays until the job's
    outputs are written. With ``--resume`` a run whose checkpoint is missing (a control arm
    never started) starts anew; one that had finished only loads its final state."""
    from retrofit.training.loop import finetune

    checkpoint = Path(config.checkpoint)  # type: ignore[arg-type]
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


def _score_torch(module: nn.Module, val: ClassificationData, request: RetrofitRequest,
                 fixed_batch: int | None) -> EvalResult:
    from retrofit.evaluation.evaluate import device_kept, torch_predictor

    with device_kept(module):
        return evaluate(torch_predictor(module, device=request.device, fixed_batch=fixed_batch),
                        val, batch_size=request.data.batch_size, description="scoring control")
