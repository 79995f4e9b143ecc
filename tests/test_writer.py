"""The prediction writer turns a batch into rows of the tube table, unlabelled clips included."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.clips import ClipBatch
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.methods import CAM
from pipeline.models import DemoNet3D
from pipeline.runtime.job import ShardJob, StopShard
from pipeline.runtime.module import TubeModule
from pipeline.runtime.writer import TubeWriter


def test_unlabelled_clips_are_written_with_null_labels(tmp_path):
    torch.manual_seed(0)
    rows = pd.DataFrame(
        dict(
            clip_id=["a:000000", "b:000000"],
            video_id=["a", "b"],
            source=["/x/a.mp4", "/x/b.mp4"],
            label=pd.array([None, 2], dtype="Int32"),
            label_name=[None, "C"],
            split=["test", "test"],
            frame_indices=[list(range(8)), list(range(8))],
            padded=[0, 0],
            shard=[0, 0],
            model_label=[None, 2],
        )
    )
    module = TubeModule(TubeExplainer(DemoNet3D(num_classes=4).eval(), CAM(), (3, 8, 64, 64)), [0.45] * 3, [0.225] * 3)
    batch = ClipBatch(
        positions=torch.arange(2),
        video=torch.rand(2, 3, 8, 64, 64),
        crop_box=torch.tensor([[16.0, 0, 112, 96]] * 2),
        failures=[],
    )
    writer = TubeWriter(
        ShardJob(tmp_path, 0, rows, ["A", "B", "C", "D"], "x"), rows, "cam", module.explainer.layer_name
    )
    writer.write_on_batch_end(None, module, module.predict_step(batch, 0), None, batch, 0)
    writer.on_predict_end(None, module)
    table = pq.read_table(tmp_path / "tubes" / "part-00000.parquet").to_pandas()
    assert table["label"].isna().tolist() == [True, False] and table["label"].iloc[1] == 2
    assert table["label_name"].isna().tolist() == [True, False]


def test_progress_counts_clips_and_fail_fast_stops_at_a_bad_clip(tmp_path):
    torch.manual_seed(0)
    rows = pd.DataFrame(
        dict(
            clip_id=["a:0", "b:0", "c:0"],
            video_id=["a", "b", "c"],
            source=["/x/a.mp4", "/x/b.mp4", "/x/c.mp4"],
            label=pd.array([0, 1, 2], dtype="Int32"),
            label_name=["A", "B", "C"],
            split=["test"] * 3,
            frame_indices=[list(range(8))] * 3,
            padded=[0] * 3,
            shard=[4] * 3,
            model_label=[0, 1, 2],
        )
    )
    module = TubeModule(TubeExplainer(DemoNet3D(num_classes=4).eval(), CAM(), (3, 8, 64, 64)), [0.45] * 3, [0.225] * 3)
    batch = ClipBatch(
        positions=torch.tensor([0, 2]),
        video=torch.rand(2, 3, 8, 64, 64),
        crop_box=torch.tensor([[16.0, 0, 112, 96]] * 2),
        failures=[(1, "VideoError", "/x/b.mp4: truncated")],
    )
    prediction = module.predict_step(batch, 0)
    seen = []
    job = ShardJob(tmp_path, 4, rows, ["A", "B", "C", "D"], "x")
    writer = TubeWriter(job, rows, "cam", module.explainer.layer_name, progress=seen.append)
    writer.write_on_batch_end(None, module, prediction, None, batch, 0)
    assert seen == [3] and writer.rows_written == 2 and [f.clip_id for f in writer.failures] == ["b:0"]
    assert not (tmp_path / "tubes" / "part-00004.parquet").exists()  # nothing published before the shard ends
    writer.on_predict_end(None, module)
    assert pq.read_table(tmp_path / "tubes" / "part-00004.parquet").num_rows == 2
    assert pq.read_table(tmp_path / "failures" / "part-00004.parquet").column("message").to_pylist() == [
        "/x/b.mp4: truncated"
    ]

    strict_job = ShardJob(tmp_path / "strict", 4, rows, ["A", "B", "C", "D"], "x", rank=1, ranks=2)
    strict = TubeWriter(strict_job, rows, "cam", module.explainer.layer_name, fail_fast=True)
    with pytest.raises(StopShard, match="clip b:0 failed \\(VideoError\\)"):
        strict.write_on_batch_end(None, module, prediction, None, batch, 0)
    strict.abort()
    assert not list((tmp_path / "strict").rglob("*.parquet*"))
    assert strict.path.name == "part-00004-rank1.parquet"


def test_a_fusion_stores_each_layers_tube_and_read_tubes_decodes_it(tmp_path):
    """method=fusion with automatic layers: the row names the layers, and layer_volumes holds each layer's own
    tube (the codec's float16 of the explainer's), decoded and upsampled by read_tubes; one-layer rows: null."""
    from pipeline.explain.fusion import Combiner
    from pipeline.explain.methods import GradCAM
    from pipeline.explain.upsample import upsample
    from pipeline.store import read_tubes

    torch.manual_seed(0)
    rows = pd.DataFrame(
        dict(
            clip_id=["a:0", "b:0"],
            video_id=["a", "b"],
            source=["/x/a.mp4", "/x/b.mp4"],
            label=pd.array([0, 1], dtype="Int32"),
            label_name=["A", "B"],
            model_label=[0, 1],
            split=["test"] * 2,
            frame_indices=[list(range(8))] * 2,
            padded=[0] * 2,
            shard=[0] * 2,
        )
    )
    net = DemoNet3D(num_classes=4).eval()
    batch = ClipBatch(
        positions=torch.arange(2),
        failures=[],
        video=torch.rand(2, 3, 8, 64, 64),
        crop_box=torch.tensor([[0.0, 0, 64, 64]] * 2),
    )
    fused_layers = dict(layer="auto", combiner=Combiner("weighted"), levels=3)
    for method, run, layers in ((GradCAM(), "fused", fused_layers), (CAM(), "cam", {})):
        explainer = TubeExplainer(net, method, (3, 8, 64, 64), **layers)
        module = TubeModule(explainer, [0.45] * 3, [0.225] * 3, target="topk", k=2)
        job = ShardJob(tmp_path / run, 0, rows, list("ABCD"), "x")
        writer = TubeWriter(job, rows, explainer.method_name, explainer.layer_name)
        prediction = module.predict_step(batch, 0)
        writer.write_on_batch_end(None, module, prediction, None, batch, 0)
        writer.on_predict_end(None, module)
    fused = read_tubes(tmp_path / "fused", columns=["clip_id", "target", "layer", "layer_volumes"])
    assert (fused["layer"] == "features.block1+features").all() and len(fused) == 4
    explained = module.explainer  # the cam explainer; recompute the fusion's layer tubes independently
    named = ["features.block1", "features"]
    fusion = TubeExplainer(net, GradCAM(), (3, 8, 64, 64), layer=named, combiner=Combiner("weighted"))
    x = (batch.video - 0.45) / 0.225
    expected = fusion(x, lambda logits: logits.topk(2, dim=1).indices).layer_tubes
    for i, cell in enumerate(fused["layer_volumes"]):
        assert list(cell) == ["features.block1", "features"]
        for name, tube in zip(cell, expected):
            want = tube[i // 2, i % 2].detach().numpy()
            assert cell[name].shape == want.shape and cell[name].dtype == "float32"
            assert abs(cell[name] - want).max() <= 2**-11 * abs(want).max() + 1e-7
    up = read_tubes(tmp_path / "fused", columns=["layer_volumes"], upsample=True)["layer_volumes"][0]
    native = fused["layer_volumes"][0]["features"]
    assert up["features"].shape == (8, 64, 64)
    assert abs(up["features"] - upsample(torch.from_numpy(native), (8, 64, 64)).numpy()).max() == 0
    assert read_tubes(tmp_path / "cam", columns=["layer", "layer_volumes"])["layer_volumes"].isna().all()
    assert explained.layer_name == "features"
