"""Index stage: dataset on disk -> ``index.parquet`` (one row per clip) and ``failures/index.parquet``.

Videos are probed in parallel on the Dask cluster (:mod:`pipeline.data.probing`; nothing is decoded), or in the
driver when so few are left that starting a cluster would cost more (``execution``). The results are cached in
``index.probe_cache``, so indexing again probes only what changed. Each video's (or segment's) frame range is cut
into clips by the configured sampler, and clips are dealt into shards of contiguous rows of equal clip count
(clips of one video stay next to each other, which keeps decoding local). Entries that give no clip (a bad
file, a segment beyond its video, a malformed row) become failure rows; the rest of the index is written.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
from hydra.utils import instantiate

from pipeline.data.clip_index import assign_shards, build_clips
from pipeline.data.datasets.base import DatasetReader
from pipeline.data.probing import DRIVER_MAX_VIDEOS, probe_all
from pipeline.data.sampling import ClipSampler
from pipeline.errors import ConfigError
from pipeline.runtime.inprocess import in_process_setting
from pipeline.stages.result import StageResult
from pipeline.store import INDEX_SCHEMA, Failure, failures_table, write_table_atomic
from pipeline.store.run_dir import RunDir

log = logging.getLogger(__name__)


def validate(cfg, upstream: tuple[str, ...] = ()) -> None:
    """Settings of this stage, checked before any work starts."""
    instantiate(cfg.sampler)
    if int(cfg.index.clips_per_shard) < 1:
        raise ConfigError(f"index.clips_per_shard must be >= 1, got {cfg.index.clips_per_shard}")
    if int(cfg.index.probe_batch) < 1:
        raise ConfigError(f"index.probe_batch must be >= 1, got {cfg.index.probe_batch}")
    driver_max(cfg)


def driver_max(cfg) -> float:
    """How many videos left to probe the driver probes itself (``execution``)."""
    return {"auto": DRIVER_MAX_VIDEOS, True: math.inf, False: 0}[in_process_setting(cfg)]


def run(cfg, run_dir: Path, client=None) -> StageResult:
    reader: DatasetReader = instantiate(cfg.dataset)
    sampler: ClipSampler = instantiate(cfg.sampler)
    records, errors = reader.records()
    cache = Path(cfg.index.probe_cache) if cfg.index.probe_cache else None
    probes = probe_all(
        [r.source for r in records],
        client,
        cache=cache,
        batch_size=int(cfg.index.probe_batch),
        driver_max=driver_max(cfg),
    )
    readable = sum(not isinstance(probes[r.source], Exception) for r in records)
    log.info(
        "dataset: %d of %d %s have a readable video (%d without one, %d unusable)",
        readable,
        len(records) + len(errors),
        reader.entries,
        len(records) - readable,
        len(errors),
    )
    frame, failures = build_clips(records, probes, sampler)
    failures = [Failure(e.entry_id or e.where, e.where, "index", e.error_type, e.message) for e in errors] + failures
    frame["shard"] = assign_shards(len(frame), int(cfg.index.clips_per_shard))
    meta = dict(classes=list(reader.classes), boxes=str(reader.boxes_path) if reader.boxes_path else None)
    table = pa.Table.from_pandas(frame, schema=INDEX_SCHEMA, preserve_index=False)
    run = RunDir(run_dir)
    write_table_atomic(table, run.index, {"saliency_tubes": json.dumps(meta)})
    failure_file = run.index_failures
    if failures:
        write_table_atomic(failures_table(failures), failure_file)
    else:
        failure_file.unlink(missing_ok=True)
    log.info(
        "index: %d clips in %d shards, %d failures -> %s",
        len(frame),
        frame["shard"].nunique(),
        len(failures),
        run.index,
    )
    reasons = pd.Series([f.error_type for f in failures], dtype=object).value_counts().to_dict()
    return StageResult("index", shards=int(frame["shard"].nunique()), clips=len(frame), failures=reasons)
