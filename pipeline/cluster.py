"""Dask clusters from config: ``cluster=local`` starts a LocalCluster, ``cluster=address`` joins one."""

from __future__ import annotations

import contextlib
import logging

import dask
from dask.distributed import Client, LocalCluster

log = logging.getLogger(__name__)


@contextlib.contextmanager
def open_client(cfg):
    """A Dask client for ``cfg`` (the ``cluster`` config group); the cluster is closed on exit.

    Worker processes are made non-daemonic so that a task may start DataLoader worker processes.
    """
    kind = cfg.get("kind", "local")
    with dask.config.set({"distributed.worker.daemon": False, "distributed.admin.system-monitor.gil.enabled": False}):
        if kind == "local":
            cluster = LocalCluster(
                n_workers=int(cfg.n_workers),
                threads_per_worker=int(cfg.threads_per_worker),
                processes=bool(cfg.processes),
                memory_limit=cfg.memory_limit,
                dashboard_address=cfg.dashboard_address,
                silence_logs=logging.WARNING,
            )
            client = Client(cluster)
        elif kind == "address":
            cluster, client = None, Client(cfg.address)
        else:
            raise ValueError(f"cluster.kind must be 'local' or 'address', got {kind!r}")
        try:
            if client.dashboard_link:
                log.info("Dask dashboard: %s", client.dashboard_link)
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
