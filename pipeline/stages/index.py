"""Index stage: dataset on disk -> ``index.parquet`` (one row per clip) and ``failures/index.parquet``.

Videos are probed in parallel on the Dask cluster, in batches (frame count, fps, size, codec, duration;
nothing is decoded), and the results are cached in ``index.probe_cache`` keyed by each file's size and
modification time, so indexing again probes only what changed. Each video's (or segment's) frame range is cut
into clips by the configured sampler, and clips are dealt into shards of contiguous rows of equal clip count
(clips of one video stay next to each other, which keeps decoding local). Entries that give no clip (a bad
file, a segment beyond its video, a malformed row) become failure rows; the rest of the index is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict
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
from pipeline.video import VideoError, VideoInfo, probe

log = logging.getLogger(__name__)


PROBE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("num_frames", pa.int32()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("codec", pa.string()),
        ("duration", pa.float64()),
        ("error", pa.string()),
    ]
)


def _stamp(source: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a file or folder, ``None`` when it does not exist."""
    try:
        stat = os.stat(source)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _probe(source: str):
    """Probe one video; errors come back as values so that one bad file never fails the Dask graph."""
    try:
        return probe(source)
    except VideoError as err:
        return err
    except Exception as err:  # noqa: BLE001 - an unexpected decoder error is still this file's failure
        return VideoError(f"{source}: {type(err).__name__}: {err}")


def _probe_many(sources: list[str]) -> list:
    return [_probe(s) for s in sources]


def read_probe_cache(path: Path | None) -> dict[str, tuple[tuple[int, int], object]]:
    """``source -> ((size, mtime_ns), VideoInfo or VideoError)`` from an earlier index run."""
    if path is None or not path.is_file():
        return {}
    cache = {}
    for row in pq.read_table(path, schema=PROBE_SCHEMA).to_pylist():
        result = VideoError(row["error"]) if row["error"] is not None else VideoInfo(
            num_frames=row["num_frames"], fps=row["fps"], width=row["width"], height=row["height"], codec=row["codec"], duration=row["duration"]
        )
        cache[row["source"]] = ((row["size"], row["mtime_ns"]), result)
    return cache


def write_probe_cache(path: Path, probes: dict[str, object], stamps: dict[str, tuple[int, int] | None]) -> None:
    rows = []
    for source, result in probes.items():
        if stamps.get(source) is None:
            continue  # a missing file is looked at again next time
        size, mtime = stamps[source]
        if isinstance(result, Exception):
            rows.append(dict(source=source, size=size, mtime_ns=mtime, error=str(result)))
        else:
            rows.append(dict(source=source, size=size, mtime_ns=mtime, error=None, **asdict(result)))
    write_table_atomic(pa.Table.from_pylist(rows, schema=PROBE_SCHEMA), path)


def probe_all(sources: list[str], client=None, progress: bool = True, cache: Path | None = None, batch_size: int = 32) -> dict[str, object]:
    """Probe every distinct source (in batches of ``batch_size`` per Dask task when ``client`` is given).

    With ``cache`` (a Parquet file), sources whose size and modification time are unchanged since the cache
    was written are not probed again, and the cache is rewritten with this run's results.
    """
    unique = list(dict.fromkeys(sources))
    stamps = {s: _stamp(s) for s in unique}
    known = read_probe_cache(cache)
    results = {s: known[s][1] for s in unique if s in known and known[s][0] == stamps[s]}
    todo = [s for s in unique if s not in results]
    if len(results):
        log.info("probe: %d of %d sources unchanged since %s", len(results), len(unique), cache)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    with tqdm(total=len(todo), desc="probe", unit="video", disable=not progress) as bar:
        if client is None:
            done = ((batch, _probe_many(batch)) for batch in batches)
        else:
            futures = client.map(_probe_many, batches, pure=False)
            owner = {f.key: b for f, b in zip(futures, batches)}
            done = ((owner[f.key], f.result()) for f in as_completed(futures))
        for batch, found in done:
            results.update(zip(batch, found))
            bar.update(len(batch))
    if cache is not None:
        write_probe_cache(cache, results, stamps)
    return {s: results[s] for s in unique}


class FrameRangeError(ValueError):
    """A segment that does not fit in its video."""


def _frame_range(rec: VideoRecord, info: VideoInfo, fps: float) -> tuple[int, int]:
    """The record's 0-based ``[start, end)`` frames in this video; :class:`FrameRangeError` when it does not fit."""
    if rec.start_sec is not None or rec.end_sec is not None:
        if not math.isfinite(fps):
            raise FrameRangeError(f"{rec.source}: a segment in seconds needs the frame rate (set dataset.fps for frame folders)")
        start = math.ceil((rec.start_sec or 0.0) * fps - 1e-6)
        end = info.num_frames if rec.end_sec is None else math.ceil(rec.end_sec * fps - 1e-6)
        where = f"[{rec.start_sec}s, {rec.end_sec}s) = frames [{start}, {end})"
    else:
        start, end = rec.start_frame, info.num_frames if rec.end_frame is None else rec.end_frame
        where = f"frames [{start}, {end})"
    if end <= start:
        raise FrameRangeError(f"{rec.source}: {where} hold no frame (the segment stops before it starts)")
    if start < 0 or end > info.num_frames:
        raise FrameRangeError(f"{rec.source}: {where} lie beyond the video's {info.num_frames} frames")
    return start, end


def build_clips(records: list[VideoRecord], probes: dict[str, object], sampler: ClipSampler) -> tuple[pd.DataFrame, list[dict]]:
    """Clip rows (no shard yet) and failure rows for records that cannot give a clip.

    A clip id is ``<segment id or video id>:<first frame, 6 digits>``; a clip id met a second time (a video or
    segment listed twice) is a failure row, the first one is kept.
    """
    rows, failures, seen = [], [], set()

    def fail(rec: VideoRecord, error_type: str, message: str) -> None:
        failures.append(dict(clip_id=rec.segment_id or rec.video_id, source=rec.source, stage="index", error_type=error_type, message=message))

    for rec in records:
        info = probes[rec.source]
        if isinstance(info, Exception):
            fail(rec, type(info).__name__, str(info))
            continue
        fps = info.fps if math.isfinite(info.fps) else (rec.fps if rec.fps else math.nan)
        try:
            start, end = _frame_range(rec, info, fps)
            clips = sampler(start, end, fps if math.isfinite(fps) else None)
        except FrameRangeError as err:
            fail(rec, "FrameRangeError", str(err))
            continue
        except ValueError as err:
            fail(rec, "SamplingError", f"{rec.source}: {err}")
            continue
        for clip in clips:
            clip_id = f"{rec.segment_id or rec.video_id}:{clip.frame_indices[0]:06d}"
            if clip_id in seen:
                fail(rec, "DuplicateClip", f"{rec.source}: clip {clip_id} already comes from an earlier entry (listed twice?)")
                continue
            seen.add(clip_id)
            rows.append(
                dict(
                    clip_id=clip_id, video_id=rec.video_id, source=rec.source, label=rec.label, label_name=rec.label_name,
                    split=rec.split, frame_indices=clip.frame_indices, padded=clip.padded,
                    num_frames=info.num_frames, fps=fps, width=info.width, height=info.height,
                    segment_id=rec.segment_id, start_frame=start, end_frame=end, codec=info.codec, duration=info.duration,
                )
            )
    frame = pd.DataFrame(rows, columns=[f.name for f in INDEX_SCHEMA if f.name != "shard"])
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
    if int(cfg.index.get("probe_batch", 32)) < 1:
        raise ValueError(f"index.probe_batch must be >= 1, got {cfg.index.probe_batch}")


def run(cfg, run_dir: Path, client=None) -> pd.DataFrame:
    reader: DatasetReader = instantiate(cfg.dataset)
    sampler: ClipSampler = instantiate(cfg.sampler)
    records, errors = reader.records()
    log.info("dataset: %d videos, %d unusable entries", len(records), len(errors))
    cache = Path(cfg.index.probe_cache) if cfg.index.get("probe_cache") else None
    probes = probe_all([r.source for r in records], client, cache=cache, batch_size=int(cfg.index.get("probe_batch", 32)))
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
