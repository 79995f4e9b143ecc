"""The tube codec: a float32 tube to stored values plus a scale, and back, exactly.

Tubes are stored at the explained layer's native resolution. Decoding is exact and deterministic, and the
extractor computes its statistics from the *decoded* tube, so what a reader gets back is exactly what the
pipeline measured.

Codecs:
    ``float32``  raw little-endian float32; lossless.
    ``float16``  ``tube / scale`` as float16 with ``scale = max |tube|`` (float32); relative error <= 2**-11
                 of the tube's peak, half the bytes. Raw scale is kept in ``volume_scale``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import ConfigError

CODECS = ("float16", "float32")


def quantise(tubes: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``(..., t, h, w)`` float tubes: returns (stored values, per-tube float32 scale)."""
    if codec not in CODECS:
        raise ConfigError(f"store.codec must be one of {CODECS}, got {codec!r}")
    tubes = tubes.float()
    if codec == "float32":
        return tubes, torch.ones(tubes.shape[:-3], dtype=torch.float32, device=tubes.device)
    scale = tubes.abs().amax(dim=(-3, -2, -1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (tubes / scale[..., None, None, None]).half(), scale


def dequantise(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantise`: float32 tubes, bit-identical to what :func:`decode_volume` returns."""
    return stored.float() * scale.float()[..., None, None, None]


def encode_volume(stored: np.ndarray) -> bytes:
    return np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()


def decode_volume(data: bytes, shape, codec: str, scale: float) -> np.ndarray:
    """One stored tube back to float32 ``shape``."""
    if codec not in CODECS:
        raise ConfigError(f"unknown volume codec {codec!r}")
    values = np.frombuffer(data, dtype="<f2" if codec == "float16" else "<f4").astype(np.float32)
    return (values * np.float32(scale)).reshape(tuple(shape))
