"""The prediction writer turns a batch into rows of the tube table, unlabelled clips included."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import torch

from pipeline.models import DemoNet3D
from pipeline.module import TubeModule
from pipeline.saliency import CAM, TubeExplainer
from pipeline.writer import TubeWriter


def test_unlabelled_clips_are_written_with_null_labels(tmp_path):
    torch.manual_seed(0)
    rows = pd.DataFrame(dict(
        clip_id=["a:000000", "b:000000"], video_id=["a", "b"], source=["/x/a.mp4", "/x/b.mp4"],
        label=pd.array([None, 2], dtype="Int32"), label_name=[None, "C"], split=["test", "test"],
        frame_indices=[list(range(8)), list(range(8))], padded=[0, 0], shard=[0, 0],
    ))
    module = TubeModule(TubeExplainer(DemoNet3D(num_classes=4).eval(), CAM(), (3, 8, 64, 64)), [0.45] * 3, [0.225] * 3)
    batch = dict(positions=torch.arange(2), video=torch.rand(2, 3, 8, 64, 64), crop_box=torch.tensor([[16.0, 0, 112, 96]] * 2), failures=[])
    writer = TubeWriter(tmp_path, 0, rows, "cam", module.explainer.layer_name, ["A", "B", "C", "D"], {"config_hash": "x"})
    writer.write_on_batch_end(None, module, module.predict_step(batch, 0), None, batch, 0)
    writer.on_predict_end(None, module)
    table = pq.read_table(tmp_path / "tubes" / "part-00000.parquet").to_pandas()
    assert table["label"].isna().tolist() == [True, False] and table["label"].iloc[1] == 2
    assert table["label_name"].isna().tolist() == [True, False]
