"""The one-screen summary printed after a run: clips, accuracy, pointing game, faithfulness, failures, time, report path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from pipeline.stages.result import StageResult
from pipeline.store import read_failures
from pipeline.store.run_dir import RunDir


def show(run_dir: Path, results: dict[str, StageResult], seconds: float, console: Console | None = None) -> None:
    """Print the summary of a command that ran ``results`` (each stage's) in ``seconds``."""
    console = console or Console()
    run = RunDir(run_dir)
    overall_path = run.table("overall")
    table = Table(title=f"Saliency Tubes run: {run_dir}", show_header=True)
    columns = ("method", "clips", "accuracy", "conf.", "top-10%", "pointing", "Li 2021", "chance")
    for column in columns:
        table.add_column(column, justify="right" if column != "method" else "left")
    if overall_path.is_file():
        for row in pd.read_parquet(overall_path).itertuples():
            pointing = getattr(row, "pointing_game", None)
            chance = getattr(row, "pointing_chance", None)
            table.add_row(
                row.method,
                f"{row.clips:,}",
                _pct(row.accuracy),
                _pct(row.mean_pred_prob),
                _pct(row.top10_mass),
                _pct(pointing),
                _pct(getattr(row, "pointing_game_li2021", None)),
                _pct(chance),
            )
    console.print(table)
    faith_path = run.table("faithfulness")
    if faith_path.is_file():  # written by stage=evaluate; the totals rows are label -1
        for row in pd.read_parquet(faith_path).query("label == -1").itertuples():
            console.print(
                f"faithfulness of {row.method} ({getattr(row, 'protocol', 'project')} protocol): deletion AUC {row.deletion_auc:.3f} (random tube {row.random_deletion_auc:.3f}, lower is better), "
                f"insertion AUC {row.insertion_auc:.3f} (random {row.random_insertion_auc:.3f}, higher is better), "
                f"randomised-model Spearman {row.randomisation_spearman:.3f}"
            )
    failures = read_failures(run_dir)
    if len(failures):
        counts = failures.groupby(["stage", "error_type"]).size()
        console.print(
            f"[yellow]{len(failures)} failures[/] (see {run.failures}): "
            + ", ".join(f"{s}/{e}: {n}" for (s, e), n in counts.items())
        )
    else:
        console.print("no failures")
    for result in results.values():
        if result.failed_shards:
            console.print(
                f"[red]{len(result.failed_shards)} {result.stage} shards failed[/] after their retries "
                f"(rerun to try them again): {result.failed_shards}"
            )
    if "train" in results and results["train"].figures:
        console.print(f"demo model trained: test accuracy {_pct(results['train'].figures['test_accuracy'])}")
    console.print(f"time: {seconds:.1f} s")
    report = run.report_page
    if report.is_file():
        console.print(f"report: [bold]{report}[/]")


def _pct(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{100 * float(value):.1f}%"
