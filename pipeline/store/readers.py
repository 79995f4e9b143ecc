"""Every reader of the output contract: the index, the tubes (:func:`read_tubes`), the failures, the boxes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import MissingInput, OutputError
from pipeline.explain.upsample import upsample as upsample_tubes
from pipeline.store.codec import decode_layer_volumes, decode_volume
from pipeline.store.ledger import read_ledger
from pipeline.store.run_dir import RunDir
from pipeline.store.schema import FAILURE_SCHEMA

log = logging.getLogger(__name__)


#: the command that rebuilds each kind of file of a run
REPAIR = {
    "tubes": "rerun stage=extract with the run's settings to recompute its shard (it sets aside a part cut short; "
    "one damaged inside, move out of tubes/ first)",
    "index": "rebuild it with stage=index",
    "stats": "rebuild it with stage=stats",
    "failures": "rerun the stage that wrote it (stage=index for failures/index.parquet, stage=extract for parts)",
}


def tube_files(run_dir: str | Path) -> list[Path]:
    return sorted(RunDir(run_dir).tubes.glob("part-*.parquet"))


def require_tubes(run_dir: str | Path) -> list[Path]:
    """The run's tube part files; :class:`MissingInput` saying why there are none (no extract run yet, or an
    extract whose shards all failed, as the ledger tells) and what to run."""
    files = tube_files(run_dir)
    if files:
        return files
    failed = read_ledger(run_dir, "extract", "failed")
    if failed:
        raise MissingInput(
            f"{Path(run_dir)}: extract failed: {len(failed)} shard(s) failed and none is done (see "
            f"{RunDir(run_dir).failures} and {RunDir(run_dir).logs}); fix the cause and rerun stage=extract"
        )
    raise MissingInput(f"{RunDir(run_dir).tubes}: no tube files; run the extract stage first (stage=extract)")


def unreadable_file(files: Sequence[str | Path]) -> tuple[Path, Exception] | None:
    """The first of ``files`` that Parquet cannot read whole (footer, schema or data), with the error."""
    for path in files:
        try:
            pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            return Path(path), err
    return None


@contextmanager
def readable(files: Sequence[str | Path], repair: str) -> Iterator[None]:
    """Turn a Parquet read error inside the block into an :class:`~pipeline.errors.OutputError` that names the
    file at fault (found by reading ``files`` one by one) and ``repair``, the command that rebuilds it.

    Example:
        >>> with readable(tube_files(run_dir), REPAIR["tubes"]):
        ...     frame = pq.ParquetDataset(tube_files(run_dir)).read().to_pandas()
    """
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        found = unreadable_file(files) if len(files) != 1 else (Path(files[0]), err)
        if found is None:  # every file reads alone: the error is not one file's
            raise
        path, cause = found
        raise OutputError(f"{path}: cannot be read ({type(cause).__name__}: {cause}); {repair}") from err


def read_table(path: str | Path, repair: str, **kwargs) -> pd.DataFrame:
    """One Parquet table of a run as a DataFrame; an unreadable file is an OutputError naming it and ``repair``."""
    with readable([path], repair):
        return pq.read_table(path, **kwargs).to_pandas()


def read_tubes(
    run_dir: str | Path, columns: list[str] | None = None, upsample: bool = False, filters=None
) -> pd.DataFrame:
    """Read a run's tubes as a DataFrame whose ``volume`` column holds float32 numpy arrays.

    A fused run's ``layer_volumes`` column (each fused layer's own tube) is decoded to ``{layer: array}`` per
    row (None for one-layer methods), upsampled like ``volume`` when asked.

    Args:
        run_dir: ``outputs/<run_name>``.
        columns: columns to read (``None``: all). ``volume`` and ``layer_volumes`` are decoded whenever they are
            among them.
        upsample: return each volume at its clip's ``input_size`` (T, H, W), trilinearly upsampled exactly as
            the extractor did before computing statistics.
        filters: pyarrow filters, e.g. ``[("label_name", "=", "MoveLeft")]``.
    """
    files = require_tubes(run_dir)
    wanted = None
    if columns is not None:
        wanted = list(dict.fromkeys(columns))
        if "volume" in wanted:
            wanted += [c for c in ("volume_shape", "volume_codec", "volume_scale") if c not in wanted]
        if "layer_volumes" in wanted and "volume_codec" not in wanted:
            wanted.append("volume_codec")
        if upsample and ({"volume", "layer_volumes"} & set(wanted)) and "input_size" not in wanted:
            wanted.append("input_size")
    with readable(files, REPAIR["tubes"]):
        frame = pq.ParquetDataset(files, filters=filters).read(columns=wanted).to_pandas()
    if "volume" in frame.columns:
        frame["volume"] = decode_column(frame, upsample=upsample)
    if "layer_volumes" in frame.columns:
        frame["layer_volumes"] = decode_layers_column(frame, upsample=upsample)
    if columns is not None:
        frame = frame[list(columns)]
    return frame


def decode_column(frame: pd.DataFrame, upsample: bool = False) -> list[np.ndarray]:
    """Decode the ``volume`` column of a tubes frame; with ``upsample``, to each row's ``input_size``."""
    volumes = [
        decode_volume(data, shape, codec, scale)
        for data, shape, codec, scale in zip(
            frame["volume"], frame["volume_shape"], frame["volume_codec"], frame["volume_scale"]
        )
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


def decode_layers_column(frame: pd.DataFrame, upsample: bool = False) -> list[dict[str, np.ndarray] | None]:
    """Decode the ``layer_volumes`` column of a tubes frame; with ``upsample``, each tube to the row's
    ``input_size``."""
    out = []
    for i, (cell, codec) in enumerate(zip(frame["layer_volumes"], frame["volume_codec"])):
        tubes = decode_layer_volumes(cell, codec)
        if tubes is not None and upsample:
            size = tuple(int(s) for s in frame["input_size"].iloc[i])
            tubes = {name: upsample_tubes(torch.from_numpy(vol), size).numpy() for name, vol in tubes.items()}
        out.append(tubes)
    return out


def read_index(run_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """The index table and its metadata (``classes``, ``boxes``)."""
    path = RunDir(run_dir).index
    if not path.is_file():
        raise MissingInput(f"{path}: no index; run the index stage first (stage=index)")
    with readable([path], REPAIR["index"]):
        table = pq.read_table(path)
    try:
        meta = json.loads(table.schema.metadata[b"saliency_tubes"])
    except (TypeError, KeyError, ValueError) as err:
        raise OutputError(
            f"{path}: not an index of this pipeline (no saliency_tubes metadata); {REPAIR['index']}"
        ) from err
    return table.to_pandas(), meta


def read_failures(run_dir: str | Path) -> pd.DataFrame:
    """All failure rows of a run (index and extract), empty with the contract's columns when none."""
    files = sorted(RunDir(run_dir).failures.glob("*.parquet"))
    if not files:
        return FAILURE_SCHEMA.empty_table().to_pandas()
    with readable(files, REPAIR["failures"]):
        return pa.concat_tables([pq.read_table(f, schema=FAILURE_SCHEMA) for f in files]).to_pandas()


def read_boxes(path: str | Path) -> pd.DataFrame:
    """A boxes CSV (``video_id, frame, x0, y0, x1, y1`` in source pixels), checked."""
    boxes = pd.read_csv(path, dtype={"video_id": str})
    missing = {"video_id", "frame", "x0", "y0", "x1", "y1"} - set(boxes.columns)
    if missing:
        raise ValueError(f"{path}: boxes CSV lacks columns {sorted(missing)}")
    return boxes.astype(
        {"video_id": object, "frame": "int64", "x0": "float64", "y0": "float64", "x1": "float64", "y1": "float64"}
    )


def boxes_path(cfg, meta: dict) -> Path | None:
    """The ground-truth boxes CSV of a run: ``stats.boxes``, else the dataset's own; None when there is none."""
    path = cfg.stats.get("boxes") or meta.get("boxes")
    if path and not Path(path).is_file():
        log.warning("boxes: %s does not exist; no pointing game or tube IoU", path)
        return None
    return Path(path) if path else None
