"""One extract task: explain one shard's clips on one device and publish its part file.

Runs inside a Dask worker. The model is built and loaded once per worker thread and reused for every shard;
Lightning's ``Trainer.predict`` runs the batches (DataLoader workers decode while the model runs) and
:class:`~pipeline.runtime.writer.TubeWriter` streams rows to a temporary file that is renamed into place at the end.
Each shard logs to ``outputs/<run>/logs/shard-NNNNN.log`` and reports per-batch progress to the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from dask.distributed import get_worker
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.plugins.environments import LightningEnvironment
from torch.utils.data import DataLoader

from pipeline.data.clips import ClipDataset, collate_clips
from pipeline.data.video import ResizeCrop
from pipeline.explain.explainer import TubeExplainer
from pipeline.models import build_model
from pipeline.runtime.cluster import worker_gpu
from pipeline.runtime.module import TubeModule
from pipeline.runtime.writer import ClipFailure, TubeWriter
from pipeline.store.provenance import shard_digest

_cache = threading.local()


def build_explainer(cfg, model_cfg=None) -> TubeExplainer:
    """The explainer for ``cfg.model`` (or ``model_cfg``) and ``cfg.method``, built and loaded once per thread.

    A worker reuses it for every shard. It is kept per thread because hooks capture activations on the
    model's own modules: two threads of one process (``cluster.processes=false``) must not share a model.
    """
    model_cfg = cfg.model if model_cfg is None else model_cfg
    key = json.dumps(
        [OmegaConf.to_container(model_cfg, resolve=True), OmegaConf.to_container(cfg.method, resolve=True)]
    )
    if getattr(_cache, "key", None) != key:
        net = build_model(model_cfg)
        shape = (3, model_cfg.input.clip_len, *model_cfg.input.size)
        _cache.explainer = TubeExplainer(
            net,
            instantiate(cfg.method),
            shape,
            layer=model_cfg.layer,
            classifier=model_cfg.classifier,
            layout=model_cfg.get("layout", "auto"),
        )
        _cache.key = key
    return _cache.explainer


def torch_threads(cfg) -> int:
    setting = cfg.extract.torch_threads
    return int(setting) if setting != "auto" else worker_cores(cfg)


def worker_cores(cfg) -> int:
    """The CPU cores one Dask worker owns: the machine's (or the SLURM job's ``cluster.cores``) over its workers
    (one per GPU on GPUs)."""
    cluster = cfg.cluster
    cores = int(cluster.get("cores") or len(os.sched_getaffinity(0)) or 1)
    workers = int(cluster.get("gpus") or cluster.get("gpus_per_job") or cluster.get("n_workers") or 1)
    return max(1, cores // workers)


def loader_workers(cfg) -> int:
    """DataLoader worker processes per task: ``extract.num_workers``; ``auto`` = on a GPU every core the worker
    owns but one (which drives the GPU), at least 2, so that decoding keeps up with the device; on the CPU 0
    (decoding and the model share the same cores)."""
    setting = cfg.extract.num_workers
    if setting == "auto":
        return 0 if str(cfg.trainer.accelerator) == "cpu" else max(2, worker_cores(cfg) - 1)
    return int(setting)


@contextlib.contextmanager
def shard_log(run_dir: Path, shard: int):
    """A logger writing to ``logs/shard-NNNNN.log`` (appended: every attempt of the shard is kept)."""
    path = Path(run_dir) / "logs" / f"shard-{shard:05d}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(
        f"pipeline.runtime.shard.thread-{threading.get_ident()}"
    )  # one per thread: loggers are never freed
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


def _progress_reporter(topic: str | None, shard: int):
    """Per-batch progress of a shard, sent to the driver as a Dask event (nothing outside a Dask worker)."""
    if topic is None:
        return None
    try:
        worker = get_worker()
    except ValueError:
        return None
    return lambda done: worker.log_event(topic, dict(shard=int(shard), done=int(done)))


def make_trainer(cfg, callbacks: list, inference_mode: bool) -> pl.Trainer:
    """The Lightning Trainer of one task: one device (the worker's GPU, or the CPU), one process.

    The cluster environment is fixed to a single process, so that inside a SLURM allocation Lightning never
    reads SLURM's task variables as a multi-process world to join.
    """
    accelerator = str(cfg.trainer.accelerator)
    devices = 1 if accelerator == "cpu" else [worker_gpu(torch.cuda.device_count())]
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=cfg.trainer.precision,
        plugins=[LightningEnvironment()],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=inference_mode,
    )


def run_shard(
    cfg_dict: dict,
    run_dir: str,
    shard: int,
    rows: pd.DataFrame,
    classes: list[str],
    config_hash: str,
    progress_topic: str | None = None,
) -> dict:
    """Explain one shard's clips and publish its part file. Runs inside a Dask worker (or in-process).

    Per-clip problems become failure rows; anything else raises (Dask retries the task). With
    ``extract.fail_fast`` the first failed clip raises :class:`~pipeline.runtime.writer.ClipFailure`.
    """
    with shard_log(Path(run_dir), shard) as slog:
        started = time.perf_counter()
        slog.info("shard %d: %d clips, worker %s, pid %d", shard, len(rows), _worker_name(), os.getpid())
        try:
            result = _explain_shard(
                OmegaConf.create(cfg_dict), run_dir, shard, rows, classes, config_hash, progress_topic, slog
            )
        except BaseException as err:
            slog.error(
                "shard %d failed: %s: %s", shard, type(err).__name__, err, exc_info=not isinstance(err, ClipFailure)
            )
            raise
        result["seconds"] = round(time.perf_counter() - started, 3)
        slog.info(
            "shard %d done: %d rows, %d failures, %.2f s", shard, result["rows"], result["failures"], result["seconds"]
        )
        return result


def _worker_name() -> str:
    try:
        return str(get_worker().name)
    except ValueError:
        return "(driver)"


def _explain_shard(cfg, run_dir, shard, rows, classes, config_hash, progress_topic, slog) -> dict:
    torch.set_num_threads(torch_threads(cfg))
    quiet_lightning()
    module, loader, writer = shard_job(
        cfg, run_dir, shard, rows, classes, config_hash, progress=_progress_reporter(progress_topic, shard), log=slog
    )
    if loader is not None:
        trainer = make_trainer(cfg, [writer], inference_mode=not module.explainer.method.needs_grad)
        try:
            trainer.predict(module, loader, return_predictions=False)
        except BaseException:
            writer.abort()
            raise
    else:  # every clip was dropped before the loop: publish an empty part with the failures
        writer.on_predict_end(None, None)
    return dict(shard=shard, rows=writer.rows_written, clips=writer.clips_done, failures=len(writer.failures))


def quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning's own use of a deprecated torch API


def shard_job(
    cfg,
    run_dir,
    shard: int,
    rows: pd.DataFrame,
    classes: list[str],
    config_hash: str,
    *,
    rank: int | None = None,
    ranks: int = 1,
    progress=None,
    log=None,
) -> tuple[TubeModule, DataLoader | None, TubeWriter]:
    """The module, DataLoader (None when no clip is left to run) and writer that explain one shard.

    Clips a target cannot be chosen for (``target.mode=label`` without a label) are failures before the loop.
    ``rank``/``ranks``: this process's share of the shard under Lightning DDP.
    """
    explainer = build_explainer(cfg)
    rows = rows.reset_index(drop=True)
    rows_hash = shard_digest(rows)
    failures = []
    if cfg.target.mode == "label":
        unlabeled = rows["label"].isna()
        failures = (
            [
                dict(
                    clip_id=r.clip_id,
                    source=r.source,
                    stage="extract",
                    error_type="MissingLabel",
                    message=f"{r.clip_id}: target.mode=label but the clip has no label",
                )
                for r in rows[unlabeled].itertuples()
            ]
            if rank in (None, 0)
            else []
        )
        if failures and cfg.extract.fail_fast:
            raise ClipFailure(f"clip {failures[0]['clip_id']} failed (MissingLabel): {failures[0]['message']}")
        rows = rows[~unlabeled].reset_index(drop=True)
    labels = torch.tensor(rows["label"].fillna(-1).astype(int).to_numpy())
    module = TubeModule(
        explainer,
        cfg.model.input.mean,
        cfg.model.input.std,
        target=cfg.target.mode,
        k=cfg.target.k,
        codec=cfg.store.codec,
        labels=labels,
    )
    transform = ResizeCrop(int(cfg.model.input.short_side), tuple(cfg.model.input.size))
    num_workers = loader_workers(cfg)
    # pinned host memory on GPUs; Lightning then copies each batch to the device with non_blocking=True
    loader = DataLoader(
        ClipDataset(rows, transform),
        batch_size=int(cfg.extract.batch_size),
        num_workers=num_workers,
        prefetch_factor=int(cfg.extract.prefetch_factor) if num_workers else None,
        collate_fn=collate_clips,
        pin_memory=cfg.trainer.accelerator != "cpu",
    )
    writer = TubeWriter(
        run_dir,
        shard,
        rows,
        method=explainer.method.name,
        layer=explainer.layer_name,
        class_names=classes,
        metadata={"config_hash": config_hash, "shard_hash": rows_hash, "ranks": str(ranks)},
        failures=failures,
        progress=progress,
        fail_fast=bool(cfg.extract.fail_fast),
        log=log,
        rank=rank,
    )
    return module, (loader if len(rows) else None), writer
