"""Stats stage on constructed runs: every aggregate against pandas / a loop over the stored per-clip values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from pipeline.bench.report import blob_tubes, config, write_synthetic_run
from pipeline.errors import MissingInput, StageFailed
from pipeline.stages import stats
from pipeline.store import read_tubes

CLASSES = ["Jump", "Run", "Sit"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs over the same 90 clips: ``a``, ``same`` (identical tubes, same shards) and ``other`` (other
    tubes, other shards, other predictions for some clips)."""
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root / "a", 90, CLASSES, clips_per_part=40, videos=3)
    write_synthetic_run(root / "same", 90, CLASSES, clips_per_part=40, videos=3, method="gradcam")
    write_synthetic_run(
        root / "other", 90, CLASSES, clips_per_part=30, videos=3, volumes=lambda rng, n: -blob_tubes(rng, n)
    )
    stats.run(config(compare_runs=["same", "other"]), root / "a")
    return root


def test_per_class_and_overall_means(runs):
    run_dir = runs / "a"
    tubes = read_tubes(
        run_dir,
        columns=[
            "label_name",
            "label",
            "pred",
            "pred_prob",
            "top10_mass",
            "border_mass",
            "density",
            "temporal_profile",
        ],
    )
    per_class = pd.read_parquet(run_dir / "stats" / "per_class.parquet").set_index("label_name")
    overall = pd.read_parquet(run_dir / "stats" / "overall.parquet").iloc[0]
    assert overall["clips"] == 90 and list(per_class.index) == CLASSES
    for name, mine in tubes.groupby("label_name"):
        row = per_class.loc[name]
        assert row["clips"] == len(mine)
        assert row["accuracy"] == pytest.approx((mine["pred"] == mine["label"]).mean())
        assert row["border_mass"] == pytest.approx(mine["border_mass"].mean(), rel=1e-6)
        np.testing.assert_allclose(row["density"], np.stack(mine["density"]).mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(row["temporal_profile"], np.stack(mine["temporal_profile"]).mean(0), rtol=1e-5)
    assert overall["mean_pred_prob"] == pytest.approx(tubes["pred_prob"].mean(), rel=1e-6)
    assert np.asarray(overall["density"]).sum() == pytest.approx(1.0, rel=1e-5)


def test_per_split(runs):
    run_dir = runs / "a"
    tubes = read_tubes(run_dir, columns=["split", "label_name", "top10_mass"])
    per_split = pd.read_parquet(run_dir / "stats" / "per_split.parquet")
    assert set(per_split["split"]) == {"test", "val"}
    for (split, name), mine in tubes.groupby(["split", "label_name"]):
        row = per_split[(per_split["split"] == split) & (per_split["label_name"] == name)].iloc[0]
        assert row["clips"] == len(mine) and row["top10_mass"] == pytest.approx(mine["top10_mass"].mean(), rel=1e-6)
    totals = per_split[per_split["label"] == -1].set_index("split")["clips"]
    assert totals.to_dict() == tubes["split"].value_counts().to_dict()


def test_pointing_game_per_class_by_a_loop(runs):
    run_dir = runs / "a"
    tubes = read_tubes(
        run_dir, columns=["label_name", "video_id", "frame_indices", "frame_peak_x", "frame_peak_y", "crop_box"]
    )
    boxes = pd.read_csv(run_dir / "boxes.csv").set_index(["video_id", "frame"])
    hits: dict[str, list[bool]] = {}
    li_hits: dict[str, list[bool]] = {}  # Li et al.: 7 px at 112 (7/112 of the view), bounds included
    for row in tubes.itertuples():
        cx0, cy0, cx1, cy1 = row.crop_box
        tx, ty = 7 / 112 * (cx1 - cx0), 7 / 112 * (cy1 - cy0)
        for frame, x, y in zip(row.frame_indices, row.frame_peak_x, row.frame_peak_y):
            b = boxes.loc[(row.video_id, int(frame))]
            hits.setdefault(row.label_name, []).append(b.x0 <= x < b.x1 and b.y0 <= y < b.y1)
            li_hits.setdefault(row.label_name, []).append(b.x0 - tx <= x <= b.x1 + tx and b.y0 - ty <= y <= b.y1 + ty)
    per_class = pd.read_parquet(run_dir / "stats" / "per_class.parquet").set_index("label_name")
    for name, values in hits.items():
        assert per_class.loc[name, "pointing_game"] == pytest.approx(np.mean(values))
        assert per_class.loc[name, "pointing_frames"] == len(values)
        assert per_class.loc[name, "pointing_game_li2021"] == pytest.approx(np.mean(li_hits[name]))
    overall = pd.read_parquet(run_dir / "stats" / "overall.parquet").iloc[0]
    assert overall["pointing_game"] == pytest.approx(np.mean(sum(hits.values(), [])))  # over frames
    assert overall["pointing_game_li2021"] == pytest.approx(np.mean([np.mean(v) for v in li_hits.values()]))
    steps = pd.read_parquet(run_dir / "stats" / "pointing.parquet")
    assert len(steps) == sum(len(v) for v in hits.values())


def test_agreement_between_runs(runs):
    clips = pd.read_parquet(runs / "a" / "stats" / "agreement.parquet")
    np.testing.assert_allclose(clips.loc[clips["other_run"] == "same", "spearman"], 1.0, rtol=1e-6)
    assert (clips["other_run"] == "same").sum() == 90
    # the other run: joined on clip and target class, so only clips explained for the same class count
    a = read_tubes(runs / "a", columns=["clip_id", "target", "volume"]).set_index("clip_id")
    b = read_tubes(runs / "other", columns=["clip_id", "target", "volume"]).set_index("clip_id").loc[a.index]
    shared = a.index[a["target"] == b["target"]]
    assert 0 < len(shared) < 90
    mine = clips[clips["other_run"] == "other"].set_index("clip_id").loc[shared, "spearman"]
    expected = [spearmanr(a.loc[c, "volume"].ravel(), b.loc[c, "volume"].ravel()).statistic for c in shared]
    np.testing.assert_allclose(mine, expected, rtol=1e-5)
    per_class = pd.read_parquet(runs / "a" / "stats" / "agreement_per_class.parquet")
    row = per_class[(per_class["other_run"] == "same") & (per_class["label"] == -1)].iloc[0]
    assert row["other_method"] == "gradcam" and row["clips"] == 90


def test_compare_with_a_missing_run_names_it(runs):
    with pytest.raises(MissingInput, match="compare_runs.*nowhere"):
        stats.run(config(compare_runs=["nowhere"]), runs / "a")


def test_distributions_are_histograms_of_the_clips(runs):
    run_dir = runs / "a"
    tubes = read_tubes(run_dir, columns=["label_name", "top10_mass", "entropy", "border_mass"])
    per_class = pd.read_parquet(run_dir / "stats" / "per_class.parquet").set_index("label_name")
    for name, mine in tubes.groupby("label_name"):
        for stat in ("top10_mass", "entropy", "border_mass"):
            counts = [sum(min(int(v * 10), 9) == b for v in mine[stat]) for b in range(10)]  # tenths of [0, 1]
            np.testing.assert_allclose(per_class.loc[name, f"{stat}_hist"], np.array(counts) / len(mine), atol=1e-7)


def test_a_run_where_every_clip_failed_says_so(tmp_path):
    """Empty part files (every clip of every shard failed) give one clear error with the failure reasons."""
    from pipeline.store import TUBE_SCHEMA, Failure, failures_table, part_name, write_table_atomic

    run_dir = tmp_path / "failed"
    write_table_atomic(TUBE_SCHEMA.empty_table(), run_dir / "tubes" / part_name(0))
    write_table_atomic(
        failures_table([Failure("a:000000", "a.mp4", "extract", "VideoError", "a.mp4: broken")]),
        run_dir / "failures" / part_name(0),
    )
    with pytest.raises(StageFailed, match=r"no clip has a tube.*VideoError"):
        stats.run(config(), run_dir)
