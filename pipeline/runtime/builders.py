"""What every task builds from the config: the explainer (once per worker thread), the clip DataLoader, the
Lightning Trainer, and the thread and loader-process counts."""

from __future__ import annotations

import json
import logging
import threading
import warnings

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from pipeline.data.clips import ClipDataset, collate_clips
from pipeline.data.resize import ResizeCrop
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.fusion import explainer_options
from pipeline.models import build_model
from pipeline.models.adapters import adapt
from pipeline.runtime.cluster import worker_gpu
from pipeline.runtime.resolve import loader_workers, prefetch_factor

_cache = threading.local()


def make_explainer(cfg, model_cfg=None) -> TubeExplainer:
    """The explainer of ``cfg.method`` for ``cfg.model`` (or ``model_cfg``): the network built, its weights
    loaded and seen through the model's interface settings."""
    model_cfg = cfg.model if model_cfg is None else model_cfg
    net = adapt(build_model(model_cfg), model_cfg)  # (N, 3, T, H, W) in, (N, K) logits out
    return TubeExplainer(
        net,
        input_shape=(3, model_cfg.input.clip_len, *model_cfg.input.size),
        **explainer_options(instantiate(cfg.method), model_cfg.layer),
        classifier=model_cfg.classifier,
        layout=model_cfg.get("layout", "auto"),
        grid=model_cfg.get("grid"),
        token_order=model_cfg.get("token_order"),
    )


def build_explainer(cfg, model_cfg=None) -> TubeExplainer:
    """:func:`make_explainer`, built once per thread.

    A worker reuses it for every shard. It is kept per thread because hooks capture activations on the
    model's own modules: two threads of one process (``cluster.processes=false``) must not share a model.
    """
    model_cfg = cfg.model if model_cfg is None else model_cfg
    key = json.dumps(
        [OmegaConf.to_container(model_cfg, resolve=True), OmegaConf.to_container(cfg.method, resolve=True)]
    )
    if getattr(_cache, "key", None) != key:
        _cache.explainer = make_explainer(cfg, model_cfg)
        _cache.key = key
    return _cache.explainer


def clip_transform(cfg) -> ResizeCrop:
    """The resize / crop to ``cfg.model.input``."""
    return ResizeCrop(int(cfg.model.input.short_side), tuple(cfg.model.input.size))


def clip_loader(cfg, rows: pd.DataFrame, batch_size: int, raw: bool = False) -> DataLoader:
    """The DataLoader that decodes ``rows``' clips at the model's input size, in ``rows`` order.

    Bad clips ride along as failures (:func:`~pipeline.data.clips.collate_clips`). With ``raw`` the batches
    carry the decoded uint8 frames, for the model's device to resize (:func:`resize_on_device`). On GPUs the
    batches are in pinned memory, so Lightning's copy to the device does not block.
    """
    workers = loader_workers(cfg)
    return DataLoader(
        ClipDataset(rows, clip_transform(cfg), raw=raw),
        batch_size=batch_size,
        num_workers=workers,
        prefetch_factor=prefetch_factor(cfg, workers),
        collate_fn=collate_clips,
        pin_memory=str(cfg.trainer.accelerator) != "cpu",
    )


def make_trainer(cfg, callbacks: list, inference_mode: bool):
    """The Lightning Trainer of one task: one device (the worker's GPU, or the CPU), one process, ``callbacks``.

    The cluster environment is fixed to a single process, so that inside a SLURM allocation Lightning never
    reads SLURM's task variables as a multi-process world to join. Lightning is imported here, by the tasks:
    a driver that only checks the model and hands shards to Dask workers never pays for it.

    Built once per thread and reused for every shard with the same trainer settings, with its callbacks set anew:
    building one costs about 6 ms (Lightning looks through every installed package's entry points for callbacks
    of its own), 2% of a 32-clip shard of small clips. :func:`forget_trainer` drops it after a failed run.
    """
    accelerator = str(cfg.trainer.accelerator)
    devices = 1 if accelerator == "cpu" else [worker_gpu(torch.cuda.device_count())]
    key = (accelerator, str(devices), str(cfg.trainer.precision), bool(inference_mode))
    if getattr(_cache, "trainer_key", None) != key:
        import pytorch_lightning as pl
        from pytorch_lightning.plugins.environments import LightningEnvironment

        _cache.trainer = pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            precision=cfg.trainer.precision,
            plugins=[LightningEnvironment()],
            callbacks=[],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=inference_mode,
        )
        _cache.trainer_key, _cache.trainer_callbacks = key, list(_cache.trainer.callbacks)  # Lightning's own
    _cache.trainer.callbacks = [*callbacks, *_cache.trainer_callbacks]
    return _cache.trainer


def forget_trainer() -> None:
    """Build the next :func:`make_trainer` of this thread afresh (after a run that raised: its state is unknown)."""
    _cache.trainer_key = None


#: Lightning's warning on any machine with SLURM installed (every login and compute node): each ``fit`` /
#: ``predict`` looks for an HPC-resume checkpoint by probing ``SLURMEnvironment.detect()``, which warns when
#: ``srun`` is on the PATH but the process was not started by it, whatever cluster environment the Trainer was
#: given. The pipeline's Trainers never need ``srun``: each is one process on one device (a Dask task, an array
#: task) or the pipeline's own DDP launcher, with the cluster environment fixed (:func:`make_trainer`).
SRUN_WARNING = r"The `srun` command is available on your system but is not used"


def quiet_lightning() -> None:
    """Lightning's info lines (devices, precision) are noise once per shard; warnings still show, but for two
    false alarms of Lightning's own: its use of a deprecated torch API, and :data:`SRUN_WARNING`."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning's own use of a deprecated torch API
    warnings.filterwarnings("ignore", message=SRUN_WARNING)
