"""The end-of-run summary: what a user reads on the console after `make demo`."""

from __future__ import annotations

import pandas as pd
from rich.console import Console

from pipeline.stages import summary
from pipeline.store import Failure, failures_table, write_table_atomic


def test_summary_shows_faithfulness_totals_and_failures_by_reason(tmp_path):
    (tmp_path / "stats").mkdir()
    pd.DataFrame(
        dict(
            method=["cam", "cam"],
            label=[-1, 0],
            label_name=["(all)", "Jump"],
            deletion_auc=[0.25, 0.9],
            random_deletion_auc=[0.5, 0.9],
            insertion_auc=[0.75, 0.1],
            random_insertion_auc=[0.5, 0.1],
            randomisation_spearman=[0.125, 0.9],
        )
    ).to_parquet(tmp_path / "stats" / "faithfulness.parquet")
    write_table_atomic(
        failures_table([Failure("a:000000", "a.mp4", "extract", "VideoError", "a.mp4: broken")] * 2),
        tmp_path / "failures" / "part-00000.parquet",
    )
    console = Console(record=True, width=400)
    summary.show(tmp_path, {}, 2.0, console=console)
    text = console.export_text()
    assert (
        "faithfulness of cam (project protocol): deletion AUC 0.250 (random tube" in text
        and "insertion AUC 0.750 (random 0.500" in text
    )
    assert "Spearman 0.125" in text and "0.900" not in text  # the totals row only, not the class rows
    assert "2 failures" in text and "extract/VideoError: 2" in text
