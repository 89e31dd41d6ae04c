"""Reports of a retrofit and of an evaluation: what happened, as data, and its views: a rich
view for people, JSON for machines, Markdown for CI summaries.

The JSON keys are documented in the README ("JSON report") and versioned by ``version``: a CI
step may parse them. Accuracies are percentages, differences percentage points.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from retrofit.atomic import write_text_atomic
from retrofit.config import ActivationConfig
from retrofit.errors import RetrofitError
from retrofit.evaluation.datasets.names import shown_name
from retrofit.evaluation.evaluate import EvalResult
from retrofit.evaluation.metrics import PairedDelta
from retrofit.pipeline.request import GateResult, gate_error
from retrofit.pipeline.subjects import NO_SAMPLE_INPUT
from retrofit.sites import ReluSite
from retrofit.torch_path.formats import ModelFormat
from retrofit.verify import OutputParity

if TYPE_CHECKING:
    from retrofit.pipeline.calibrate import Calibration
    from retrofit.training.results import FinetuneResult

REPORT_VERSION = 1
EVALUATE_REPORT_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """One scored model: ``name`` is before / after swap / after fine-tune / control."""

    name: str
    result: EvalResult


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
    finetune: FinetuneResult | None = None
    trained_parity: OutputParity | None = None
    onnx_export: Path | None = None
    onnx_export_parity: OutputParity | None = None
    unverified: str = ""
    written: list[Path] = field(default_factory=list)
    """The files this run wrote, in order; ``output`` is where the model was to go."""
    failure: RetrofitError | None = None
    """What stopped the job after the report was made (a fine-tune that diverged, an output that
    could not be written): :meth:`raise_for_outcome` raises it once the report is shown."""
    resumed: bool = False
    """Whether a fine-tune went on from a checkpoint (``--resume``)."""
    calibration: Calibration | None = None
    """The calibrated swap's per-site fits, when the activation was calibrated."""
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

    def raise_for_outcome(self) -> None:
        """Raise what the job ended with, for a caller that shows the report first: the
        failure that stopped it, else a :class:`~retrofit.errors.GateError` for failed gates."""
        if self.failure is not None:
            raise self.failure
        failed = gate_error(self.gates)
        if failed is not None:
            raise failed


@dataclass(frozen=True)
class EvaluateReport:
    """What ``cadrelu evaluate`` found: the scores, the dataset, and what loading changed that
    the user must hear (a module saved in training mode, a rebuilt retrofit)."""

    model: Path
    result: EvalResult
    dataset: dict[str, Any]
    notes: list[str]

_DELTA_TITLES = {
    "swap": "after swap vs before",
    "finetune": "after fine-tune vs before",
    "vs_control": "after fine-tune vs ReLU control (same budget)",
}


def _parity(parity: OutputParity | None) -> dict[str, float] | None:
    if parity is None:
        return None
    return {"max_abs_diff": parity.max_abs_diff, "relative": parity.relative}


def _finetune_summary(report: RetrofitReport) -> dict[str, Any] | None:
    result = report.finetune
    if result is None:
        return None
    return {
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "best_val_top1": result.best_val_top1,
        "stopped_early": result.stopped_early,
        "history": [dataclasses.asdict(epoch) for epoch in result.history],
    }


def report_to_dict(report: RetrofitReport) -> dict[str, Any]:
    """The report as plain JSON-ready data (see README, "JSON report")."""
    stages = [*report.stages, *([report.control] if report.control else [])]
    return {
        "verified": report.verified,
        "unverified_reason": report.unverified or None,
        "version": REPORT_VERSION,
        "model": str(report.model),
        "format": report.format.value,
        "activation": report.activation,
        "config": dataclasses.asdict(report.config),
        "output": str(report.output) if report.output in report.written else None,
        "written": [str(path) for path in report.written],
        "failure": str(report.failure) if report.failure else None,
        "resumed": report.resumed,
        "sites": [dataclasses.asdict(site) for site in report.sites],
        "replaced": len(report.replaced),
        "kept": len(report.sites) - len(report.replaced),
        "parity": None if report.parity is None else {
            **_parity(report.parity),  # type: ignore[dict-item]
            "tolerance": report.tolerance,
            "required": report.preserves_function,
        },
        "dataset": report.dataset,
        "accuracy": {
            stage.name: {"top1": stage.result.top1, "top5": stage.result.top5, "n": stage.result.n}
            for stage in stages
        },
        "deltas": {name: dataclasses.asdict(delta) for name, delta in report.deltas.items()},
        "gates": [dataclasses.asdict(gate) for gate in report.gates],
        "gates_passed": report.gates_passed,
        "calibration": (None if report.calibration is None
                        else dataclasses.asdict(report.calibration)),
        "overflow_scale": report.overflow_scale,
        "finetune": _finetune_summary(report),
        "trained_onnx_parity": _parity(report.trained_parity),
        "onnx_export": str(report.onnx_export) if report.onnx_export in report.written else None,
        "onnx_export_parity": _parity(report.onnx_export_parity),
        "notes": list(report.notes),
    }


def report_to_json(report: RetrofitReport) -> str:
    return json.dumps(report_to_dict(report), indent=2, default=str)


def _delta_text(delta: PairedDelta) -> str:
    return (f"{delta.delta:+.2f} pp (95% CI {delta.ci_low:+.2f} to {delta.ci_high:+.2f}; "
            f"McNemar p={delta.mcnemar_p:.3g}; {delta.gained} gained, {delta.lost} lost)")


def _gate_text(gate: GateResult) -> str:
    measured = "drop" if gate.name == "max_drop" else "gain"
    return f"{gate.name} {gate.threshold:g} pp ({measured} {gate.value:.2f} pp)"


_UNBOUNDED = 100_000
"""Width a table is measured within off a terminal: more than any table needs."""

_SHOWN_CLASSES = 8
"""A longer label mapping shows its first names, an ellipsis, its last name and the count."""


def classes_line(dataset: dict[str, Any] | None) -> str | None:
    """The label mapping, when class names (folders, text labels) gave the labels:
    ``classes: cat→0, dog→1 (names sorted into class indices)``; None for index labels."""
    index = (dataset or {}).get("class_index")
    if not index:
        return None
    pairs = [f"{shown_name(name)}→{value}" for name, value in index.items()]
    count = ""
    if len(pairs) > _SHOWN_CLASSES:
        pairs = [*pairs[:_SHOWN_CLASSES - 2], "…", pairs[-1]]
        count = f"{len(index)} names, all in --json; "
    rule = dataset["preprocessing"].get("labels", "")  # type: ignore[index]
    return f"classes: {', '.join(pairs)} ({count}{rule})"


def _top5(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}%"


def sites_table(sites: list[ReluSite], *, dry_run: bool = False) -> Table:
    """One row per site: its name, spelling, what happens to it and why. Names and spellings
    are never cut or wrapped: ``--include`` needs them whole; the remark wraps instead."""
    table = Table(title="ReLU sites", title_justify="left")
    table.add_column("site", style="bold", no_wrap=True,
                     min_width=max((len(site.name) for site in sites), default=4))
    table.add_column("spelling", no_wrap=True,
                     min_width=max((len(site.kind) for site in sites), default=8))
    table.add_column("would replace" if dry_run else "replaced", justify="center")
    table.add_column("remark")
    for site in sites:
        table.add_row(Text(site.name), Text(site.kind),
                      "[green]yes[/]" if site.replaced else "[yellow]no[/]", Text(site.reason))
    return table


def accuracy_table(report: RetrofitReport) -> Table:
    table = Table(title=Text("Accuracy on " + str((report.dataset or {}).get("validation", ""))),
                  title_justify="left")
    table.add_column("model")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_column("samples", justify="right")
    for stage in [*report.stages, *([report.control] if report.control else [])]:
        result = stage.result
        table.add_row(stage.name, f"{result.top1:.2f}%", _top5(result.top5), str(result.n))
    return table


def _parity_line(report: RetrofitReport) -> str | None:
    parity = report.parity
    if parity is None:
        return None
    if report.preserves_function:
        status = "ok" if parity.relative <= report.tolerance else "differs"
        return (f"identity parity: max abs diff {parity.max_abs_diff:.3g} "
                f"({parity.relative:.3g} of output scale; {status})")
    return (f"output change: max abs diff {parity.max_abs_diff:.3g} "
            f"(expected: {report.activation} is not ReLU at initialisation)")


def _unverified_line(report: RetrofitReport) -> str:
    return f"UNVERIFIED: the outputs were not compared with the original's ({report.unverified})"


def print_report(report: RetrofitReport, console: Console, *, dry_run: bool = False) -> None:
    """The terminal view: sites, counts, parity, accuracies with deltas, gates, notes, files.

    An unverified result says so first, before anything that could be read as a success."""
    if not report.verified:
        console.print(f"[bold red]{_unverified_line(report)}[/]")
    print_whole(console, sites_table(report.sites, dry_run=dry_run))
    verb = "would be replaced" if dry_run else "replaced"
    console.print(f"{len(report.replaced)} of {len(report.sites)} ReLU sites {verb} by "
                  f"{report.activation} ({report.model}, {report.format.value})", markup=False)
    for line in filter(None, [_parity_line(report)]):
        console.print(line)
    if report.trained_parity is not None:
        console.print(f"fine-tuned ONNX vs torch: max abs diff {report.trained_parity.max_abs_diff:.3g}")
    if report.resumed:
        console.print("resumed: the fine-tune went on from its checkpoint")
    if report.stages:
        print_whole(console, accuracy_table(report))
        classes = classes_line(report.dataset)
        if classes:
            console.print(classes, markup=False, highlight=False)
        for name, delta in report.deltas.items():
            console.print(f"{_DELTA_TITLES[name]}: {_delta_text(delta)}")
    for gate in report.gates:
        mark = "[green]passed[/]" if gate.passed else "[red]FAILED[/]"
        console.print(f"gate {_gate_text(gate)}: {mark}")
    for note in report.notes:
        console.print(Text.assemble(("note:", "yellow"), f" {note}"))
    for path in report.written:
        parity = report.onnx_export_parity if path == report.onnx_export else None
        extra = f" (onnxruntime vs torch: max abs diff {parity.max_abs_diff:.3g})" if parity else ""
        console.print(f"wrote {path}{extra}", markup=False)
    if report.failure is not None and report.output not in report.written:
        console.print("[bold red]the model was not written[/] (the error below says why)")


def print_whole(console: Console, table: Table) -> None:
    """A table at its natural width when the output is not a terminal (a pipe, a CI log):
    there is no screen to fit, and a cut name would be copied wrong. (rich measures and prints
    within the console's width, so the console is widened while the table prints.)"""
    if console.is_terminal:
        console.print(table)
        return
    unbounded = console.options.update(max_width=_UNBOUNDED)
    width = console.width
    console.width = max(width, console.measure(table, options=unbounded).maximum)
    try:
        console.print(table)
    finally:
        console.width = width


def report_to_markdown(report: RetrofitReport) -> str:
    """A Markdown summary for pull requests and ``$GITHUB_STEP_SUMMARY``."""
    lines = [f"### cadrelu retrofit: `{report.model.name}` → {report.activation}", ""]
    if not report.verified:
        lines += [f"**{_unverified_line(report)}**", ""]
    lines.append(f"{len(report.replaced)} of {len(report.sites)} ReLU sites replaced.")
    parity_line = _parity_line(report)
    if parity_line:
        lines += ["", parity_line]
    if report.stages:
        lines += ["", "| model | top-1 | top-5 | samples |", "|---|---:|---:|---:|"]
        for stage in [*report.stages, *([report.control] if report.control else [])]:
            result = stage.result
            lines.append(f"| {stage.name} | {result.top1:.2f}% | {_top5(result.top5)} | {result.n} |")
        lines.append("")
        classes = classes_line(report.dataset)
        if classes:
            lines += [classes, ""]
        lines += [f"- {_DELTA_TITLES[name]}: {_delta_text(delta)}"
                  for name, delta in report.deltas.items()]
    for gate in report.gates:
        lines.append(f"- gate {_gate_text(gate)}: {'passed' if gate.passed else '**FAILED**'}")
    if report.notes:
        lines += ["", *[f"> {note}" for note in report.notes]]
    return "\n".join(lines) + "\n"


def publish_markdown(markdown: str, path: Path | None) -> None:
    """A Markdown report written to ``path`` when one is asked for, and appended to the CI
    step summary when CI set one."""
    if path is not None:
        write_text_atomic(path, markdown)
    append_step_summary(markdown)


def evaluation_to_dict(report: EvaluateReport) -> dict[str, Any]:
    """``cadrelu evaluate --json`` (README, "JSON report"; versioned like the retrofit's)."""
    result = report.result
    return {"version": EVALUATE_REPORT_VERSION, "model": str(report.model),
            "dataset": report.dataset, "n": result.n, "top1": result.top1, "top5": result.top5,
            "notes": list(report.notes)}


def evaluation_to_json(report: EvaluateReport) -> str:
    return json.dumps(evaluation_to_dict(report), indent=2, default=str)


def print_evaluation(report: EvaluateReport, console: Console) -> None:
    """The notes, then one line of scores and the label mapping."""
    for note in report.notes:
        console.print(Text.assemble(("note:", "yellow"), f" {note}"), highlight=False)
    result = report.result
    top5 = "" if result.top5 is None else f", top-5 {result.top5:.2f}%"
    console.print(f"{report.model}: top-1 {result.top1:.2f}%{top5} on {result.n} samples of "
                  f"{report.dataset['validation']}", markup=False)
    classes = classes_line(report.dataset)
    if classes:
        console.print(classes, markup=False, highlight=False)


def append_step_summary(markdown: str) -> Path | None:
    """Append to ``$GITHUB_STEP_SUMMARY`` when CI set it (append is how the runner expects it)."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    with open(target, "a", encoding="utf-8") as summary:
        summary.write(markdown)
    return Path(target)
