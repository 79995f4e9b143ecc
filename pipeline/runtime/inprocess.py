"""Run extract shards in the driver process when a cluster cannot pay off.

A Dask worker process pays for its own start and for importing torch and Lightning again (seconds on a small
machine: more CPU than the tubes of a few hundred clips of a small 3D CNN). The extract stage runs a CPU job
whose clips left to compute are at most :data:`AUTO_MAX_CLIPS` in the driver instead (``execution=auto``): one
shard after another, the same task a worker runs (same torch threads, so the same bytes; the same retries). A
command line that started the workers' forkserver at its first line (:mod:`pipeline.runtime.forkserver`) has had
the workers' imports made meanwhile, on a core the driver left idle, so its cluster pays off from a handful of
clips on (:data:`EARLY_MAX_CLIPS`). What only a separate process gives is lost in the driver: a shard that kills
its process (a crash in native code) ends the run instead of becoming failure rows; rerunning resumes it as it
resumes any killed run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.runtime import forkserver
from pipeline.store.ledger import read_ledger
from pipeline.store.run_dir import RunDir

#: ``execution=auto``: at most this many clips left on the CPU run in the driver. On 2 cores the two
#: worker processes of the default cluster cost about as much CPU as this many clips (``make bench BENCH=e2e``).
AUTO_MAX_CLIPS = 256
#: the same, when the command line started the forkserver early: from the command line on 2 cores, a random
#: DemoNet3D of width 48 on 16x64x64 clips took 6.6-7.1 s on the cluster against 7.1-7.4 s in the driver for 20
#: clips, 7.6-8.1 s against 9.3-10.8 s for 100 and 10.0-11.2 s against 14.0-14.8 s for 240 (alternating pairs)
EARLY_MAX_CLIPS = 16


def in_process_setting(cfg):
    """``execution`` as a stage asks it: ``"auto"``, True (``driver``: in this process) or False (``cluster``)."""
    setting = cfg.get("execution", "auto")
    if setting not in ("auto", "driver", "cluster"):
        raise ConfigError(f"execution must be auto, driver or cluster, got {setting!r}")
    return {"auto": "auto", "driver": True, "cluster": False}[setting]


def wants_in_process(cfg, clips_left: int) -> bool:
    """Whether the extract stage runs its shards in this process (``execution``). ``auto`` never does on a
    cluster the command names (``cluster=slurm``, ``cluster=address``): the driver may be a login node, and the
    user asked for those workers."""
    from pipeline.runtime.cluster import is_local

    setting = in_process_setting(cfg)
    if setting == "auto":
        most = EARLY_MAX_CLIPS if forkserver.started_early() else AUTO_MAX_CLIPS
        return str(cfg.trainer.accelerator) == "cpu" and clips_left <= most and is_local(cfg.cluster)
    return bool(setting)


def cluster_pays_off(cfg, run_dir: Path) -> bool:
    """Whether an extract stage about to start will run its shards on Dask workers, judged before anything
    heavy is imported: its index's clips less those the ledger records done (clips of adopted parts count as
    left). The command line then starts the cluster at once, in the background; the stage decides again on the
    exact count."""
    index = RunDir(run_dir).index
    if not index.is_file():
        return False
    try:
        clips = pq.read_metadata(index).num_rows
    except (OSError, pa.ArrowException):  # the stage says what is wrong with it
        return False
    done = read_ledger(run_dir, "extract", "done").values()
    left = clips - sum(entry.clips for entry in done)
    return left > 0 and not wants_in_process(cfg, left)


@contextlib.contextmanager
def in_this_process():
    """Around shards run in the driver: a task sets ``extract.torch_threads``; the next stages get the driver's
    own count back."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
