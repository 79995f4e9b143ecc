"""Dask clusters from config: ``cluster=local`` (this machine), ``cluster=slurm`` (batch jobs), ``cluster=address``.

Each option of the ``cluster`` config group names its function in ``_target_``: :func:`pipeline.runtime.local.local`
(the workers of this machine), :func:`pipeline.runtime.slurm.slurm` (SLURM jobs) and :func:`address` (a running
scheduler); its other keys are that function's arguments. :func:`validate` checks them before any work starts,
:func:`open_client` starts (or joins) the cluster and prints the dashboard address.

GPUs: every worker that owns a GPU offers the Dask resource ``GPU=1`` (one worker process per GPU), and an
extract task that runs on a GPU asks for one, so two tasks never share a device. :func:`worker_gpu` tells a
task which of its node's GPUs belongs to the worker it runs on.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading

import dask
from dask.distributed import Client, LocalCluster
from hydra.utils import get_method
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline.errors import ConfigError, UserError
from pipeline.runtime import forkserver
from pipeline.runtime.local import close_workers, local
from pipeline.runtime.memory import MALLOC_TRIM_SETTING
from pipeline.runtime.slurm import import_jobqueue, lifetime_args, slurm, slurm_cluster

log = logging.getLogger(__name__)


def address(address: str) -> str:
    """A running Dask scheduler, e.g. ``tcp://host:8786`` (started with ``dask scheduler``)."""
    return address


def _settings(cfg) -> tuple[callable, dict]:
    """The cluster function named by ``cfg._target_`` and its keyword arguments, checked against its signature."""
    try:
        settings = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"cluster.{err.full_key.split('.')[-1]} must be set (e.g. cluster.address=tcp://host:8786)"
        ) from None
    target = settings.pop("_target_", None)
    try:
        fn = get_method(target)
    except Exception:
        raise ConfigError(
            f"cluster._target_={target!r} is not one of the cluster functions (pipeline.runtime.local.local, pipeline.runtime.slurm.slurm, pipeline.runtime.cluster.address)"
        ) from None
    signatures = [inspect.signature(fn)] + ([inspect.signature(slurm_cluster)] if fn is slurm else [])
    try:
        if fn is slurm:  # its **job are slurm_cluster's arguments
            signatures[1].bind(**{k: v for k, v in settings.items() if k not in ("jobs", "adapt_min", "adapt_max")})
        signatures[0].bind(**settings)
    except TypeError as err:
        known = ", ".join(name for sig in signatures for name in sig.parameters if name != "job")
        raise ConfigError(f"bad cluster option for {target}: {err} (options: {known})") from None
    return fn, settings


def validate(cfg) -> None:
    """Check the ``cluster`` config group before any work: known keys, sane values. Raises ValueError."""
    fn, settings = _settings(cfg)
    for key in ("n_workers", "threads_per_worker", "cores", "jobs"):
        if key not in settings or (key == "n_workers" and settings[key] == "auto"):
            continue
        try:
            valid = int(settings[key]) >= 1
        except (TypeError, ValueError):
            valid = False
        if not valid:
            allowed = "'auto' or >= 1" if key == "n_workers" else ">= 1"
            raise ConfigError(f"cluster.{key} must be {allowed}, got {settings[key]}")
    for key in ("gpus", "gpus_per_job", "adapt_min"):
        if settings.get(key) is not None and int(settings[key]) < 0:
            raise ConfigError(f"cluster.{key} must be >= 0, got {settings[key]}")
    if settings.get("adapt_max") is not None and int(settings["adapt_max"]) < int(settings.get("adapt_min") or 0):
        raise ConfigError(
            f"cluster.adapt_max ({settings['adapt_max']}) must be >= cluster.adapt_min ({settings['adapt_min']})"
        )
    if fn is slurm:
        lifetime_args(
            settings.get("walltime", "04:00:00"),
            settings.get("worker_lifetime", "auto"),
            settings.get("lifetime_stagger", "auto"),
        )
    if fn is address and "://" not in str(settings["address"]):
        raise ConfigError(
            f"cluster.address must be a scheduler address like tcp://host:8786, got {settings['address']!r}"
        )
    if "memory_limit" in settings and settings["memory_limit"] not in ("auto", None, 0):
        try:
            dask.utils.parse_bytes(settings["memory_limit"])
        except (ValueError, TypeError):
            raise ConfigError(
                f"cluster.memory_limit must be 'auto' or a size like '8GB', got {settings['memory_limit']!r}"
            ) from None


def is_local(cfg) -> bool:
    """Whether the ``cluster`` config group is a cluster on this machine (``local``)."""
    return _settings(cfg)[0] is local


def offers_gpus(cfg) -> bool:
    """Whether the configured cluster's workers offer the ``GPU`` resource (unknown for ``address``: assumed)."""
    _, settings = _settings(cfg)
    return int(settings.get("gpus", 0) or settings.get("gpus_per_job", 0) or 0) > 0 or "address" in settings


class LazyClient:
    """A Dask client that starts its cluster on first use: a stage that runs in-process never pays for one.

    Every attribute of :class:`dask.distributed.Client` is available; the first access starts the cluster
    (with the same settings as :func:`open_client`). :meth:`close` closes what was started, if anything.
    """

    def __init__(self, cfg):
        self._cfg, self._stack, self._starting, self._error = cfg, None, None, None

    @property
    def started(self) -> bool:
        return self._stack is not None or self._starting is not None

    def start_soon(self) -> None:
        """Start the cluster now on a thread of its own, while this one goes on (imports, model checks).

        SLURM clusters: dask-jobqueue is imported first, on this (main) thread (see :func:`import_jobqueue`);
        building the scheduler and submitting the jobs (``sbatch``) then happen on the background thread.

        Local worker processes must ignore Ctrl-C, which only this (main) thread can arrange: the forkserver they
        fork from is started here, ignoring SIGINT, and they inherit that. Local workers started by ``spawn``
        would not: that cluster starts on first use, as without this call.
        """
        if self.started:
            return
        fn, settings = _settings(self._cfg)
        if fn is slurm:
            import_jobqueue()  # here, on the main thread: see import_jobqueue
        if fn is local and settings.get("processes", True):
            if settings.get("start_method", "forkserver") != "forkserver":
                return
            forkserver.start()  # returns at once (or claims the server the command line started early)

        def start():
            try:
                self._open()
            except BaseException as err:  # raised where the client is first used
                self._error = err

        self._starting = threading.Thread(target=start, name="cluster-start", daemon=True)
        self._starting.start()

    def _open(self):
        stack = contextlib.ExitStack()
        self._real = stack.enter_context(open_client(self._cfg))
        self._stack = stack

    def _client(self):
        if self._starting is not None:
            self._starting.join()
            self._starting = None
            if self._error is not None:
                error, self._error = self._error, None
                raise error
        if self._stack is None:
            self._open()
        return self._real

    def __getattr__(self, name):
        return getattr(self._client(), name)

    def close(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None


@contextlib.contextmanager
def open_client(cfg, lazy: bool = False):
    """A Dask client for ``cfg`` (the ``cluster`` config group); a cluster started here is closed on exit.

    Worker processes are made non-daemonic so that a task may start DataLoader worker processes. With
    ``lazy``, a :class:`LazyClient`: the cluster starts only when a stage first uses it.
    """
    if lazy:
        client = LazyClient(cfg)
        try:
            yield client
        except Exception as err:
            real = client._stack is not None and client._real
            lost = real and scheduler_lost(real, err)
            if lost:
                raise lost from None
            raise
        finally:
            client.close()
        return
    fn, settings = _settings(cfg)
    with dask.config.set(
        {
            "distributed.worker.daemon": False,
            "distributed.admin.system-monitor.gil.enabled": False,
            # Dask's statistical profiler samples the task's stack 100 times a second on the worker's event loop:
            # half of a local worker's CPU outside its task, for a dashboard page a batch run has no use for
            "distributed.worker.profile.enabled": False,
            # every server's event loop wakes each tick (20 ms) to watch its own latency, and a nanny reads its worker's
            # memory from /proc every 100 ms: together half of the driver's CPU in steady extract (6% of a core on two
            # workers, 3% with these); a worker over its memory limit is still stopped within a second
            "distributed.admin.tick.interval": "1s",
            "distributed.worker.memory.monitor-interval": "1s",
            MALLOC_TRIM_SETTING: None,  # local workers start with glibc's own thresholds (see undo_malloc_trim)
        }
    ):
        with forkserver.children_ignore_sigint():
            made = fn(**settings)
        cluster = None if isinstance(made, str) else made
        client = connect(made)
        try:
            if isinstance(cluster, LocalCluster):
                log.info("Dask cluster: %d local worker(s)", len(cluster.workers))
            if client.dashboard_link:
                log.info("Dask dashboard: %s", client.dashboard_link)
            try:
                yield client
            except Exception as err:
                lost = scheduler_lost(client, err)
                if lost:
                    raise lost from None
                raise
        finally:
            client.close()
            if cluster is not None:
                close_workers(cluster)
                cluster.close()


class SchedulerLost(UserError):
    """The Dask scheduler went away during a stage (``cluster=address``: its process ended, its node was lost)."""


#: seconds to wait for a running scheduler (``cluster=address``) to answer before saying it does not
CONNECT_SECONDS = 30


def connect(cluster_or_address) -> Client:
    """A client of a cluster object, or of a running scheduler's address (one line naming it if none answers)."""
    if not isinstance(cluster_or_address, str):
        return Client(cluster_or_address)
    try:
        return Client(cluster_or_address, timeout=CONNECT_SECONDS)
    except (OSError, TimeoutError) as err:
        raise ConfigError(
            f"cluster.address={cluster_or_address}: no Dask scheduler answers there ({type(err).__name__}); "
            "start one (dask scheduler) or fix the address"
        ) from None


def scheduler_lost(client: Client, err: Exception) -> SchedulerLost | None:
    """What to say when ``err`` ended a stage because ``client``'s scheduler is gone (None when it still answers:
    ``err`` is then the stage's own). The client's own reconnection tracebacks are silenced: the one line says it."""
    if client.status == "running":
        try:
            client.scheduler_info()
            return None
        except Exception:
            pass
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    return SchedulerLost(
        f"lost the Dask scheduler at {client.scheduler.address} ({type(err).__name__}) during the stage; the "
        "shards finished are kept: start the scheduler again and rerun the same command to resume"
    )


def uses_ddp(cfg) -> bool:
    """Whether the extract stage runs as one Lightning DDP job over this node's devices instead of on Dask."""
    return str(cfg.trainer.get("strategy", "auto")).startswith("ddp")


def worker_gpu(device_count: int) -> int:
    """The GPU of the worker running the calling task: its slot on the node (the last number of its name).

    LocalCluster names workers 0, 1, ...; a SLURM job with N workers names them ``<job>-0 .. <job>-(N-1)``;
    both match the job's visible GPUs in order.
    """
    from dask.distributed import get_worker

    try:
        name = str(get_worker().name)
    except ValueError:  # not inside a Dask worker
        return 0
    slot = name.rsplit("-", 1)[-1]
    return int(slot) % max(device_count, 1) if slot.isdigit() else 0
