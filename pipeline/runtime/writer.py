"""Writes ``predict_step`` outputs of one shard to ``tubes/part-NNNNN.parquet``, batch by batch.

Rows stream into a hidden temporary file (one row group per batch, so memory stays flat); when the shard's
predict loop ends the file is fsynced and renamed into place, and the shard's failures are written beside it.
A shard's part file therefore exists only when the whole shard is done. Nothing is kept across batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pytorch_lightning.callbacks import BasePredictionWriter

from pipeline.runtime.job import Prediction, ShardJob, StopShard
from pipeline.store import (
    COMPRESSION,
    TUBE_SCHEMA,
    Failure,
    encode_layer_volumes,
    encode_volume,
    failures_table,
    publish,
    temp_path,
    write_table_atomic,
)
from pipeline.store.provenance import shard_digest
from pipeline.store.run_dir import RunDir

#: rows per Parquet row group of a part: batches are written together (one write per batch cost 3% of a clip)
ROW_GROUP_ROWS = 256
_INDEX_COLUMNS = [
    "clip_id",
    "video_id",
    "source",
    "label",
    "label_name",
    "split",
    "frame_indices",
    "padded",
    "shard",
    "model_label",  # the label as a class of the model (added by the shard task)
]


class TubeWriter(BasePredictionWriter):
    """Prediction writer for one shard (or one DDP rank's share of it).

    Args:
        job: the shard: its rows (hashed into the part's metadata), class names, run directory, fingerprint, rank.
        rows: the clips the DataLoader runs, in its order (the shard's rows less those dropped before the loop).
        method, layer: recorded in every row.
        failures: failure rows found before the loop (e.g. clips without a label), written with the shard's.
        progress: called after every batch with the number of the shard's clips handled so far.
        fail_fast: raise :class:`StopShard` at the first failed clip instead of recording it.
        log: where the shard's events go (its log file).
    """

    def __init__(
        self,
        job: ShardJob,
        rows: pd.DataFrame,
        method: str,
        layer: str,
        failures: list[dict] | None = None,
        progress: Callable[[int], None] | None = None,
        fail_fast: bool = False,
        log: logging.Logger | None = None,
    ):
        super().__init__(write_interval="batch")
        run = RunDir(job.run_dir)
        self.path = run.part("extract", job.shard, job.rank)
        self.failure_path = run.failure_part("extract", job.shard, job.rank)
        self.tmp = temp_path(self.path)
        self.rows = rows.reset_index(drop=True)
        self.method, self.layer, self.class_names = method, layer, list(job.classes)
        metadata = {"config_hash": job.config_hash, "shard_hash": shard_digest(job.rows), "ranks": str(job.ranks)}
        self.schema = TUBE_SCHEMA.with_metadata(metadata)
        self.failures = list(failures or [])
        self.rows_written = 0
        self.bytes: int | None = None
        self.clips_done = len(self.failures)
        self.progress, self.fail_fast = progress, fail_fast
        self.shard_log = log or logging.getLogger(__name__)
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []  # batches not written yet: one row group per ROW_GROUP_ROWS rows
        # the index columns as arrays (nulls as None: pandas would hand NaN to Arrow, which an int32 or string
        # column refuses), converted once per shard rather than once per batch
        self._index_values = {
            name: self.rows[name].astype(object).where(self.rows[name].notna(), None).to_numpy()
            for name in _INDEX_COLUMNS
        }

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, self.schema, compression=COMPRESSION)
        return self._writer

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for position, error_type, message in prediction.failures:
            row = self.rows.iloc[position]
            self.shard_log.warning("clip %s failed: %s: %s", row.clip_id, error_type, message)
            if self.fail_fast:
                raise StopShard(f"clip {row.clip_id} failed ({error_type}): {message}")
            self.failures.append(Failure(row.clip_id, row.source, "extract", error_type, message))
        clips = len(prediction.failures)
        if prediction.tubes is not None:
            table = self.to_table(prediction)
            self._pending.append(table)
            self.rows_written += table.num_rows
            if sum(t.num_rows for t in self._pending) >= ROW_GROUP_ROWS:
                self._flush()
            clips += len(prediction.positions)
        self.clips_done += clips
        self.shard_log.info(
            "batch %d: %d/%d clips, %d rows", batch_idx, self.clips_done, len(self.rows), self.rows_written
        )
        if self.progress is not None:
            self.progress(self.clips_done)

    def _flush(self) -> None:
        if self._pending:
            self._open().write_table(pa.concat_tables(self._pending))
            self._pending = []

    def to_table(self, p: Prediction) -> pa.Table:
        """One batch's outputs as rows of the tube table (one row per clip x target)."""
        n, k = p.targets.shape
        positions = p.positions.numpy()
        columns = {name: np.repeat(values[positions], k) for name, values in self._index_values.items()}
        targets = p.targets.reshape(-1).numpy()
        stored = p.tubes.reshape(n * k, *p.tubes.shape[2:]).numpy()
        pred = np.repeat(p.pred.numpy(), k)
        columns.update(
            crop_box=list(np.repeat(p.crop_box.numpy(), k, axis=0)),
            input_size=[list(p.input_size)] * (n * k),
            method=[self.method] * (n * k),
            layer=[self.layer] * (n * k),
            target=targets,
            target_name=[self.class_names[t] for t in targets],
            target_rank=np.tile(np.arange(k), n),
            target_logit=p.target_logit.reshape(-1).numpy(),
            target_prob=p.target_prob.reshape(-1).numpy(),
            pred=pred,
            pred_name=[self.class_names[t] for t in pred],
            pred_prob=np.repeat(p.pred_prob.numpy(), k),
            volume=[encode_volume(v) for v in stored],
            volume_shape=[list(stored.shape[1:])] * (n * k),
            volume_codec=["float16" if stored.dtype == np.float16 else "float32"] * (n * k),
            volume_scale=p.scale.reshape(-1).numpy(),
            layer_volumes=encode_layer_volumes(self.layer.split("+"), p.layer_tubes, n * k),
        )
        peak_t = p.stats["peak_t"].numpy()
        frames = np.stack([np.asarray(f) for f in columns["frame_indices"]])
        columns["peak_frame"] = frames[np.arange(n * k), peak_t]
        for name, value in p.stats.items():
            value = value.numpy()
            columns[name] = list(value) if value.ndim == 2 else value
        return pa.Table.from_pydict({f.name: columns[f.name] for f in TUBE_SCHEMA}, schema=self.schema)

    def on_predict_end(self, trainer, pl_module):
        """The shard is done: publish the part file (complete or nothing) and its failures."""
        self._flush()
        self._open().close()
        if self.failures:
            write_table_atomic(failures_table(self.failures), self.failure_path)
        else:  # a recomputed shard must not keep the failures of an earlier attempt
            self.failure_path.unlink(missing_ok=True)
        publish(self.tmp, self.path)
        self.bytes = self.path.stat().st_size
        self.shard_log.info("published %s: %d rows, %d failures", self.path, self.rows_written, len(self.failures))

    def abort(self) -> None:
        """Drop the half-written temporary file after an error."""
        self._pending = []
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)
