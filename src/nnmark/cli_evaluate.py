"""``nnmark evaluate``: run an evaluation grid from a YAML config and write its reports.

    nnmark evaluate experiments/harness/digits_full.yaml [--out DIR] [--workers N] [--report-only]

The config is validated first (an unknown scheme, attack, parameter, dataset or architecture is an error
listing the known names, before anything is trained); then the hosts, cells and false-alarm checks the
output folder lacks are run (a rerun after a kill resumes), and the reports are written under ``DIR``
(default: the config's ``out``, else ``runs/evaluate/<name>``): ``results.jsonl``, ``results.csv``,
``summary.md``, ``robustness.md``, ``false_alarm.md``, ``plots/*.png`` and ``report.html``.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("evaluate")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="output folder (default: the config's 'out', else runs/evaluate/<name>)")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="processes on this machine (default: the config's 'workers', else 1)")
@click.option("--report-only", is_flag=True, help="write the reports from the results so far; run nothing")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: when stderr is a terminal)")
def evaluate(config: str, out: str | None, workers: int | None, report_only: bool, progress: bool | None) -> None:
    """Run the evaluation grid of CONFIG (schemes x attacks x budgets x seeds) and write its reports."""
    import shlex
    import sys

    from nnmark.harness.config import load_plan

    plan = load_plan(config)
    folder = Path(out or plan.out or Path("runs") / "evaluate" / plan.name)
    if not report_only:
        import torch

        torch.set_num_threads(1)
        from nnmark.harness.runner import run_plan

        command = " ".join(["nnmark evaluate", shlex.quote(config)] + ([f"--workers {workers}"] if workers else [])
                           + ([f"--out {shlex.quote(out)}"] if out else []))
        show = sys.stderr.isatty() if progress is None else progress
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=False) as bar:
                tasks: dict[str, int] = {}

                def report(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done, total=total)

                summary = run_plan(plan, folder, workers=workers, progress=report, command=command)
        else:
            summary = run_plan(plan, folder, workers=workers, command=command)
        others = f", {summary['by_other_runs']} by another run" if summary.get("by_other_runs") else ""
        click.echo(f"cells: {summary['cells']} ({summary['skipped']} already recorded, {summary['ran']} run{others}, "
                   f"{summary['errors']} errors); hosts: {summary['hosts_built']} trained, "
                   f"{summary['hosts_cached']} from the cache; false-alarm checks run: "
                   f"{summary['false_alarm_checks']}; forgery checks run: {summary['forgery_checks']}; "
                   f"{summary['seconds']:.0f} s ({summary['mode']})")
    from nnmark.harness.claims import exclusive
    from nnmark.harness.report import write_reports

    with exclusive(folder / "locks" / "reports.lock"):  # runs sharing the folder write the reports one at a time
        written = write_reports(folder, plan)
    click.echo(f"report: {written['html']}")
