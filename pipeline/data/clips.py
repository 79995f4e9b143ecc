"""The torch Dataset that decodes clips of an index for a DataLoader, keeping bad clips as failures."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.data.resize import ResizeCrop
from pipeline.data.video import VideoError, read_frames


class ClipDataset(Dataset):
    """Decodes the clips of ``rows`` (index rows: ``source``, ``frame_indices``) into float ``(3, T, H, W)``.

    A clip that cannot be decoded is returned as a failure item instead of raising, so one bad file never
    stops a DataLoader; :func:`collate_clips` separates the two.

    Args:
        rows: the clips.
        transform: the resize / crop to model input; its :meth:`~pipeline.data.resize.ResizeCrop.crop_box` is
            always computed here.
        raw: hand the decoded uint8 ``(T, H, W, 3)`` frames (item ``frames``) instead of the transformed clip,
            for the transform to run on the model's device: a quarter of the bytes to pin and copy.
    """

    def __init__(self, rows: pd.DataFrame, transform: ResizeCrop, raw: bool = False):
        self.sources = rows["source"].tolist()
        self.frames = [list(map(int, f)) for f in rows["frame_indices"]]
        self.transform, self.raw = transform, raw

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        try:
            frames = read_frames(self.sources[i], self.frames[i])
        except VideoError as err:
            return dict(position=i, ok=False, error_type="VideoError", message=str(err))
        except Exception as err:
            return dict(position=i, ok=False, error_type=type(err).__name__, message=f"{self.sources[i]}: {err}")
        crop_box = torch.tensor(self.transform.crop_box(frames.shape[1], frames.shape[2]), dtype=torch.float32)
        if self.raw:
            return dict(position=i, ok=True, frames=torch.from_numpy(frames), crop_box=crop_box)
        return dict(position=i, ok=True, video=self.transform(frames), crop_box=crop_box)


@dataclass
class ClipBatch:
    """A batch of decoded clips, as the DataLoader hands it to the model's step (Lightning moves its tensors to the
    device).

    ``positions`` index the shard's rows of the clips that decoded; ``failures`` are ``(position, error_type,
    message)`` of those that did not. ``video`` holds the transformed clips ``(N, 3, T, H, W)``, or None while they
    are still raw uint8 ``frames`` (one ``(T, H, W, 3)`` tensor per clip) for the device to resize; every tensor
    is None when no clip of the batch decoded.
    """

    positions: torch.Tensor
    failures: list[tuple[int, str, str]]
    video: torch.Tensor | None = None
    frames: list[torch.Tensor] | None = None
    crop_box: torch.Tensor | None = None


def collate_clips(items: list[dict]) -> ClipBatch:
    """Batch the decoded clips; failures ride along as ``(position, error_type, message)`` tuples.

    Transformed clips are stacked as ``video``; raw ones (:class:`ClipDataset` with ``raw``) stay a list of
    uint8 ``frames`` (clips of different videos may differ in size), with ``video`` None until
    :func:`transform_batch` runs on the model's device.
    """
    good = [item for item in items if item["ok"]]
    raw = bool(good) and "frames" in good[0]
    return ClipBatch(
        positions=torch.tensor([item["position"] for item in good], dtype=torch.long),
        video=torch.stack([item["video"] for item in good]) if good and not raw else None,
        frames=[item["frames"] for item in good] if raw else None,
        crop_box=torch.stack([item["crop_box"] for item in good]) if good else None,
        failures=[(item["position"], item["error_type"], item["message"]) for item in items if not item["ok"]],
    )


def transform_batch(batch: ClipBatch, transform: ResizeCrop) -> torch.Tensor | None:
    """The batch's float ``(N, 3, T, h, w)`` clips: ``video``, or ``transform`` applied to each clip's raw
    ``frames`` where they are (on the model's device after the batch's copy); None when no clip decoded."""
    if batch.frames:
        return torch.stack([transform(frames) for frames in batch.frames])
    return batch.video
