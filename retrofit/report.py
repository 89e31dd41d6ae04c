"""Reports of a retrofit: a rich table for people, JSON for machines.

The JSON keys are documented in the README ("JSON report") and are stable: a CI step may
parse them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from retrofit.job import RetrofitReport
from retrofit.sites import ReluSite

REPORT_VERSION = 1


def report_to_dict(report: RetrofitReport) -> dict[str, Any]:
    """The report as plain JSON-ready data."""
    parity = report.parity
    return {
        "version": REPORT_VERSION,
        "model": str(report.model),
        "format": report.format.value,
        "activation": report.activation,
        "config": dataclasses.asdict(report.config),
        "output": str(report.output) if report.output else None,
        "sites": [dataclasses.asdict(site) for site in report.sites],
        "replaced": len(report.replaced),
        "kept": len(report.sites) - len(report.replaced),
        "parity": None if parity is None else {
            "max_abs_diff": parity.max_abs_diff,
            "relative": parity.relative,
            "tolerance": report.tolerance,
            "required": report.preserves_function,
        },
        "notes": list(report.notes),
    }


def report_to_json(report: RetrofitReport) -> str:
    return json.dumps(report_to_dict(report), indent=2, default=list)


def sites_table(sites: list[ReluSite], *, dry_run: bool = False) -> Table:
    """One row per site: its name, spelling, what happens to it and why."""
    table = Table(title="ReLU sites", title_justify="left")
    table.add_column("site", style="bold")
    table.add_column("spelling")
    table.add_column("would replace" if dry_run else "replaced", justify="center")
    table.add_column("remark")
    for site in sites:
        mark = "[green]yes[/]" if site.replaced else "[yellow]no[/]"
        table.add_row(site.name, site.kind, mark, site.reason)
    return table


def print_report(report: RetrofitReport, console: Console, *, dry_run: bool = False) -> None:
    """The terminal view: sites table, counts, parity, notes, output path."""
    console.print(sites_table(report.sites, dry_run=dry_run))
    verb = "would be replaced" if dry_run else "replaced"
    console.print(
        f"{len(report.replaced)} of {len(report.sites)} ReLU sites {verb} by {report.activation} "
        f"({report.model}, {report.format.value})"
    )
    parity = report.parity
    if parity is not None:
        status = "ok" if parity.relative <= report.tolerance else "differs"
        what = "identity parity" if report.preserves_function else "output change"
        console.print(
            f"{what}: max abs diff {parity.max_abs_diff:.3g} "
            f"({parity.relative:.3g} of output scale; {status})"
            if report.preserves_function
            else f"{what}: max abs diff {parity.max_abs_diff:.3g} (expected: {report.activation} "
            "is not ReLU at initialisation)"
        )
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    if report.output and not dry_run:
        console.print(f"wrote {report.output}")
