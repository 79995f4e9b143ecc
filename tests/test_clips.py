"""ClipDataset under a DataLoader with worker processes: what the extract stage uses to decode while the model runs."""

import pandas as pd
import torch
from torch.utils.data import DataLoader

from helpers.layouts import barcode_frames, write_frame_folder
from pipeline.data.clips import ClipDataset, collate_clips
from pipeline.data.resize import ResizeCrop
from pipeline.data.video import write_video


def test_dataloader_workers_decode_the_same_clips(tmp_path):
    write_video(tmp_path / "a.mp4", barcode_frames(40), fps=30, g="10", bf="2")
    write_frame_folder(tmp_path / "b", barcode_frames(12, seed=1))
    rows = pd.DataFrame(
        dict(
            source=[str(tmp_path / "a.mp4")] * 3 + [str(tmp_path / "b"), str(tmp_path / "gone.mp4")],
            frame_indices=[[0, 2, 4, 6], [17, 19, 21, 23], [33, 35, 37, 39], [8, 9, 10, 11], [0, 1, 2, 3]],
        )
    )
    dataset = ClipDataset(rows, ResizeCrop(48, (48, 48)))
    serial = collate_clips([dataset[i] for i in range(len(dataset))])
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_clips))
    assert batches[-1].video is None  # the last batch holds only the failure
    batches, failures = batches[:-1], batches[-1].failures
    assert torch.equal(torch.cat([b.positions for b in batches]), serial.positions)
    assert torch.equal(torch.cat([b.video for b in batches]), serial.video)
    assert torch.equal(torch.cat([b.crop_box for b in batches]), serial.crop_box)
    assert failures == serial.failures
    assert serial.positions.tolist() == [0, 1, 2, 3] and serial.failures[0][0] == 4
    assert "gone.mp4: no such file" in serial.failures[0][2]
