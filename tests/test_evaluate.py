"""Evaluate stage end to end on real videos and a real model, checked against independent computations."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from helpers.config import make_cfg, small_run
from helpers.oracles import li2021_by_hand
from pipeline.__main__ import run
from pipeline.data.resize import ResizeCrop
from pipeline.data.video import read_frames
from pipeline.models import DemoNet3D, load_checkpoint
from pipeline.store import read_tubes

MEAN, STD = 0.45, 0.225
STEPS = 4


@pytest.fixture(scope="module")
def evaluated(synthetic_root, random_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    overrides = [
        *small_run(synthetic_root, random_checkpoint),
        "store.codec=float32",
        "target.mode=topk",
        "target.k=2",
        f"evaluate.steps={STEPS}",
        "evaluate.baseline=mean",
        "evaluate.batch_size=3",
    ]
    results = run(make_cfg(root, overrides + ["stage=[index,extract,stats,evaluate,report]"]))
    return root, root / "outputs" / "demo", overrides, results


def _clip(row) -> torch.Tensor:
    frames = read_frames(row.source, list(row.frame_indices))
    return ((ResizeCrop(64, (64, 64))(frames) - MEAN) / STD)[None]


@pytest.mark.slow
def test_curves_start_and_end_where_they_must(evaluated, random_checkpoint):
    _, run_dir, _, _ = evaluated
    clips = pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "evaluate").glob("part-*.parquet"))]).set_index(
        "clip_id"
    )
    tubes = read_tubes(
        run_dir,
        columns=["clip_id", "source", "frame_indices", "target", "target_prob"],
        filters=[("target_rank", "=", 0)],
    ).set_index("clip_id")
    assert sorted(clips.index) == sorted(tubes.index) and len(clips) == 8
    net = DemoNet3D(num_classes=4)
    load_checkpoint(net, random_checkpoint)
    net.eval()
    for clip_id, row in clips.iterrows():
        tube = tubes.loc[clip_id]
        assert row["target"] == tube["target"]
        for name in ("deletion_curve", "insertion_curve", "random_deletion_curve", "random_insertion_curve"):
            assert len(row[name]) == STEPS + 1
        # nothing removed: the extractor's own probability; everything removed: the model on the mean clip
        assert row["deletion_curve"][0] == pytest.approx(tube["target_prob"], abs=1e-4)
        assert row["insertion_curve"][-1] == pytest.approx(tube["target_prob"], abs=1e-4)
        x = _clip(tube.to_frame().T.assign(clip_id=clip_id).iloc[0])
        baseline = x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)
        with torch.no_grad():
            p_base = net(baseline).softmax(1)[0, int(tube["target"])].item()
        assert row["deletion_curve"][-1] == pytest.approx(p_base, abs=1e-4)
        assert row["random_insertion_curve"][0] == pytest.approx(p_base, abs=1e-4)
        curve = np.asarray(row["deletion_curve"], dtype=np.float64)
        assert row["deletion_auc"] == pytest.approx(((curve[1:] + curve[:-1]) / 2).mean(), rel=1e-5)
        assert 0 <= row["tube_iou"] <= 1


@pytest.mark.slow
def test_randomisation_check_against_a_hand_made_cam(evaluated):
    _, run_dir, _, _ = evaluated
    clips = pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "evaluate").glob("part-*.parquet"))]).set_index(
        "clip_id"
    )
    tubes = read_tubes(
        run_dir, columns=["clip_id", "source", "frame_indices", "target", "volume"], filters=[("target_rank", "=", 0)]
    ).set_index("clip_id")
    torch.manual_seed(1)  # evaluate.seed + 1 (init_seed of the randomised model): the stage's fresh initialisation
    random_net = DemoNet3D(num_classes=4).eval()
    for clip_id in tubes.index[:3]:
        row = tubes.loc[clip_id]
        with torch.no_grad():
            acts = random_net.features(_clip(row.to_frame().T.iloc[0]))
            cam = torch.einsum("c,cthw->thw", random_net.fc.weight[int(row["target"])], acts[0]).numpy()
        expected = spearmanr(cam.ravel(), row["volume"].ravel()).statistic
        assert clips.loc[clip_id, "randomisation_spearman"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_class_aggregates_report_and_resume(evaluated):
    root, run_dir, overrides, results = evaluated
    clips = pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "evaluate").glob("part-*.parquet"))])
    table = pd.read_parquet(run_dir / "stats" / "faithfulness.parquet")
    everyone = table[table["label"] == -1].iloc[0]
    assert everyone["clips"] == 8 and everyone["deletion_auc"] == pytest.approx(clips["deletion_auc"].mean())
    np.testing.assert_allclose(everyone["insertion_curve"], np.stack(clips["insertion_curve"]).mean(0), rtol=1e-5)
    for name, mine in clips.groupby("label_name"):
        assert table.set_index("label_name").loc[name, "tube_iou"] == pytest.approx(mine["tube_iou"].mean())
    assert results["evaluate"].figures["cam/deletion_auc"] == pytest.approx(everyone["deletion_auc"])
    html = (run_dir / "report" / "index.html").read_text()
    assert f"{everyone['deletion_auc']:.3f}" in html and f"{everyone['random_insertion_auc']:.3f}" in html
    # topk=2: the gallery's misclassified clip (one per class) shows the true class's tube when it is the second target
    pages = " ".join(
        p.read_text().split("<h2>Misclassified clips</h2>")[1] for p in (run_dir / "report").glob("c-*.html")
    )
    tubes = read_tubes(
        run_dir, columns=["clip_id", "label", "label_name", "pred", "pred_prob", "target", "target_rank"]
    )
    first = tubes[tubes["target_rank"] == 0].sort_values("pred_prob", ascending=False)
    shown = first[first["pred"] != first["label"]].groupby("label_name").head(1)["clip_id"]
    explained = set(tubes.loc[tubes["target"] == tubes["label"], "clip_id"])
    assert pages.count("Tube for the true class") == len(set(shown) & explained)
    assert pages.count("did not explain the true class") == len(set(shown) - explained)
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "evaluate").glob("part-*.parquet")}
    run(make_cfg(root, overrides + ["stage=evaluate"]))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished shards are not recomputed


def _evaluated_rows(run_dir) -> pd.DataFrame:
    parts = sorted((run_dir / "evaluate").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts]).sort_values("clip_id").reset_index(drop=True)


@pytest.mark.slow
def test_threads_of_the_driver_give_the_clusters_numbers(evaluated, monkeypatch):
    """With no cluster started (``execution=auto`` on the CPU) the shards run on threads of the driver,
    several at once; every number is the one the cluster's worker processes give (the randomised network is
    seeded by its own config while other threads initialise theirs)."""
    import shutil

    from pipeline.runtime.cluster import LazyClient

    root, run_dir, overrides, _ = evaluated
    first = _evaluated_rows(run_dir)
    real_client = LazyClient._client
    for extra in (["cluster.n_workers=3"], ["cluster.n_workers=2", "execution=cluster"]):
        shutil.rmtree(run_dir / "evaluate")
        on_cluster = "execution=cluster" in extra
        monkeypatch.setattr(
            LazyClient, "_client", real_client if on_cluster else lambda self: pytest.fail("a cluster was started")
        )
        run(make_cfg(root, overrides + ["stage=evaluate", *extra]))
        pd.testing.assert_frame_equal(_evaluated_rows(run_dir), first)


@pytest.mark.slow
def test_li2021_protocol_gives_li_et_als_aucs_on_the_stored_tubes(evaluated, random_checkpoint, tmp_path):
    """``evaluate.protocol=li2021`` on a copy of the run (its default 16 x 16 cells, 32 steps): every
    clip's curves and AUCs are Li et al.'s formulas on the decoded clip and the stored tube at input size; the
    random tube's curves start and end where they must; the protocol is named per row and per class."""
    import shutil

    root, run_dir, overrides, _ = evaluated
    copy = tmp_path / "outputs" / "demo"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "evaluate")
    run(make_cfg(tmp_path, overrides + ["stage=evaluate", "evaluate.protocol=li2021", "evaluate.steps=32"]))
    clips = _evaluated_rows(copy).set_index("clip_id")
    assert set(clips["protocol"]) == {"li2021"} and len(clips) == 8
    tubes = read_tubes(
        copy,
        columns=["clip_id", "source", "frame_indices", "target", "volume"],
        filters=[("target_rank", "=", 0)],
        upsample=True,
    ).set_index("clip_id")
    net = DemoNet3D(num_classes=4)
    load_checkpoint(net, random_checkpoint)
    net.eval()
    for clip_id, row in clips.iterrows():
        tube = tubes.loc[clip_id]
        x = _clip(tube.to_frame().T.assign(clip_id=clip_id).iloc[0])
        ref = li2021_by_hand(net, x[0].numpy(), tube["volume"], int(tube["target"]), cells=16, steps=32)
        assert len(row["deletion_curve"]) == len(row["random_insertion_curve"]) == 33
        np.testing.assert_allclose(row["deletion_curve"], ref["deletion"][0], atol=1e-5)
        assert row["deletion_auc"] == pytest.approx(ref["deletion"][1], abs=1e-5)
        assert row["insertion_auc"] == pytest.approx(ref["insertion"][1], abs=1e-5)
        assert row["random_deletion_curve"][0] == pytest.approx(ref["deletion"][0][0], abs=1e-5)
        assert row["random_insertion_curve"][0] == pytest.approx(ref["insertion"][0][0], abs=1e-5)  # the zero clip
        assert row["random_deletion_curve"][-1] == pytest.approx(ref["deletion"][0][-1], abs=1e-5)
    table = pd.read_parquet(copy / "stats" / "faithfulness.parquet")
    assert set(table["protocol"]) == {"li2021"}
    everyone = table[table["label"] == -1].iloc[0]
    assert everyone["random_deletion_auc"] == pytest.approx(clips["random_deletion_auc"].mean())


@pytest.mark.parametrize(
    "override, message",
    [
        ("evaluate.baseline=zeros", "evaluate.baseline"),
        ("evaluate.steps=0", "evaluate.steps"),
        ("evaluate.protocol=rise", "evaluate.protocol must be one of"),
        ("evaluate.cells=8", "evaluate.cells applies to evaluate.protocol=li2021 only"),
        ("evaluate.protocol=li2021 evaluate.cells=65", "more cells than input pixels"),
        ("evaluate.iou_level=2", "evaluate.iou_level"),
    ],
)
def test_bad_settings_are_named(tmp_path, override, message):
    from pipeline.stages import evaluate

    with pytest.raises(ValueError, match=message):
        evaluate.validate(make_cfg(tmp_path, override.split()))


@pytest.mark.parametrize(
    "override, message",
    [
        ("report.clips_per_class=0", "report.clips_per_class"),
        ("stats.pointing_tolerance=-1", "stats.pointing_tolerance"),
        ("stats.compare_runs=[demo]", "this run itself"),
    ],
)
def test_bad_stats_and_report_settings_are_named(tmp_path, override, message):
    from hydra.errors import ConfigCompositionException  # a string for a list is refused by the schema itself

    with pytest.raises((ValueError, ConfigCompositionException), match=message):
        run(make_cfg(tmp_path, ["stage=[stats,report]", override]))


def test_a_list_setting_given_one_name_is_one_line(tmp_path):
    """``stats.compare_runs=demo`` (a name where the schema wants a list) is refused while the command is composed:
    one line naming the setting, exit 2, no run folder."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", f"paths.root={tmp_path}", "stage=stats", "stats.compare_runs=demo"],
        capture_output=True,
        text=True,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "stats.compare_runs" in lines[0], lines
    assert not (tmp_path / "outputs").exists()
