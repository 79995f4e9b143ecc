"""Index stage: dataset on disk -> ``index.parquet`` (one row per clip) and ``failures/index.parquet``.

Videos are probed in parallel on the Dask cluster (frame count, fps, size; nothing is decoded). Each video's
frame range is cut into clips by the configured sampler, and clips are dealt into shards of contiguous rows
(clips of one video stay together, which keeps decoding local).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.distributed import as_completed
from hydra.utils import instantiate
from tqdm import tqdm

from pipeline.datasets.base import DatasetReader, VideoRecord
from pipeline.sampling import ClipSampler
from pipeline.store import INDEX_SCHEMA, failures_table, write_table_atomic
from pipeline.video import VideoError, probe

log = logging.getLogger(__name__)


def _probe(source: str):
    """Probe one video; errors come back as values so that one bad file never fails the Dask graph."""
    try:
        return probe(source)
    except VideoError as err:
        return err
    except Exception as err:  # noqa: BLE001 - an unexpected decoder error is still this file's failure
        return VideoError(f"{source}: {type(err).__name__}: {err}")


def probe_all(sources: list[str], client=None, progress: bool = True) -> dict[str, object]:
    """Probe every distinct source, on the Dask cluster when ``client`` is given."""
    unique = list(dict.fromkeys(sources))
    if client is None:
        return {s: _probe(s) for s in tqdm(unique, desc="probe", unit="video", disable=not progress)}
    futures = client.map(_probe, unique, pure=False, batch_size=64)
    owner = {f.key: s for f, s in zip(futures, unique)}
    results = {}
    with tqdm(total=len(unique), desc="probe", unit="video", disable=not progress) as bar:
        for future in as_completed(futures):
            results[owner[future.key]] = future.result()
            bar.update()
    return results


def build_clips(records: list[VideoRecord], probes: dict[str, object], sampler: ClipSampler) -> tuple[pd.DataFrame, list[dict]]:
    """Clip rows (no shard yet) and failure rows for videos that cannot give a clip."""
    rows, failures = [], []
    for rec in records:
        info = probes[rec.source]
        if isinstance(info, Exception):
            failures.append(dict(clip_id=rec.video_id, source=rec.source, stage="index", error_type=type(info).__name__, message=str(info)))
            continue
        end = info.num_frames if rec.end_frame is None else min(rec.end_frame, info.num_frames)
        if end <= rec.start_frame:
            failures.append(
                dict(clip_id=rec.video_id, source=rec.source, stage="index", error_type="FrameRangeError",
                     message=f"{rec.source}: frames [{rec.start_frame}, {rec.end_frame}) lie outside the video's {info.num_frames} frames")
            )
            continue
        for clip in sampler(rec.start_frame, end):
            rows.append(
                dict(
                    clip_id=f"{rec.video_id}:{clip.frame_indices[0]:06d}",
                    video_id=rec.video_id, source=rec.source, label=rec.label, label_name=rec.label_name,
                    split=rec.split, frame_indices=clip.frame_indices, padded=clip.padded,
                    num_frames=info.num_frames, fps=info.fps, width=info.width, height=info.height,
                )
            )
    frame = pd.DataFrame(rows, columns=[f.name for f in INDEX_SCHEMA if f.name != "shard"])
    duplicated = frame["clip_id"].duplicated()
    if duplicated.any():
        raise ValueError(f"clip ids are not unique (is a video listed twice?): {frame.loc[duplicated, 'clip_id'].head().tolist()}")
    return frame, failures


def assign_shards(num_clips: int, clips_per_shard: int) -> np.ndarray:
    """Contiguous shards of (almost) equal size, at most ``clips_per_shard`` clips each."""
    if clips_per_shard < 1:
        raise ValueError(f"index.clips_per_shard must be >= 1, got {clips_per_shard}")
    shards = max(1, -(-num_clips // clips_per_shard))
    return (np.arange(num_clips) * shards // max(num_clips, 1)).astype(np.int32)


def read_index(run_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """The index table and its metadata (``classes``, ``boxes``)."""
    path = Path(run_dir) / "index.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index; run the index stage first (stage=index)")
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"saliency_tubes"])
    return table.to_pandas(), meta


def validate(cfg, upstream: tuple[str, ...] = ()) -> None:
    """Settings of this stage, checked before any work starts."""
    instantiate(cfg.sampler)
    if int(cfg.index.clips_per_shard) < 1:
        raise ValueError(f"index.clips_per_shard must be >= 1, got {cfg.index.clips_per_shard}")


def run(cfg, run_dir: Path, client=None) -> pd.DataFrame:
    reader: DatasetReader = instantiate(cfg.dataset)
    sampler: ClipSampler = instantiate(cfg.sampler)
    records, errors = reader.records()
    log.info("dataset: %d videos, %d unusable entries", len(records), len(errors))
    probes = probe_all([r.source for r in records], client)
    frame, failures = build_clips(records, probes, sampler)
    failures = [dict(clip_id=e.where, source=e.where, stage="index", error_type=e.error_type, message=e.message) for e in errors] + failures
    frame["shard"] = assign_shards(len(frame), int(cfg.index.clips_per_shard))
    meta = dict(classes=list(reader.classes), boxes=str(reader.boxes_path) if reader.boxes_path else None)
    table = pa.Table.from_pandas(frame, schema=INDEX_SCHEMA, preserve_index=False)
    write_table_atomic(table, run_dir / "index.parquet", {"saliency_tubes": json.dumps(meta)})
    failure_file = run_dir / "failures" / "index.parquet"
    if failures:
        write_table_atomic(failures_table(failures), failure_file)
    else:
        failure_file.unlink(missing_ok=True)
    log.info("index: %d clips in %d shards, %d failures -> %s", len(frame), frame["shard"].nunique(), len(failures), run_dir / "index.parquet")
    return frame
