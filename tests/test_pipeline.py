"""The four stages end to end on real video files, a real Dask LocalCluster and a real Lightning Trainer."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from helpers.config import make_cfg, small_run
from pipeline.__main__ import run
from pipeline.data.resize import ResizeCrop
from pipeline.data.video import read_frames
from pipeline.errors import ConfigError
from pipeline.explain.upsample import upsample
from pipeline.models import DemoNet3D, load_checkpoint
from pipeline.runtime.writer import TubeWriter
from pipeline.store import INDEX_SCHEMA, TUBE_SCHEMA, dequantise, read_failures, read_index, read_tubes
from pipeline.store.ledger import read_ledger

MEAN, STD = 0.45, 0.225


@pytest.fixture(scope="module")
def dataset(synthetic_root, tmp_path_factory):
    """The small synthetic dataset plus a corrupt video listed in the test split."""
    root = tmp_path_factory.mktemp("dataset") / "synthetic"
    shutil.copytree(synthetic_root, root)
    (root / "MoveUp" / "v_MoveUp_g01_c99.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    with open(root / "testlist01.txt", "a") as handle:
        handle.write("MoveUp/v_MoveUp_g01_c99.mp4\n")
    return root


@pytest.fixture(scope="module")
def cam_run(dataset, random_checkpoint, tmp_path_factory):
    """index -> (a video vanishes) -> extract -> stats -> report; extract runs in the driver (few clips)."""
    root = tmp_path_factory.mktemp("run")
    overrides = small_run(dataset, random_checkpoint) + ["run_name=cam", "store.codec=float32"]
    run(make_cfg(root, overrides + ["stage=index"]))
    vanished = dataset / "MoveLeft" / "v_MoveLeft_g01_c02.mp4"
    kept = vanished.with_suffix(".keep")
    vanished.rename(kept)
    try:
        run(make_cfg(root, overrides + ["stage=[extract,stats,report]"]))
    finally:
        kept.rename(vanished)
    return root, root / "outputs" / "cam", overrides


def _net(checkpoint) -> DemoNet3D:
    net = DemoNet3D(num_classes=4)
    load_checkpoint(net, checkpoint)
    return net.eval()


def test_index_follows_the_contract(cam_run):
    _, run_dir, _ = cam_run
    index, meta = read_index(run_dir)
    assert pq.read_schema(run_dir / "index.parquet").remove_metadata().equals(INDEX_SCHEMA)
    assert len(index) == 8 and index["clip_id"].is_unique
    assert meta["classes"] == ["MoveRight", "MoveLeft", "MoveDown", "MoveUp"]
    assert all(len(f) == 8 and list(f) == sorted(f) for f in index["frame_indices"])
    assert sorted(index["shard"].unique()) == [0, 1, 2]
    assert (index.groupby("shard").size() <= 3).all()
    assert (index["label_name"] == index["video_id"].str.split("_").str[1]).all()
    failures = read_failures(run_dir)
    bad = failures[failures["stage"] == "index"]
    assert len(bad) == 1 and "v_MoveUp_g01_c99.mp4" in bad.iloc[0]["message"]


def test_every_clip_is_a_tube_or_a_failure(cam_run):
    _, run_dir, _ = cam_run
    index, _ = read_index(run_dir)
    tubes = read_tubes(run_dir)
    assert pq.read_schema(next((run_dir / "tubes").glob("part-*.parquet"))).remove_metadata().equals(TUBE_SCHEMA)
    failures = read_failures(run_dir)
    lost = failures[failures["stage"] == "extract"]
    assert lost["clip_id"].str.startswith("v_MoveLeft_g01_c02").all() and len(lost) == 1
    assert "v_MoveLeft_g01_c02.mp4" in lost.iloc[0]["message"]
    assert tubes["clip_id"].is_unique
    assert set(tubes["clip_id"]) | set(lost["clip_id"]) == set(index["clip_id"])
    assert all(v.shape == (4, 16, 16) and v.dtype == np.float32 for v in tubes["volume"])
    up = read_tubes(run_dir, columns=["clip_id", "volume", "input_size"], upsample=True)
    assert all(v.shape == tuple(s) == (8, 64, 64) for v, s in zip(up["volume"], up["input_size"]))
    assert (tubes["target"] == tubes["pred"]).all() and (tubes["target_rank"] == 0).all()


def test_cam_tubes_equal_hand_computation(cam_run, random_checkpoint):
    """Decode the clips independently, run the trunk by hand and weight it with the classifier row."""
    _, run_dir, _ = cam_run
    net = _net(random_checkpoint)
    tubes = read_tubes(run_dir)
    transform = ResizeCrop(64, (64, 64))
    for row in tubes.itertuples():
        frames = read_frames(row.source, list(row.frame_indices))
        x = (transform(frames)[None] - MEAN) / STD
        with torch.no_grad():
            feats = net.features(x)[0]
            logits = net(x)[0]
            expected = torch.einsum("c,cthw->thw", net.fc.weight[int(logits.argmax())], feats).numpy()
        assert row.pred == int(logits.argmax())
        np.testing.assert_allclose(row.volume, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(row.crop_box, transform.crop_box(96, 128))


def test_stored_tubes_equal_in_memory_tubes(cam_run, monkeypatch):
    """What read_tubes returns is bit for bit what predict_step had in memory (native and upsampled)."""
    root, run_dir, overrides = cam_run
    seen = {}
    original = TubeWriter.write_on_batch_end

    def spy(self, trainer, pl_module, prediction, *args, **kwargs):
        decoded = dequantise(prediction.tubes, prediction.scale)[:, 0]
        for position, volume, peak_t in zip(
            prediction.positions.tolist(), decoded, prediction.stats["peak_t"].tolist()
        ):
            seen[self.rows.iloc[position]["clip_id"]] = (volume, peak_t)
        return original(self, trainer, pl_module, prediction, *args, **kwargs)

    monkeypatch.setattr(TubeWriter, "write_on_batch_end", spy)  # a threads-only cluster shares this process
    run(
        make_cfg(
            root,
            overrides + ["run_name=mem", "store.codec=float16", "cluster.processes=false", "stage=[index,extract]"],
        )
    )
    native = read_tubes(root / "outputs" / "mem").set_index("clip_id")
    upsampled = read_tubes(root / "outputs" / "mem", upsample=True).set_index("clip_id")
    assert set(seen) == set(native.index) and len(seen) == 8
    for clip_id, (volume, peak_t) in seen.items():
        assert np.array_equal(native.loc[clip_id, "volume"], volume.numpy())
        assert np.array_equal(upsampled.loc[clip_id, "volume"], upsample(volume, (8, 64, 64)).numpy())
        assert upsampled.loc[clip_id, "peak_t"] == peak_t

    # the float16 codec keeps every tube within 2**-11 of its peak of the lossless float32 run
    assert (native["volume_codec"] == "float16").all()
    for clip_id, exact in read_tubes(run_dir, columns=["clip_id", "volume"]).set_index("clip_id")["volume"].items():
        assert np.abs(native.loc[clip_id, "volume"] - exact).max() <= np.abs(exact).max() * 2**-11 * 1.01


def test_stats_and_report(cam_run):
    _, run_dir, _ = cam_run
    per_class = pd.read_parquet(run_dir / "stats" / "per_class.parquet")
    overall = pd.read_parquet(run_dir / "stats" / "overall.parquet")
    tubes = read_tubes(run_dir, columns=["label_name", "pred", "label", "entropy", "top10_mass", "temporal_profile"])
    assert overall["clips"].item() == len(tubes) == per_class["clips"].sum()
    assert overall["accuracy"].item() == pytest.approx((tubes["pred"] == tubes["label"]).mean())
    for row in per_class.itertuples():
        mine = tubes[tubes["label_name"] == row.label_name]
        assert row.entropy == pytest.approx(mine["entropy"].mean(), rel=1e-5)
        np.testing.assert_allclose(row.temporal_profile, np.stack(mine["temporal_profile"]).mean(0), rtol=1e-5)
    # pointing game against boxes.csv, recomputed here from the stored per-frame peaks
    steps = pd.read_parquet(run_dir / "stats" / "pointing.parquet")
    assert len(steps) == 8 * len(tubes)
    assert overall["pointing_game"].item() == pytest.approx(steps["hit"].mean())
    assert 0 < overall["pointing_chance"].item() < 0.1
    html = (run_dir / "report" / "index.html").read_text()
    for name in ("MoveRight", "MoveLeft", "MoveDown", "MoveUp", "v_MoveUp_g01_c99"):
        assert name in html
    for src in pd.Series(html.split('src="')[1:]).str.split('"').str[0]:
        assert (run_dir / "report" / src).is_file(), src


def test_pointing_game_recomputed_from_boxes(cam_run, dataset):
    _, run_dir, _ = cam_run
    tubes = read_tubes(run_dir, columns=["video_id", "frame_indices", "frame_peak_x", "frame_peak_y"])
    boxes = pd.read_csv(dataset / "boxes.csv").set_index(["video_id", "frame"])
    hits = []
    for row in tubes.itertuples():
        for frame, x, y in zip(row.frame_indices, row.frame_peak_x, row.frame_peak_y):
            b = boxes.loc[(row.video_id, int(frame))]
            hits.append(b.x0 <= x < b.x1 and b.y0 <= y < b.y1)
    overall = pd.read_parquet(run_dir / "stats" / "overall.parquet")
    assert overall["pointing_game"].item() == pytest.approx(np.mean(hits))


def test_two_workers_give_the_same_rows(cam_run):
    root, run_dir, overrides = cam_run
    # two Dask worker processes (cam ran in the driver), each with two DataLoader processes decoding while the
    # model runs: the same batches, in the same order, the same bytes
    run(
        make_cfg(
            root,
            overrides
            + [
                "run_name=cam2",
                "store.codec=float32",
                "cluster.n_workers=2",
                "execution=cluster",
                "extract.num_workers=2",
                "stage=[index,extract]",
            ],
        )
    )
    one = read_tubes(run_dir, columns=["clip_id", "volume", "pred", "entropy"]).set_index("clip_id").sort_index()
    two = (
        read_tubes(root / "outputs" / "cam2", columns=["clip_id", "volume", "pred", "entropy"])
        .set_index("clip_id")
        .sort_index()
    )
    # cam2 was indexed with the video present, so it has the clip that cam lost
    assert two.index.is_unique and set(one.index) < set(two.index) and len(two) == len(one) + 1
    shards = read_tubes(run_dir, columns=["clip_id", "shard"])
    complete = set(shards.loc[shards.groupby("shard")["clip_id"].transform("size") == 3, "clip_id"])
    for clip_id in one.index:
        if clip_id in complete:  # a fixed torch thread count and the same batches: same bits
            assert one.loc[clip_id, "volume"].tobytes() == two.loc[clip_id, "volume"].tobytes()
            assert one.loc[clip_id, "entropy"] == two.loc[clip_id, "entropy"]
        else:  # the vanished video's shard has smaller batches (another conv algorithm), nothing more
            np.testing.assert_allclose(one.loc[clip_id, "volume"], two.loc[clip_id, "volume"], rtol=1e-5, atol=1e-6)
        assert one.loc[clip_id, "pred"] == two.loc[clip_id, "pred"]


def test_clips_resized_by_the_model_device_give_the_same_bytes(cam_run):
    root, run_dir, overrides = cam_run
    # uint8 frames out of two DataLoader processes, resized in predict_step (what a GPU run does) instead of
    # float clips resized in the loader: the same op in the same dtype, so on the CPU the same bits
    extra = ["run_name=resized", "store.codec=float32", "extract.resize=device", "extract.num_workers=2"]
    run(make_cfg(root, overrides + extra + ["stage=[index,extract]"]))
    columns = ["clip_id", "shard", "volume", "crop_box", "target_logit", "entropy", "centroid_y", "density"]
    one = read_tubes(run_dir, columns=columns).set_index("clip_id")
    device = read_tubes(root / "outputs" / "resized", columns=columns).set_index("clip_id")
    complete = one[one.groupby("shard")["volume"].transform("size") == 3].index
    assert len(complete) >= 3 and set(one.index) < set(device.index)
    for clip_id in complete:
        a, b = one.loc[clip_id], device.loc[clip_id]
        assert a["volume"].tobytes() == b["volume"].tobytes()
        assert np.array_equal(a["crop_box"], b["crop_box"]) and np.array_equal(a["density"], b["density"])
        assert (a["target_logit"], a["entropy"], a["centroid_y"]) == (b["target_logit"], b["entropy"], b["centroid_y"])


def test_rerun_skips_finished_shards_and_redoes_missing_ones(cam_run):
    root, run_dir, overrides = cam_run
    parts = sorted((run_dir / "tubes").glob("part-*.parquet"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts}
    parts[2].unlink()  # shard 2: not the shard whose video vanished, so its clips and batches are unchanged
    run(make_cfg(root, overrides + ["run_name=cam", "store.codec=float32", "stage=extract"]))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((run_dir / "tubes").glob("part-*.parquet"))}
    assert after.keys() == before.keys()
    for name in before:
        if name == parts[2].name:
            assert after[name][0] != before[name][0]
            assert read_part_rows(after[name][1]) == read_part_rows(before[name][1])
        else:
            assert after[name] == before[name]
    assert not list((run_dir / "tubes").glob(".*tmp*"))


def read_part_rows(data: bytes):
    import io

    table = pq.read_table(io.BytesIO(data), columns=["clip_id", "volume"])
    return sorted(zip(table.column("clip_id").to_pylist(), table.column("volume").to_pylist()))


def test_other_config_is_refused_in_the_same_run(cam_run):
    root, run_dir, overrides = cam_run
    with pytest.raises(ConfigError, match="another configuration.*new run_name"):
        run(make_cfg(root, overrides + ["run_name=cam", "store.codec=float16", "stage=extract"]))


def test_gradcam_topk_and_label_targets(cam_run, random_checkpoint):
    root, _, overrides = cam_run
    run(
        make_cfg(
            root,
            overrides
            + [
                "run_name=grad",
                "method=gradcam",
                "target.mode=topk",
                "target.k=2",
                "cluster.processes=false",
                "stage=[index,extract]",
            ],
        )
    )
    tubes = read_tubes(root / "outputs" / "grad")
    assert (
        tubes.groupby("clip_id")["target_rank"].apply(sorted)
        == pd.Series([[0, 1]] * 8, index=sorted(tubes["clip_id"].unique()))
    ).all()
    first = tubes[tubes["target_rank"] == 0]
    assert (first["target"] == first["pred"]).all() and (tubes["method"] == "gradcam").all()
    assert all((v >= 0).all() for v in tubes["volume"])  # Grad-CAM tubes pass through ReLU
    second = tubes[tubes["target_rank"] == 1].set_index("clip_id")
    assert (second["target_prob"] <= first.set_index("clip_id").loc[second.index, "target_prob"]).all()

    run(
        make_cfg(
            root,
            overrides
            + [
                "run_name=label",
                "method=gradcam",
                "target.mode=label",
                "cluster.processes=false",
                "stage=[index,extract]",
            ],
        )
    )
    labelled = read_tubes(root / "outputs" / "label", columns=["target", "label"])
    assert (labelled["target"] == labelled["label"]).all()


@pytest.mark.slow
def test_per_slice_gradcam_runs_end_to_end(cam_run, random_checkpoint):
    """``method.pool=hw`` through stage=all: the stored tubes are the per-slice Grad-CAM of the decoded clips."""
    from pipeline.explain.explainer import TubeExplainer
    from pipeline.explain.methods import GradCAM

    root, _, overrides = cam_run
    extra = ["run_name=slices", "method=gradcam", "method.pool=hw", "model.layer=features.block2", "stage=all"]
    run(make_cfg(root, overrides + extra))
    run_dir = root / "outputs" / "slices"
    assert "pool: hw" in (run_dir / "tubes_config.yaml").read_text()
    tubes = read_tubes(run_dir, columns=["clip_id", "source", "frame_indices", "target", "volume"])
    assert len(tubes) == 8 and (run_dir / "report" / "index.html").is_file()
    net = _net(random_checkpoint)
    row = tubes.iloc[0]
    x = ((ResizeCrop(64, (64, 64))(read_frames(row.source, list(row.frame_indices))) - MEAN) / STD)[None]
    explained = TubeExplainer(net, GradCAM(pool="hw"), (3, *x.shape[2:]), layer="features.block2")(
        x, lambda logits: torch.tensor([[int(row.target)]])
    )
    np.testing.assert_allclose(row.volume, explained.tubes[0, 0].detach().numpy(), rtol=1e-4, atol=1e-6)


def test_bad_config_fails_before_work(cam_run, tmp_path):
    root, _, overrides = cam_run
    with pytest.raises(ValueError, match="unknown stage 'extrct'"):
        run(make_cfg(tmp_path, overrides + ["stage=extrct"]))
    with pytest.raises(Exception, match="model.layer='nope'"):
        run(
            make_cfg(
                root, overrides + ["run_name=badlayer", "model.layer=nope", "stage=extract", "cluster.processes=false"]
            )
        )


def test_reindexing_into_fewer_shards_sets_old_parts_aside(cam_run, caplog):
    root, _, overrides = cam_run
    run_dir = root / "outputs" / "resharded"
    base = overrides + ["run_name=resharded", "cluster.processes=false", "stage=[index,extract]"]
    run(make_cfg(root, base))
    assert len(list((run_dir / "tubes").glob("part-*.parquet"))) == 3
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime.engine"):
        run(make_cfg(root, [*base, "index.clips_per_shard=8"]))
    assert [p.name for p in (run_dir / "tubes").glob("part-*.parquet")] == ["part-00000.parquet"]
    moved = [r.getMessage() for r in caplog.records if "moved to" in r.getMessage()]
    assert moved == [  # one line per reason, naming the shards
        f"extract: the parts of shard(s) 1, 2 moved to {run_dir / 'tubes' / '.stale'}: they belong to no shard of "
        "the current index",
        f"extract: the parts of shard(s) 0 moved to {run_dir / 'tubes' / '.stale'}: they were made with other "
        "extract settings or for other clips, or are incomplete",
    ]
    # shards 1 and 2 are gone; shard 0 now holds other clips, so its old part is set aside before the recompute
    assert sorted(p.name for p in (run_dir / "tubes" / ".stale").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    tubes = read_tubes(run_dir, columns=["clip_id", "shard"])
    assert len(tubes) == 8 and tubes["clip_id"].is_unique and (tubes["shard"] == 0).all()


def test_worker_threads_of_one_process_do_not_share_a_model(cam_run):
    """Two Dask worker threads in one process: each builds its own model, so hooks never cross."""
    root, run_dir, overrides = cam_run
    run(
        make_cfg(
            root,
            overrides
            + [
                "run_name=threads",
                "store.codec=float32",
                "cluster.n_workers=2",
                "cluster.processes=false",
                "index.clips_per_shard=1",
                "stage=[index,extract]",
            ],
        )
    )
    threads = read_tubes(root / "outputs" / "threads", columns=["clip_id", "volume"]).set_index("clip_id")
    one = read_tubes(run_dir, columns=["clip_id", "volume"]).set_index("clip_id")
    assert len(threads) == 8
    for clip_id, volume in one["volume"].items():
        np.testing.assert_allclose(threads.loc[clip_id, "volume"], volume, rtol=1e-5, atol=1e-6)


def test_stages_after_extract_read_what_made_the_tubes(cam_run, caplog):
    """The extract command's configuration is kept with the parts; a report command with another tube setting
    says which one differs and shows the configuration that made the tubes, not its own."""
    root, run_dir, overrides = cam_run
    made = OmegaConf.load(run_dir / "tubes_config.yaml")
    assert made.store.codec == "float32" and "extract" in str(made.stage)  # the latest extract command
    with caplog.at_level("WARNING"):
        run(make_cfg(root, overrides + ["run_name=cam", "store.codec=float16", "stage=report"]))
    assert "store.codec: 'float32' -> 'float16'" in caplog.text and "tubes_config.yaml" in caplog.text
    assert OmegaConf.load(run_dir / "config.yaml").store.codec == "float16"  # the latest command
    overview = (run_dir / "report" / "index.html").read_text()
    assert "codec: float32" in overview and "codec: float16" not in overview
    caplog.clear()
    with caplog.at_level("WARNING"):
        run(make_cfg(root, overrides + ["run_name=cam", "store.codec=float32", "stage=stats"]))
    assert "differ" not in caplog.text


def test_a_truncated_part_and_a_garbage_ledger_are_recovered_by_a_rerun(cam_run):
    """A part cut to half its size and a garbage line in the ledger's journal: the rerun sets both aside (never
    deletes them), rebuilds the ledger from the other parts' own metadata (not recomputed: same inode, same
    bytes) and recomputes the broken shard alone; every clip once, the same tubes as before."""
    root, run_dir, overrides = cam_run
    parts = sorted((run_dir / "tubes").glob("part-*.parquet"))
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in parts}
    broken = parts[2]  # not the shard whose video vanished: its clips and batches are the same again
    broken.write_bytes(before[broken.name][1][: len(before[broken.name][1]) // 2])
    recorded = read_ledger(run_dir, "extract", "done")
    journal = run_dir / "ledger" / "extract" / "all.jsonl"
    journal.write_text("\x00garbage{\n" + journal.read_text())
    run(make_cfg(root, overrides + ["run_name=cam", "store.codec=float32", "stage=extract"]))
    after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted((run_dir / "tubes").glob("part-*.parquet"))}
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k != broken.name} == {k: v for k, v in before.items() if k != broken.name}
    assert read_part_rows(after[broken.name][1]) == read_part_rows(before[broken.name][1])  # recomputed, the same
    assert (run_dir / "tubes" / ".stale" / broken.name).stat().st_size == len(before[broken.name][1]) // 2
    rebuilt = read_ledger(run_dir, "extract", "done")
    assert rebuilt.keys() == recorded.keys() and all(rebuilt[s].rows == recorded[s].rows for s in recorded)
    assert [p.read_text().split("\n")[0] for p in journal.parent.glob("all.jsonl.unreadable-*")] == ["\x00garbage{"]
    tubes = read_tubes(run_dir, columns=["clip_id"])
    index, _ = read_index(run_dir)
    failures = read_failures(run_dir)
    failed = set(failures.loc[failures["stage"] == "extract", "clip_id"])
    assert tubes["clip_id"].is_unique and not failed & set(tubes["clip_id"])
    assert set(tubes["clip_id"]) | failed == set(index["clip_id"])
