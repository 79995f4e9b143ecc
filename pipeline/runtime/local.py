"""The Dask workers of this machine (``cluster=local``): how many, how their processes start, and the threads
of the driver that stand in for them where starting processes would cost more than the work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import dask
import psutil
from dask.distributed import Client, LocalCluster

from pipeline.errors import ConfigError
from pipeline.runtime import forkserver
from pipeline.runtime.job import GPU

#: ``cluster.n_workers=auto`` gives every worker at least this much of the machine's memory (a worker holds
#: torch, the model and a few batches of clips: about 0.7 GB with the demo model)
AUTO_WORKER_MEMORY = 2 * 2**30


def local_workers(setting) -> int:
    """Worker count of a local cluster: ``cluster.n_workers``; ``auto`` = one per CPU core this process may use,
    at most one per :data:`AUTO_WORKER_MEMORY` of memory (each runs one task on one torch thread)."""
    if str(setting) != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, psutil.virtual_memory().total // AUTO_WORKER_MEMORY))


def local(
    n_workers: int | str = "auto",
    threads_per_worker: int = 1,
    processes: bool = True,
    memory_limit="auto",
    dashboard_address: str = ":0",
    gpus: int = 0,
    start_method: str = "forkserver",
) -> LocalCluster:
    """A Dask LocalCluster on this machine.

    Args:
        n_workers: worker processes (or threads, with ``processes=false``) when ``gpus`` is 0; ``auto``: see
            :func:`local_workers`.
        threads_per_worker: tasks a worker runs at once.
        processes: worker processes (true) or threads of this process (false).
        memory_limit: per worker, e.g. ``"8GB"``; ``auto`` divides the machine's memory.
        dashboard_address: ``":8787"``, or ``":0"`` for a free port.
        gpus: when > 0, one worker per GPU (``n_workers`` is ignored), each offering ``GPU=1``.
        start_method: how worker processes start: ``forkserver`` (see :func:`worker_start`) or ``spawn``.
    """
    gpus = int(gpus)
    with worker_start(start_method):
        return LocalCluster(
            n_workers=gpus or local_workers(n_workers),
            threads_per_worker=1 if gpus else int(threads_per_worker),
            processes=bool(processes),
            memory_limit=memory_limit,
            dashboard_address=dashboard_address,
            resources={GPU: 1} if gpus else None,
            silence_logs=logging.WARNING,
        )


@contextlib.contextmanager
def worker_start(method: str):
    """Worker processes started meanwhile by ``method``. With ``forkserver``, every worker forks from one server
    process that imported torch and Lightning once (:mod:`pipeline.runtime.forkserver`); the server is a fresh
    process (no threads of this one), so forking it is safe."""
    if method not in ("forkserver", "spawn"):
        raise ConfigError(f"cluster.start_method must be forkserver or spawn, got {method!r}")
    with dask.config.set({"distributed.worker.multiprocessing-method": method}):
        if method == "forkserver":
            forkserver.start()
        yield


@contextlib.contextmanager
def driver_threads(threads: int):
    """A client of ``threads`` Dask worker threads in this process: nothing to start (a few hundredths of a
    second where worker processes take seconds), for tasks made of torch operations, which release the GIL."""
    with (
        LocalCluster(n_workers=threads, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


#: seconds a local worker process may take to exit before its nanny kills it (Dask's own default: 4 s, which a
#: worker that has imported torch and Lightning can overrun on a busy machine, and the nanny then warns)
WORKER_EXIT_SECONDS = 30


def close_workers(cluster) -> None:
    """Let a local cluster's worker processes exit on their own, with time to spare, before the cluster closes."""
    if not isinstance(cluster, LocalCluster):
        return

    async def close_all():
        await asyncio.gather(*(worker.close(timeout=WORKER_EXIT_SECONDS) for worker in list(cluster.workers.values())))

    cluster.sync(close_all)
