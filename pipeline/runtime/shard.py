"""One extract task: explain one shard's clips on one device and publish its part file.

Runs inside a Dask worker (or in-process). The model is built and loaded once per worker thread and reused for
every shard; Lightning's ``Trainer.predict`` runs the batches (DataLoader workers decode while the model runs)
and :class:`~pipeline.runtime.writer.TubeWriter` streams rows to a temporary file that is renamed into place at
the end. A failing attempt is retried ``extract.retries`` times in the task; every attempt's traceback goes to
the shard's log (``outputs/<run>/logs/shard-NNNNN.log``) and the driver gets one :class:`ShardResult`, so the
console shows one line per failed shard. Progress goes to the driver as Dask events, at most twice a second per task.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import torch
from torch.utils.data import DataLoader

from pipeline.models.classes import model_labels
from pipeline.runtime.builders import (
    build_explainer,
    clip_loader,
    clip_transform,
    forget_trainer,
    make_trainer,
    quiet_lightning,
)
from pipeline.runtime.engine import attempts
from pipeline.runtime.job import ShardJob, ShardResult, StopShard
from pipeline.runtime.memory import undo_malloc_trim
from pipeline.runtime.module import TubeModule
from pipeline.runtime.progress import reporter
from pipeline.runtime.resolve import config_of_task, resize_on_device, torch_threads
from pipeline.runtime.writer import TubeWriter
from pipeline.store import Failure
from pipeline.store.run_dir import RunDir


def run_shard(cfg_dict: dict, job: ShardJob) -> ShardResult:
    """Explain one shard's clips and publish its part file, up to ``1 + extract.retries`` attempts, each logged
    (:func:`pipeline.runtime.engine.attempts`).

    Per-clip problems become failure rows. With ``extract.fail_fast`` the first failed clip ends the task at once.
    """
    cfg = config_of_task(cfg_dict)
    tries = 1 + (0 if cfg.extract.fail_fast else int(cfg.extract.retries))
    path = RunDir(job.run_dir).shard_log("extract", job.shard)
    return attempts(lambda slog: _explain_shard(cfg, job, slog), job.shard, len(job.rows), path, tries)


def _explain_shard(cfg, job: ShardJob, slog) -> ShardResult:
    undo_malloc_trim()
    torch.set_num_threads(torch_threads(cfg))
    quiet_lightning()
    module, loader, writer = shard_job(cfg, job, progress=reporter(job.progress_topic, job.shard), log=slog)
    if loader is not None:
        trainer = make_trainer(cfg, [writer], inference_mode=not module.explainer.method.needs_grad)
        try:
            trainer.predict(module, loader, return_predictions=False)
        except BaseException:
            writer.abort()
            forget_trainer()
            raise
    else:  # every clip was dropped before the loop: publish an empty part with the failures
        writer.on_predict_end(None, None)
    return ShardResult(
        job.shard, rows=writer.rows_written, clips=writer.clips_done, failures=len(writer.failures), bytes=writer.bytes
    )


def shard_job(cfg, job: ShardJob, *, progress=None, log=None) -> tuple[TubeModule, DataLoader | None, TubeWriter]:
    """The module, DataLoader (None when no clip is left to run) and writer that explain one shard.

    Clips a target cannot be chosen for (``target.mode=label`` without a label) are failures before the loop.
    """
    explainer = build_explainer(cfg)
    rows = job.rows.reset_index(drop=True)
    model_classes, rows["model_label"] = model_labels(cfg.model, explainer, job.classes, rows["label"])
    failures = []
    if cfg.target.mode == "label":  # the label as a class of the model is the target
        unlabeled = rows["model_label"].isna()
        if job.rank in (None, 0):
            failures = [
                Failure(r.clip_id, r.source, "extract", "MissingLabel", f"{r.clip_id}: target.mode=label but the clip has no label")
                if pd.isna(r.label) else
                Failure(r.clip_id, r.source, "extract", "UnmappedLabel", f"{r.clip_id}: target.mode=label but its label {r.label_name!r} is no class of the model (model.class_map)")
                for r in rows[unlabeled].itertuples()
            ]  # fmt: skip
        if failures and cfg.extract.fail_fast:
            first = failures[0]
            raise StopShard(f"clip {first.clip_id} failed ({first.error_type}): {first.message}")
        rows = rows[~unlabeled].reset_index(drop=True)
    labels = torch.tensor(rows["model_label"].fillna(-1).astype(int).to_numpy())
    module = TubeModule(
        explainer,
        cfg.model.input.mean,
        cfg.model.input.std,
        target=cfg.target.mode,
        k=cfg.target.k,
        codec=cfg.store.codec,
        labels=labels,
        transform=clip_transform(cfg),
        batches_owned=True,  # clip_loader builds every batch afresh
    )
    loader = clip_loader(cfg, rows, int(cfg.extract.batch_size), raw=resize_on_device(cfg))
    writer = TubeWriter(
        replace(job, classes=model_classes),  # tube rows name targets and predictions with the model's classes
        rows,
        method=explainer.method_name,
        layer=explainer.layer_name,
        failures=failures,
        progress=progress,
        fail_fast=bool(cfg.extract.fail_fast),
        log=log,
    )
    return module, (loader if len(rows) else None), writer
