"""What every task builds from the config: the explainer (once per worker thread), the clip DataLoader, the
Lightning Trainer, and the thread and loader-process counts."""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings

import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.plugins.environments import LightningEnvironment
from torch.utils.data import DataLoader

from pipeline.data.clips import ClipDataset, collate_clips
from pipeline.data.video import ResizeCrop
from pipeline.explain.explainer import TubeExplainer
from pipeline.models import build_model
from pipeline.runtime.cluster import worker_gpu

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
    """Torch threads per task: ``extract.torch_threads``; ``auto`` = the cores of a machine (or SLURM job)
    divided by its workers."""
    setting = cfg.extract.torch_threads
    if setting != "auto":
        return int(setting)
    cluster = cfg.cluster
    cores = int(cluster.get("cores") or os.cpu_count() or 1)
    workers = int(cluster.get("gpus") or cluster.get("gpus_per_job") or cluster.get("n_workers") or 1)
    return max(1, cores // workers)


def loader_workers(cfg) -> int:
    """DataLoader worker processes per task: ``extract.num_workers``; ``auto`` = 2 on a GPU (decode while the
    model runs), 0 on the CPU (decoding and the model share the same cores)."""
    setting = cfg.extract.num_workers
    if setting == "auto":
        return 0 if str(cfg.trainer.accelerator) == "cpu" else 2
    return int(setting)


def clip_loader(cfg, rows: pd.DataFrame, batch_size: int) -> DataLoader:
    """The DataLoader that decodes ``rows``' clips at the model's input size, in ``rows`` order.

    Bad clips ride along as failures (:func:`~pipeline.data.clips.collate_clips`). On GPUs the batches are in
    pinned memory, so Lightning's copy to the device does not block.
    """
    workers = loader_workers(cfg)
    transform = ResizeCrop(int(cfg.model.input.short_side), tuple(cfg.model.input.size))
    return DataLoader(
        ClipDataset(rows, transform),
        batch_size=batch_size,
        num_workers=workers,
        prefetch_factor=int(cfg.extract.prefetch_factor) if workers else None,
        collate_fn=collate_clips,
        pin_memory=str(cfg.trainer.accelerator) != "cpu",
    )


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


def quiet_lightning() -> None:
    """Lightning's info lines (devices, precision) are noise once per shard; warnings still show."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning's own use of a deprecated torch API
