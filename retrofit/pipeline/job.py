"""The retrofit job end to end, as library calls: load, score, rewrite, verify, fine-tune,
score again, gate, save, report.

``cadrelu retrofit``, ``inspect`` and ``evaluate`` are thin wrappers over :func:`retrofit_file`,
:func:`inspect_file` and :func:`evaluate_file`; a Python user gets the same behaviour and the
same report objects. The steps are :mod:`retrofit.pipeline.swap` and
:mod:`retrofit.pipeline.finetune`; the format-specific work is done by a
:class:`~retrofit.pipeline.subjects.Subject`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrofit.atomic import check_output_path
from retrofit.config import MRePUConfig, RePUConfig
from retrofit.errors import OutputError, UsageError
from retrofit.evaluation.metrics import paired_delta_ci
from retrofit.pipeline.finetune import checkpoint_path, control_checkpoint, finetune_job
from retrofit.pipeline.report import EvaluateReport, RetrofitReport
from retrofit.pipeline.request import DataOptions, GateResult, Gates, RetrofitRequest, gate_results
from retrofit.pipeline.subjects import Model, Subject, TorchSubject, final_config
from retrofit.pipeline.swap import (
    dataset_summary, fed_to, load_data, open_model, open_subject_for, rewrite, score_stage, swap,
)
from retrofit.torch_path.formats import ModelFormat, default_output_path, detect_format
from retrofit.torch_path.record import RetrofitStep
from retrofit.training.distributed import is_main_process


def _gates(report: RetrofitReport, gates: Gates) -> list[GateResult]:
    if not gates.any:
        return []
    assert report.stages, "a gate without data is refused by RetrofitRequest"
    return gate_results(gates, report.stages[-1].result.top1 - report.stages[0].result.top1)


def inspect_file(request: RetrofitRequest) -> RetrofitReport:
    """A dry run: every ReLU site and whether the rewrite would replace it. Nothing is written."""
    subject = open_subject_for(request, None)
    result = rewrite(subject, request)
    return RetrofitReport(request.model, subject.format, request.config.name, request.config,
                          result.sites, subject.notes + result.notes,
                          subject.parity(result.model), request.config.is_identity_init,
                          request.tolerance)


def evaluate_file(model: Path, data: DataOptions, *, arch: str | None = None,
                  arch_kwargs: dict[str, Any] | None = None, trust_pickle: bool = False,
                  device: str = "auto") -> EvaluateReport:
    """Top-1/top-5 of any supported model on a dataset."""
    val, _ = load_data(data, seed=0)
    if val is None:
        raise UsageError("evaluate needs a dataset: pass --data")
    request = RetrofitRequest(model, arch=arch, arch_kwargs=dict(arch_kwargs or {}),
                              trust_pickle=trust_pickle, device=device, data=data)
    subject = open_subject_for(request, val)
    val = fed_to(subject, val)
    assert val is not None
    result = score_stage(subject, subject.original, val, request, "model").result
    return EvaluateReport(model, result, dataset_summary(val, None), list(subject.notes))


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
        checkpoint = checkpoint_path(request, output)
        for path in (checkpoint, control_checkpoint(checkpoint)):
            check_output_path(path, inputs=inputs, force=True)
    return output


def retrofit_file(request: RetrofitRequest) -> RetrofitReport:
    """Rewrite the model file, verify, score and fine-tune it, and write it; the input is never
    modified and nothing is written when a step fails.

    Raises :class:`~retrofit.errors.ParityError` when an identity-init rewrite does not
    reproduce the original outputs within ``request.tolerance`` or the rewritten model computes
    NaN/inf, and any other :class:`~retrofit.errors.RetrofitError` found before the report
    exists. What fails after it (a fine-tune that diverged, a fine-tuned model that computes
    NaN/inf, an output that cannot be written) is ``report.failure``, and failed gates are in
    ``report.gates``: the caller shows the report, then ``report.raise_for_outcome()`` raises
    the failure or a :class:`~retrofit.errors.GateError`.
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
            final, checkpoints = finetune_job(opened, request, swapped)
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


def _probe_overflow(subject: Subject, model: Model, request: RetrofitRequest,
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


def _write_outputs(subject: Subject, final: Model, request: RetrofitRequest,
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
    if checkpoints and request.finetune is not None and request.finetune.checkpoint is None:
        # the user's own checkpoint stays
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


def _export(subject: Subject, final: Model, request: RetrofitRequest, report: RetrofitReport) -> None:
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
