"""One extract task: explain one shard's clips on one device and publish its part file.

Runs inside a Dask worker (or in-process). The model is built and loaded once per worker thread and reused for
every shard; Lightning's ``Trainer.predict`` runs the batches (DataLoader workers decode while the model runs)
and :class:`~pipeline.runtime.writer.TubeWriter` streams rows to a temporary file that is renamed into place at
the end. A failing attempt is retried ``extract.retries`` times in the task; every attempt's traceback goes to
the shard's log (``outputs/<run>/logs/shard-NNNNN.log``) and the driver gets one :class:`ShardResult`, so the
console shows one line per failed shard. Per-batch progress goes to the driver as Dask events.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from dask.distributed import get_worker
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from pipeline.models.classes import model_labels
from pipeline.runtime.builders import (
    build_explainer,
    clip_loader,
    clip_transform,
    make_trainer,
    quiet_lightning,
    resize_on_device,
    torch_threads,
)
from pipeline.runtime.job import ShardJob, ShardResult, log_path
from pipeline.runtime.memory import undo_malloc_trim
from pipeline.runtime.module import TubeModule
from pipeline.runtime.progress import reporter
from pipeline.runtime.writer import ClipFailure, TubeWriter
from pipeline.store import failure_row


@contextlib.contextmanager
def shard_log(run_dir: Path, shard: int):
    """A logger writing to ``logs/shard-NNNNN.log`` (appended: every attempt of the shard is kept)."""
    path = log_path(run_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one logger per thread, reused: loggers are never freed
    logger = logging.getLogger(f"pipeline.runtime.shard.thread-{threading.get_ident()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def _worker_name() -> str:
    try:
        return str(get_worker().name)
    except ValueError:
        return "(driver)"


def run_shard(cfg_dict: dict, job: ShardJob) -> ShardResult:
    """Explain one shard's clips and publish its part file; every attempt of ``1 + extract.retries`` is logged.

    Per-clip problems become failure rows. An attempt that raises is retried; when every attempt failed, the
    result carries the last error (the tracebacks are in the shard's log). With ``extract.fail_fast`` the first
    failed clip ends the task at once with ``stop`` set.
    """
    # a config of its own, as a worker gets by unpickling: in the driver (extract.in_process) every task is handed
    # the same dict, and configs built on shared values failed at random ("'NoneType' object has no attribute
    # '_invalidate_flags_cache'" reading model.input.std)
    cfg = OmegaConf.create(copy.deepcopy(cfg_dict))
    attempts = 1 + (0 if cfg.extract.fail_fast else int(cfg.extract.retries))
    with shard_log(job.run_dir, job.shard) as slog:
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            slog.info(
                "shard %d: %d clips, attempt %d of %d, worker %s, pid %d",
                job.shard, len(job.rows), attempt, attempts, _worker_name(), os.getpid(),
            )  # fmt: skip
            try:
                result = _explain_shard(cfg, job, slog)
            except ClipFailure as err:
                slog.error("shard %d stopped: %s", job.shard, err)
                return ShardResult(job.shard, attempts=attempt, error=str(err), error_type="ClipFailure", stop=True)
            except Exception as err:
                slog.error(
                    "shard %d, attempt %d failed: %s: %s", job.shard, attempt, type(err).__name__, err, exc_info=True
                )
                if attempt == attempts:
                    message = f"{type(err).__name__}: {err}"
                    return ShardResult(job.shard, attempts=attempt, error=message, error_type=type(err).__name__)
                continue
            result.seconds, result.attempts = round(time.perf_counter() - started, 3), attempt
            slog.info(
                "shard %d done: %d rows, %d failures, %.2f s", job.shard, result.rows, result.failures, result.seconds
            )
            return result
    raise AssertionError("unreachable: every attempt returns")


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
            raise
    else:  # every clip was dropped before the loop: publish an empty part with the failures
        writer.on_predict_end(None, None)
    return ShardResult(job.shard, rows=writer.rows_written, clips=writer.clips_done, failures=len(writer.failures))


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
                failure_row(r.clip_id, r.source, "extract", "MissingLabel", f"{r.clip_id}: target.mode=label but the clip has no label")
                if pd.isna(r.label) else
                failure_row(r.clip_id, r.source, "extract", "UnmappedLabel", f"{r.clip_id}: target.mode=label but its label {r.label_name!r} is no class of the model (model.class_map)")
                for r in rows[unlabeled].itertuples()
            ]  # fmt: skip
        if failures and cfg.extract.fail_fast:
            first = failures[0]
            raise ClipFailure(f"clip {first['clip_id']} failed ({first['error_type']}): {first['message']}")
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
