"""The ``run`` command: a declared multi-step pipeline over many inputs, resumable."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from diffdask.cli._common import (
    cluster_client,
    console,
    fail_clearly,
    main,
    scheduler_option,
    workers_option,
)


@main.command(name="run")
@click.argument("pipeline_file", metavar="PIPELINE.yaml")
@scheduler_option
@workers_option
@fail_clearly
def run_command(pipeline_file: str, scheduler: str | None, workers: int | None) -> None:
    """Run a declared pipeline over many inputs; re-running skips what is done.

    Exit status 1 when some input failed (the others are processed and reported).
    """
    from diffdask.pipeline import load_pipeline, run_pipeline

    pipeline = load_pipeline(pipeline_file)
    total = len(pipeline.inputs) * len(pipeline.steps)
    console.print(f"{len(pipeline.inputs)} inputs × {len(pipeline.steps)} steps", highlight=False)
    seen = []

    def show(entry: Any) -> None:
        seen.append(entry)
        colour = {"done": "green", "skipped": "cyan", "failed": "red", "not run": "yellow"}[entry.status]
        console.print(
            f"[{len(seen)}/{total}] {entry.source} · {entry.step}: [{colour}]{entry.status}[/] {entry.message}",
            highlight=False,
        )

    with cluster_client(scheduler, workers):
        report = run_pipeline(pipeline, on_step=show)
    table = Table(title="pipeline summary")
    for column in ("input", "step", "status", "seconds", "result"):
        table.add_column(column)
    for entry in report.steps:
        table.add_row(entry.source, entry.step, entry.status, f"{entry.seconds:.1f}", entry.message)
    console.print(table)
    if report.failed_inputs:
        console.print(f"[red]{len(report.failed_inputs)} input(s) failed[/]: {', '.join(report.failed_inputs)}")
        sys.exit(1)
