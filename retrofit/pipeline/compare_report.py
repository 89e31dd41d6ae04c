"""``cadrelu compare``'s report: a rich view for people, JSON for machines, Markdown for CI.

The table's rows come from one function (:func:`table_rows`) for the terminal and Markdown
alike, and its numbers are the JSON's rounded to two decimals. Failed runs come first in every
view, before anything that could be read as a result. Accuracies are percentages, differences
percentage points.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from retrofit.pipeline.compare import CONTROL, ArmRun, ArmSummary, CompareReport
from retrofit.pipeline.report import classes_line, print_whole

COMPARE_REPORT_VERSION = 1
COLUMNS = ("rank", "arm", "after swap", "after fine-tune", "Δ vs control", "95% CI")
_NONE = "—"


def compare_to_dict(report: CompareReport) -> dict[str, Any]:
    """The report as plain JSON-ready data (README, "Which activation helps my model?")."""
    budget = {name: value for name, value in report.finetune.as_dict().items()
              if name not in ("seed", "checkpoint", "resume")}
    return {
        "version": COMPARE_REPORT_VERSION,
        "model": str(report.model),
        "format": report.format.value,
        "failure": str(report.failure) if report.failure else None,
        "failed": [{"arm": run.arm, "seed": run.seed, "reason": run.failure,
                    "exit_code": run.exit_code} for run in report.failed_runs],
        "settings": {"seeds": list(report.seeds), "finetune": budget,
                     "out_dir": str(report.folder), "world_size": report.world_size},
        "dataset": report.dataset,
        "before": {"top1": report.before.top1, "top5": report.before.top5,
                   "n": report.before.n},
        "ranking": [arm.name for arm in report.ranked],
        "arms": [_arm(arm, report) for arm in report.arms],
        "control": _arm(report.control, report),
        "gates": [dataclasses.asdict(gate) for gate in report.gates],
        "gates_passed": report.gates_passed,
        "gated_arm": report.gated_arm,
        "recorded_runs": report.recorded_runs,
        "notes": list(report.notes),
        "written": [str(path) for path in report.written],
    }


def _arm(arm: ArmSummary, report: CompareReport) -> dict[str, Any]:
    per_seed = dict(zip(report.seeds, arm.delta.per_seed)) if arm.delta else {}
    return {
        "name": arm.name,
        "rank": arm.rank,
        "failure": arm.failure,
        "config": dataclasses.asdict(arm.config) if arm.config is not None else None,
        "top1_after_swap": arm.mean_top1_after_swap,
        "top1": arm.mean_top1,
        "delta": dataclasses.asdict(arm.delta) if arm.delta else None,
        "runs": [_run(run, per_seed.get(run.seed)) for run in arm.runs],
    }


def _run(run: ArmRun, delta: float | None) -> dict[str, Any]:
    return {"seed": run.seed, "top1_after_swap": run.top1_after_swap, "top1": run.top1,
            "top5": run.top5, "delta": delta, "best_epoch": run.best_epoch,
            "failure": run.failure, "exit_code": run.exit_code, "resumed": run.resumed,
            "recorded": run.recorded, "notes": run.notes}


def compare_to_json(report: CompareReport) -> str:
    return json.dumps(compare_to_dict(report), indent=2, default=str)


def _percent(value: float | None) -> str:
    return _NONE if value is None else f"{value:.2f}%"


def table_rows(report: CompareReport) -> list[tuple[str, ...]]:
    """The ranked candidates (best first), the control, then the candidates not ranked; one
    string per :data:`COLUMNS`."""
    rows = {True: [], False: []}
    for arm in report.arms:
        delta = arm.delta
        rows[arm.rank is not None].append((
            _rank(arm), arm.name,
            _percent(arm.mean_top1_after_swap), _percent(arm.mean_top1),
            f"{delta.delta:+.2f} pp" if delta else _NONE,
            f"{delta.ci_low:+.2f} to {delta.ci_high:+.2f}" if delta else _NONE))
    return [*rows[True], _control_row(report), *rows[False]]


def _rank(arm: ArmSummary) -> str:
    """1, 2, ... for a ranked candidate; a candidate left out is failed, or not ranked because
    the control failed."""
    if arm.rank is not None:
        return str(arm.rank)
    return "failed" if arm.failure else "not ranked"


def _control_row(report: CompareReport) -> tuple[str, ...]:
    control = report.control
    return ("failed" if control.failure else _NONE, f"{CONTROL} (ReLU)", _NONE,
            _percent(control.mean_top1), _NONE, _NONE)


def _title(report: CompareReport) -> str:
    seeds = len(report.seeds)
    return (f"Top-1 on {report.dataset['validation']} ({report.before.n} samples), mean over "
            f"{seeds} seed{'s' if seeds > 1 else ''}, ranked by Δ vs the ReLU control")


def _failure_lines(report: CompareReport) -> list[str]:
    return [f"FAILED: {run.arm} with seed {run.seed}: {run.failure}"
            + ("" if run.arm == CONTROL else " (not ranked)") for run in report.failed_runs]


def _header(report: CompareReport) -> str:
    budget = report.finetune
    seeds = ", ".join(map(str, report.seeds))
    return (f"{len(report.arms)} candidate(s) and the ReLU control, each fine-tuned "
            f"{budget.epochs} epoch(s) on {report.dataset['train_samples']} samples with "
            f"seed(s) {seeds} ({report.model}, {report.format.value})")


def _before_line(report: CompareReport) -> str:
    top5 = "" if report.before.top5 is None else f", top-5 {report.before.top5:.2f}%"
    return f"before (the original): top-1 {report.before.top1:.2f}%{top5}"


def verdict(report: CompareReport) -> str | None:
    """What the ranking says, in one line (None when nothing was ranked)."""
    winner = report.winner
    if winner is None or winner.delta is None:
        return None
    delta = winner.delta
    seeds = f"{delta.seeds} seed{'s' if delta.seeds > 1 else ''}"
    figures = (f"{delta.delta:+.2f} pp vs the ReLU control with the same budget (95% CI "
               f"{delta.ci_low:+.2f} to {delta.ci_high:+.2f}, paired over {delta.n} samples "
               f"and {seeds})")
    if delta.ci_low > 0:
        return f"{winner.name} helps: {figures}"
    if delta.ci_high < 0:
        return (f"every candidate does worse than the ReLU control; the best, {winner.name}: "
                f"{figures}")
    return (f"no candidate differs from the ReLU control with 95% confidence; the best, "
            f"{winner.name}: {figures}")


def _gate_lines(report: CompareReport) -> list[tuple[str, bool]]:
    lines = []
    for gate in report.gates:
        measured = "drop" if gate.name == "max_drop" else "gain"
        lines.append((f"gate {gate.name} {gate.threshold:g} pp on {report.gated_arm} "
                      f"({measured} {gate.value:.2f} pp vs before)", gate.passed))
    return lines


def _resumed_line(report: CompareReport) -> str | None:
    runs = sum(len(arm.runs) for arm in (report.control, *report.arms))
    recorded = report.recorded_runs
    if not recorded:
        return None
    return (f"resumed: {recorded} of {runs} runs read back from "
            f"{report.folder / 'state.json'}")


def print_compare(report: CompareReport, console: Console) -> None:
    """The terminal view: failures first, the budget, the original's score, the ranked table,
    the verdict, gates, notes and written files."""
    for line in _failure_lines(report):
        console.print(Text(line, style="bold red"))
    console.print(_header(report), markup=False, highlight=False)
    console.print(_before_line(report), highlight=False)
    table = Table(title=Text(_title(report)), title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("rank", "arm") else "right",
                         no_wrap=column == "arm")
    for row in table_rows(report):
        table.add_row(*(Text(cell) for cell in row))
    print_whole(console, table)
    classes = classes_line(report.dataset)
    if classes:
        console.print(classes, markup=False, highlight=False)
    line = verdict(report)
    if line:
        console.print(line, markup=False, highlight=False)
    for text, passed in _gate_lines(report):
        console.print(Text.assemble(text + ": ", ("passed", "green") if passed else
                                    ("FAILED", "red")))
    for note in report.notes:
        console.print(Text.assemble(("note:", "yellow"), f" {note}"))
    resumed = _resumed_line(report)
    if resumed:
        console.print(resumed, markup=False, highlight=False)
    for path in report.written:
        console.print(f"wrote {path}", markup=False, highlight=False)


def compare_to_markdown(report: CompareReport) -> str:
    """The same report for pull requests and ``$GITHUB_STEP_SUMMARY``."""
    lines = [f"### cadrelu compare: `{report.model.name}`", ""]
    lines += [f"**{line}**" for line in _failure_lines(report)]
    lines += [_header(report), "", _before_line(report), "", _title(report), "",
              "| " + " | ".join(COLUMNS) + " |",
              "|" + "|".join("---" if column in ("rank", "arm") else "---:"
                             for column in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines.append("")
    line = verdict(report)
    if line:
        lines += [line, ""]
    lines += [f"- {text}: {'passed' if passed else '**FAILED**'}"
              for text, passed in _gate_lines(report)]
    if report.notes:
        lines += ["", *[f"> {note}" for note in report.notes]]
    return "\n".join(lines) + "\n"
