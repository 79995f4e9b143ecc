"""The torch Dataset that decodes clips of an index for a DataLoader, keeping bad clips as failures."""

from __future__ import annotations

import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.data.video import ResizeCrop, VideoError, read_frames


class ClipDataset(Dataset):
    """Decodes the clips of ``rows`` (index rows: ``source``, ``frame_indices``) into float ``(3, T, H, W)``.

    A clip that cannot be decoded is returned as a failure item instead of raising, so one bad file never
    stops a DataLoader; :func:`collate_clips` separates the two.
    """

    def __init__(self, rows: pd.DataFrame, transform: ResizeCrop):
        self.sources = rows["source"].tolist()
        self.frames = [list(map(int, f)) for f in rows["frame_indices"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        try:
            frames = read_frames(self.sources[i], self.frames[i])
        except VideoError as err:
            return dict(position=i, ok=False, error_type="VideoError", message=str(err))
        except Exception as err:
            return dict(position=i, ok=False, error_type=type(err).__name__, message=f"{self.sources[i]}: {err}")
        crop_box = self.transform.crop_box(frames.shape[1], frames.shape[2])
        return dict(
            position=i, ok=True, video=self.transform(frames), crop_box=torch.tensor(crop_box, dtype=torch.float32)
        )


def collate_clips(items: list[dict]) -> dict:
    """Batch the decoded clips; failures ride along as ``(position, error_type, message)`` tuples."""
    good = [item for item in items if item["ok"]]
    return dict(
        positions=torch.tensor([item["position"] for item in good], dtype=torch.long),
        video=torch.stack([item["video"] for item in good]) if good else None,
        crop_box=torch.stack([item["crop_box"] for item in good]) if good else None,
        failures=[(item["position"], item["error_type"], item["message"]) for item in items if not item["ok"]],
    )
