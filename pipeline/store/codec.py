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
from pipeline.store.schema import CODECS


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


def encode_layer_volumes(names: list[str], layer_tubes, rows: int) -> list[list[dict] | None]:
    """The ``layer_volumes`` cells of ``rows`` tube rows: per row, one ``{layer, volume, shape, scale}`` per fused
    layer. ``layer_tubes`` holds ``(stored, scale)`` of :func:`quantise` per layer (``(N, k, t, h, w)``, ``(N, k)``)
    or is None (a one-layer method: null cells)."""
    if layer_tubes is None:
        return [None] * rows
    flat = []
    for stored, scale in layer_tubes:
        stored = stored.reshape(rows, *stored.shape[-3:]).cpu().numpy()
        flat.append((stored, scale.reshape(rows).cpu().numpy()))
    return [
        [
            dict(layer=name, volume=encode_volume(stored[i]), shape=list(stored.shape[1:]), scale=float(scale[i]))
            for name, (stored, scale) in zip(names, flat)
        ]
        for i in range(rows)
    ]


def decode_layer_volumes(cell, codec: str) -> dict[str, np.ndarray] | None:
    """One ``layer_volumes`` cell back to ``{layer: float32 (t, h, w) tube}`` (None for a one-layer method)."""
    if cell is None:
        return None
    return {item["layer"]: decode_volume(item["volume"], item["shape"], codec, item["scale"]) for item in list(cell)}
