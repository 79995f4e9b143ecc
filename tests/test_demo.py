"""The demo end to end: synthetic data, a trained model, and tubes that point at the moving actor."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers.config import make_cfg
from pipeline.__main__ import run


@pytest.mark.slow
def test_demo_trains_explains_and_resumes(tmp_path, capsys):
    overrides = ["stage=demo", "report.clips_per_class=1"]  # exactly what `make demo` runs, in tmp_path
    results = run(make_cfg(tmp_path, overrides))
    run_dir = tmp_path / "outputs" / "demo"
    assert results["train"].figures["test_accuracy"] >= 0.9
    overall = pd.read_parquet(run_dir / "stats" / "overall.parquet").iloc[0]
    assert overall["clips"] == 4 * 3 * 6 and overall["accuracy"] >= 0.9
    # the tube's per-frame peak lands on the actor far more often than a random point would
    assert overall["pointing_game"] > 0.3 and overall["pointing_game"] > 8 * overall["pointing_chance"]
    # faithfulness: the trained model's tubes beat a random tube and depend on its weights
    faith = pd.read_parquet(run_dir / "stats" / "faithfulness.parquet").set_index("label_name").loc["(all)"]
    assert faith["clips"] == overall["clips"]
    assert (
        faith["deletion_auc"] < faith["random_deletion_auc"] and faith["insertion_auc"] > faith["random_insertion_auc"]
    )
    assert faith["randomisation_spearman"] < 0.5
    html = (run_dir / "report" / "index.html").read_text()
    assert f"{faith['deletion_auc']:.3f}" in html and f"{faith['randomisation_spearman']:.3f}" in html
    printed = capsys.readouterr().out
    assert "pointing" in printed and str(run_dir / "report" / "index.html") in printed.replace("\n", "")

    checkpoint = tmp_path / "outputs" / "models" / "demo-synthetic.pt"
    stamps = {p: p.stat().st_mtime_ns for p in [checkpoint, *(run_dir / "tubes").glob("part-*.parquet")]}
    again = run(make_cfg(tmp_path, overrides))
    assert not again["train"].figures and again["extract"].skipped == again["extract"].shards
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
