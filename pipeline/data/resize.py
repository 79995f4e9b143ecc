"""The resize and centre crop from decoded frames to model input, and the mapping of boxes between the two.

:class:`ResizeCrop` runs in DataLoader workers on one clip, or on the model's device on a whole batch
(``extract.resize=device``); on the CPU both give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ResizeCrop:
    """Resize so the short side is ``short_side``, then centre-crop to ``size`` = (height, width).

    :meth:`crop_box` says which region of the source frame the crop covers, in source pixels, so tubes can be
    drawn back onto the original video.
    """

    short_side: int
    size: tuple[int, int]

    def _geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        scale = self.short_side / min(height, width)
        new_h, new_w = max(self.size[0], round(height * scale)), max(self.size[1], round(width * scale))
        top, left = (new_h - self.size[0]) // 2, (new_w - self.size[1]) // 2
        return new_h, new_w, top, left

    def crop_box(self, height: int, width: int) -> list[float]:
        """The crop as ``[x0, y0, x1, y1]`` in source pixels."""
        new_h, new_w, top, left = self._geometry(height, width)
        sx, sy = width / new_w, height / new_h
        return [left * sx, top * sy, (left + self.size[1]) * sx, (top + self.size[0]) * sy]

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> float ``(3, T, h, w)`` in [0, 1], on the frames' device.

        The frames are resized as uint8 (bilinear, antialiased), as decoded: on the CPU torch's integer kernel
        takes a tenth of the float one's time. Other devices (GPUs) resize in float32 and round to the same 256
        levels, within one level of the CPU's values. The same call runs in a DataLoader worker and on the
        model's device on a batch's uint8 frames (``extract.resize=device``): on the CPU, the same bytes.
        """
        height, width = frames.shape[1:3]
        new_h, new_w, top, left = self._geometry(height, width)
        frames = torch.from_numpy(frames) if isinstance(frames, np.ndarray) else frames
        video = frames.permute(0, 3, 1, 2)  # (T, 3, H, W), channels last in memory: the integer kernel's layout
        if (new_h, new_w) != (height, width):
            video = _resize_uint8(video, (new_h, new_w))
        video = video[:, :, top : top + self.size[0], left : left + self.size[1]]
        return video.permute(1, 0, 2, 3).float().div_(255.0).contiguous()


def _resize_uint8(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 ``(T, 3, H, W)`` frames to ``size``, still uint8."""
    return _resize_integer(video, size) if video.device.type == "cpu" else _resize_float(video, size)


def _resize_integer(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)


def _resize_float(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    scaled = F.interpolate(video.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return scaled.round_().clamp_(0, 255).to(torch.uint8)


def source_to_input(box: np.ndarray, crop_box: list[float], input_hw: tuple[int, int]) -> np.ndarray:
    """Map ``[..., x0, y0, x1, y1]`` boxes from source pixels to model-input pixels of a clip."""
    x0, y0, x1, y1 = crop_box
    sx, sy = input_hw[1] / (x1 - x0), input_hw[0] / (y1 - y0)
    out = np.asarray(box, dtype=np.float64).copy()
    out[..., [0, 2]] = (out[..., [0, 2]] - x0) * sx
    out[..., [1, 3]] = (out[..., [1, 3]] - y0) * sy
    return out
