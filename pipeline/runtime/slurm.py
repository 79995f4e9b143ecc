"""SLURM clusters (``cluster=slurm``): every SLURM job is one node's share of Dask workers, submitted by dask-jobqueue.

:func:`slurm` is the config option's target; :func:`lifetime_args` ends every worker before its job's walltime so
that a job reaching its walltime loses no shard; :func:`import_jobqueue` imports dask-jobqueue without losing this
process's Ctrl-C handling.
"""

from __future__ import annotations

import signal
import threading

import dask

from pipeline.errors import ConfigError
from pipeline.runtime.job import GPU


def slurm(jobs: int = 1, adapt_min: int | None = None, adapt_max: int | None = None, **job):
    """A dask-jobqueue SLURMCluster (see :func:`slurm_cluster`) with its jobs submitted.

    Args:
        jobs: jobs to start (when not adaptive).
        adapt_min, adapt_max: with ``adapt_max`` set, jobs come and go with the work (Dask ``adapt``).
        **job: what one job is, see :func:`slurm_cluster`.
    """
    cluster = slurm_cluster(**job)
    if adapt_max is not None:
        cluster.adapt(minimum_jobs=int(adapt_min or 0), maximum_jobs=int(adapt_max))
    else:
        cluster.scale(jobs=int(jobs))
    return cluster


def slurm_cluster(
    queue: str | None = None,
    account: str | None = None,
    walltime: str = "04:00:00",
    cores: int = 8,
    memory: str = "32GB",
    gpus_per_job: int = 0,
    job_extra_directives: list[str] = (),
    job_script_prologue: list[str] = (),
    log_directory: str | None = None,
    local_directory: str | None = None,
    interface: str | None = None,
    python: str | None = None,
    dashboard_address: str = ":0",
    worker_lifetime: str | None = "auto",
    lifetime_stagger: str | None = "auto",
):
    """A dask-jobqueue SLURMCluster with no job submitted yet: every SLURM job is one node's share of workers.

    Args:
        queue, account: the partition (``-p``) and account (``-A``).
        walltime: ``HH:MM:SS`` per job; a preempted or expired job's shards are retried elsewhere.
        cores, memory: per job (``--cpus-per-task``, ``--mem``); DataLoader workers use these cores.
        gpus_per_job: GPUs per job (``--gres=gpu:N``); the job then runs one worker per GPU with ``GPU=1``.
            With 0, one CPU worker per job.
        job_extra_directives: more ``#SBATCH`` lines, e.g. ``["--constraint=a100", "--qos=low"]``.
        job_script_prologue: shell lines run before the worker starts (``module load``, ``source venv``).
        log_directory: where SLURM writes the jobs' stdout/stderr (None: the current folder).
        local_directory: worker scratch space (node-local disk).
        interface: network interface of the workers and scheduler (e.g. ``ib0``).
        python: the worker's Python; default this one.
        dashboard_address: the scheduler's dashboard.
        worker_lifetime, lifetime_stagger: when the workers retire before the walltime, see
            :func:`lifetime_args`.
    """
    SLURMCluster = import_jobqueue().SLURMCluster

    gpus = int(gpus_per_job)
    directives = list(job_extra_directives) + ([f"--gres=gpu:{gpus}"] if gpus else [])
    return SLURMCluster(
        queue=queue,
        account=account,
        walltime=walltime,
        cores=int(cores),
        memory=memory,
        processes=gpus or 1,
        job_extra_directives=directives,
        # worker processes that may start DataLoader workers (Dask's are daemonic by default)
        job_script_prologue=["export DASK_DISTRIBUTED__WORKER__DAEMON=False", *job_script_prologue],
        worker_extra_args=(["--resources", f"{GPU}=1"] if gpus else [])
        + lifetime_args(walltime, worker_lifetime, lifetime_stagger),
        log_directory=log_directory,
        local_directory=local_directory,
        interface=interface,
        python=python,
        scheduler_options={"dashboard_address": dashboard_address},
    )


def walltime_seconds(walltime: str) -> int:
    """SLURM's time format in seconds: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.

    >>> walltime_seconds("04:00:00"), walltime_seconds("1-12"), walltime_seconds("90")
    (14400, 129600, 5400)
    """
    text = str(walltime).strip()
    try:
        days, _, clock = text.rpartition("-")
        parts = [int(p) for p in clock.split(":")]
        if days:  # D-HH[:MM[:SS]]
            h, m, sec = (parts + [0, 0])[:3]
            return int(days) * 86400 + h * 3600 + m * 60 + sec
        if len(parts) > 3:
            raise ValueError(text)
        m_or_h = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
        return m_or_h[0] * 3600 + m_or_h[1] * 60 + m_or_h[2]
    except (ValueError, KeyError):
        raise ConfigError(
            f"cluster.walltime must be SLURM's time format (HH:MM:SS, D-HH:MM:SS, or minutes), got {walltime!r}"
        ) from None


def lifetime_args(walltime: str, lifetime: str | None = "auto", stagger: str | None = "auto") -> list[str]:
    """The worker options that end every worker of a SLURM job before its walltime: Dask's ``--lifetime``
    and ``--lifetime-stagger`` (each worker retires at ``lifetime +/- stagger``, drawn at random, so that the
    workers of jobs started together do not all leave at once; an adaptive cluster submits jobs to replace them).

    ``auto`` lifetime: the walltime less a margin of a tenth of it, at least 1 and at most 15 minutes (at most
    half the walltime); ``auto`` stagger: a third of that margin, so every worker is gone at least two thirds of
    the margin before SLURM would kill it. ``null`` lifetime: workers stay until the job ends.

    >>> lifetime_args("04:00:00")
    ['--lifetime', '13500s', '--lifetime-stagger', '300s']
    >>> lifetime_args("00:10:00", "8m", "30s")
    ['--lifetime', '480s', '--lifetime-stagger', '30s']
    """
    if lifetime is None:
        return []
    total = walltime_seconds(walltime)
    margin = min(max(total / 10, 60), 900, total / 2)
    if str(lifetime) == "auto":
        seconds = total - margin
    else:
        seconds = _duration("cluster.worker_lifetime", lifetime)
    spread = (
        margin / 3
        if str(stagger) == "auto"
        else (0 if stagger is None else _duration("cluster.lifetime_stagger", stagger))
    )
    if not 0 < seconds + spread < total:
        raise ConfigError(
            f"cluster.worker_lifetime ({lifetime}) plus cluster.lifetime_stagger ({stagger}) must end before "
            f"cluster.walltime ({walltime}): {seconds:.0f} s + {spread:.0f} s, walltime {total} s"
        )
    return ["--lifetime", f"{seconds:.0f}s", "--lifetime-stagger", f"{spread:.0f}s"]


def _duration(name: str, value) -> float:
    try:
        return float(dask.utils.parse_timedelta(value, default="s"))
    except (ValueError, TypeError, KeyError):
        raise ConfigError(f"{name} must be 'auto', null or a duration like '230m' or '90s', got {value!r}") from None


def import_jobqueue():
    """``dask_jobqueue``, imported with this process's own Ctrl-C handling kept.

    Importing it installs a SIGINT handler (``sys.exit``), which Python allows only on the main thread: on any
    other thread the import raises ``ValueError: signal only works in main thread``. On the main thread the
    handler would replace the command's own (which stops the stage and closes the cluster), so it is put back.
    :meth:`pipeline.runtime.cluster.LazyClient.start_soon` imports it here, on the main thread, before starting the
    cluster on its own.
    """
    import sys

    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "dask_jobqueue must first be imported on the main thread (pipeline.runtime.slurm.import_jobqueue)"
        )
    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    finally:
        signal.signal(signal.SIGINT, previous)
    return dask_jobqueue
