"""The one-screen summary printed after a run: clips, accuracy, pointing game, faithfulness, failures, time, report path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from pipeline.store import read_failures


def show(run_dir: Path, results: dict, console: Console | None = None) -> None:
    console = console or Console()
    overall_path = run_dir / "stats" / "overall.parquet"
    table = Table(title=f"Saliency Tubes run: {run_dir}", show_header=True)
    for column in ("method", "clips", "accuracy", "mean confidence", "top-10% mass", "pointing game", "chance"):
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
                _pct(chance),
            )
    console.print(table)
    faith_path = run_dir / "stats" / "faithfulness.parquet"
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
            f"[yellow]{len(failures)} failures[/] (see {run_dir / 'failures'}): "
            + ", ".join(f"{s}/{e}: {n}" for (s, e), n in counts.items())
        )
    else:
        console.print("no failures")
    extract = results.get("extract")
    if extract and extract.get("failed_shards"):
        console.print(
            f"[red]{len(extract['failed_shards'])} shards failed[/] after their retries (rerun to try them again): {extract['failed_shards']}"
        )
    if "train" in results and results["train"].get("trained"):
        console.print(f"demo model trained: test accuracy {_pct(results['train']['test'])}")
    console.print(f"time: {results.get('seconds', 0.0):.1f} s")
    report = run_dir / "report" / "index.html"
    if report.is_file():
        console.print(f"report: [bold]{report}[/]")


def _pct(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{100 * float(value):.1f}%"
