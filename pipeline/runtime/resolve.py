"""The ``auto`` settings of the sharded stages' tasks, resolved once in the driver into what a task needs
(:func:`task_config`): a task never reads the cluster's configuration, and every worker of a run gets the same
numbers; a task turns that dict back into a config with :func:`config_of_task`. Light: nothing here imports torch."""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import threading

from omegaconf import OmegaConf

from pipeline.runtime.local import local_workers


def task_config(cfg) -> dict:
    """The resolved configuration a task is sent: ``extract.torch_threads``, ``num_workers``,
    ``prefetch_factor`` and ``resize`` as numbers and names instead of ``auto``, and no ``cluster`` section."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    extract = resolved["extract"]
    workers = loader_workers(cfg)
    extract.update(
        torch_threads=torch_threads(cfg),
        num_workers=workers,
        prefetch_factor=prefetch_factor(cfg, workers) or 1,
        resize="device" if resize_on_device(cfg) else "loader",
    )
    resolved.pop("cluster", None)
    return resolved


_configs = threading.local()


def config_of_task(cfg_dict: dict):
    """The config of a task sent ``cfg_dict`` (:func:`task_config`), built once per thread and reused while the
    dict stays the same (building one costs 4-6 ms, about 2% of a 32-clip extract shard of small clips).

    Per thread, from a copy of the dict: in the driver (``execution=driver`` or ``auto``) every task is handed the
    same dict, and configs built on shared values failed at random ("'NoneType' object has no attribute
    '_invalidate_flags_cache'" reading model.input.std).
    """
    key = hashlib.sha1(pickle.dumps(cfg_dict)).digest()
    if getattr(_configs, "key", None) != key:
        _configs.cfg, _configs.key = OmegaConf.create(copy.deepcopy(cfg_dict)), key
    return _configs.cfg


def worker_cores(cfg) -> int:
    """The CPU cores one Dask worker owns: the machine's (or the SLURM job's ``cluster.cores``) over its workers
    (one per GPU on GPUs)."""
    cluster = cfg.cluster
    cores = int(cluster.get("cores") or len(os.sched_getaffinity(0)) or 1)
    workers = int(cluster.get("gpus") or cluster.get("gpus_per_job") or local_workers(cluster.get("n_workers") or 1))
    return max(1, cores // workers)


def torch_threads(cfg) -> int:
    """Torch threads per task: ``extract.torch_threads``; ``auto`` = the cores its worker owns."""
    setting = cfg.extract.torch_threads
    return int(setting) if setting != "auto" else worker_cores(cfg)


def loader_workers(cfg) -> int:
    """DataLoader worker processes per task: ``extract.num_workers``; ``auto`` = on a GPU every core the worker
    owns but one (which drives the GPU), at least 2, so that decoding keeps up with the device; on the CPU 0
    (decoding and the model share the same cores)."""
    setting = cfg.extract.num_workers
    if setting == "auto":
        return 0 if str(cfg.trainer.accelerator) == "cpu" else max(2, worker_cores(cfg) - 1)
    return int(setting)


#: batches in flight across a task's DataLoader workers with ``extract.prefetch_factor=auto``
PREFETCH_BATCHES = 8


def prefetch_factor(cfg, workers: int) -> int | None:
    """Batches each DataLoader worker decodes ahead: ``extract.prefetch_factor``; ``auto`` = at least 2 per
    worker and :data:`PREFETCH_BATCHES` in all, so a device never waits on a burst of slow clips."""
    if not workers:
        return None
    setting = cfg.extract.prefetch_factor
    return int(setting) if setting != "auto" else max(2, -(-PREFETCH_BATCHES // workers))


def resize_on_device(cfg) -> bool:
    """Whether clips are resized on the model's device: ``extract.resize``; ``auto`` = on GPUs, where the
    loader then pins and copies uint8 frames (a quarter of float32's bytes) and the resize leaves its cores."""
    setting = str(cfg.extract.resize)
    return setting == "device" or (setting == "auto" and str(cfg.trainer.accelerator) != "cpu")
