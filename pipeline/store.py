"""The output contract: table schemas, the tube codec, atomic Parquet writes and :func:`read_tubes`.

Tubes are stored at the explained layer's native resolution. A codec turns a float32 tube into bytes plus a
scale; decoding is exact and deterministic, and the extractor computes its statistics from the *decoded*
tube, so what a reader gets back is exactly what the pipeline measured.

Codecs:
    ``float32``  raw little-endian float32; lossless.
    ``float16``  ``tube / scale`` as float16 with ``scale = max |tube|`` (float32); relative error <= 2**-11
                 of the tube's peak, half the bytes. Raw scale is kept in ``volume_scale``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

CODECS = ("float16", "float32")
COMPRESSION = "zstd"

INDEX_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("video_id", pa.string()),
        ("source", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("frame_indices", pa.list_(pa.int32())),
        ("padded", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("shard", pa.int32()),
        # added by the dataset readers (issue 3): the segment a clip comes from and the probe's codec/duration
        ("segment_id", pa.string()),
        ("start_frame", pa.int32()),
        ("end_frame", pa.int32()),
        ("codec", pa.string()),
        ("duration", pa.float32()),
    ]
)

#: index columns that describe the source rather than the clip; tube tables leave them out
SOURCE_COLUMNS = ("num_frames", "fps", "width", "height", "segment_id", "start_frame", "end_frame", "codec", "duration")

_F32, _I32, _LF32, _LI32 = pa.float32(), pa.int32(), pa.list_(pa.float32()), pa.list_(pa.int32())

TUBE_SCHEMA = pa.schema(
    [f for f in INDEX_SCHEMA if f.name not in SOURCE_COLUMNS]
    + [
        ("crop_box", _LF32),
        ("input_size", _LI32),
        ("method", pa.string()),
        ("layer", pa.string()),
        ("target", _I32),
        ("target_name", pa.string()),
        ("target_rank", _I32),
        ("target_logit", _F32),
        ("target_prob", _F32),
        ("pred", _I32),
        ("pred_name", pa.string()),
        ("pred_prob", _F32),
        ("volume", pa.binary()),
        ("volume_shape", _LI32),
        ("volume_codec", pa.string()),
        ("volume_scale", _F32),
        # per-clip statistics, computed on the decoded tube upsampled to input_size
        ("mass", _F32),
        ("peak_t", _I32),
        ("peak_y", _F32),
        ("peak_x", _F32),
        ("peak_frame", _I32),
        ("centroid_t", _F32),
        ("centroid_y", _F32),
        ("centroid_x", _F32),
        ("top10_mass", _F32),
        ("entropy", _F32),
        ("temporal_profile", _LF32),
        ("frame_peak_x", _LF32),
        ("frame_peak_y", _LF32),
        ("border_mass", _F32),
        ("density", _LF32),  # DENSITY_GRID x DENSITY_GRID, row-major
    ]
)

FAILURE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


# ----------------------------------------------------------------------------------------------- volume codec
def quantise(tubes: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``(..., t, h, w)`` float tubes: returns (stored values, per-tube float32 scale)."""
    if codec not in CODECS:
        raise ValueError(f"store.codec must be one of {CODECS}, got {codec!r}")
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
        raise ValueError(f"unknown volume codec {codec!r}")
    values = np.frombuffer(data, dtype="<f2" if codec == "float16" else "<f4").astype(np.float32)
    return (values * np.float32(scale)).reshape(tuple(shape))


# ----------------------------------------------------------------------------------------------- atomic files
def write_table_atomic(table: pa.Table, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``table`` to ``path`` so that the file appears complete or not at all (temp + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression=COMPRESSION)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def file_metadata(path: str | Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW") and k != b"pandas"}


def failures_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)


def read_failures(run_dir: str | Path) -> pd.DataFrame:
    """All failure rows of a run (index and extract), empty with the contract's columns when none."""
    files = sorted((Path(run_dir) / "failures").glob("*.parquet"))
    if not files:
        return FAILURE_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(f, schema=FAILURE_SCHEMA) for f in files]).to_pandas()


# ----------------------------------------------------------------------------------------------- reading tubes
def tube_files(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / "tubes").glob("part-*.parquet"))


def read_tubes(run_dir: str | Path, columns: list[str] | None = None, upsample: bool = False, filters=None) -> pd.DataFrame:
    """Read a run's tubes as a DataFrame whose ``volume`` column holds float32 numpy arrays.

    Args:
        run_dir: ``outputs/<run_name>``.
        columns: columns to read (``None``: all). ``volume`` is decoded whenever it is among them.
        upsample: return each volume at its clip's ``input_size`` (T, H, W), trilinearly upsampled exactly as
            the extractor did before computing statistics.
        filters: pyarrow filters, e.g. ``[("label_name", "=", "MoveLeft")]``.
    """
    files = tube_files(run_dir)
    if not files:
        raise FileNotFoundError(f"{Path(run_dir) / 'tubes'}: no tube files; run the extract stage first")
    wanted = None
    if columns is not None:
        wanted = list(dict.fromkeys(columns))
        if "volume" in wanted:
            wanted += [c for c in ("volume_shape", "volume_codec", "volume_scale") if c not in wanted]
            if upsample and "input_size" not in wanted:
                wanted.append("input_size")
    table = pq.ParquetDataset(files, filters=filters).read(columns=wanted)
    frame = table.to_pandas()
    if "volume" in frame.columns:
        frame["volume"] = decode_column(frame, upsample=upsample)
    if columns is not None:
        frame = frame[[c for c in columns]]
    return frame


def decode_column(frame: pd.DataFrame, upsample: bool = False) -> list[np.ndarray]:
    """Decode the ``volume`` column of a tubes frame; with ``upsample``, to each row's ``input_size``."""
    from pipeline.saliency import upsample as upsample_tubes

    volumes = [
        decode_volume(data, shape, codec, scale)
        for data, shape, codec, scale in zip(frame["volume"], frame["volume_shape"], frame["volume_codec"], frame["volume_scale"])
    ]
    if not upsample:
        return volumes
    out: list[np.ndarray | None] = [None] * len(volumes)
    groups: dict[tuple, list[int]] = {}
    for i, (vol, size) in enumerate(zip(volumes, frame["input_size"])):
        groups.setdefault((vol.shape, tuple(int(s) for s in size)), []).append(i)
    for (_, size), rows in groups.items():
        for start in range(0, len(rows), 256):  # bounded memory for large frames
            chunk = rows[start : start + 256]
            batch = upsample_tubes(torch.from_numpy(np.stack([volumes[i] for i in chunk])), size).numpy()
            for i, vol in zip(chunk, batch):
                out[i] = vol
    return out
