"""Run extract shards in the driver process when a cluster cannot pay off.

A Dask worker process pays for its own start and for importing torch and Lightning again (seconds on a small
machine: more CPU than the tubes of a few hundred clips of a small 3D CNN). ``extract.in_process=auto`` runs a
CPU job whose clips left to compute are at most :data:`AUTO_MAX_CLIPS` in the driver instead: one shard after
another, the same task a worker runs (same torch threads, so the same bytes; the same retries). What only a
separate process gives is lost: a shard that kills its process (a crash in native code) ends the run instead
of becoming failure rows; rerunning resumes it as it resumes any killed run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.store.ledger import recorded

#: ``extract.in_process=auto``: at most this many clips left on the CPU run in the driver. On 2 cores the two
#: worker processes of the default cluster cost about as much CPU as this many clips (``make bench BENCH=e2e``).
AUTO_MAX_CLIPS = 256


def in_process_setting(cfg, stage: str):
    """``<stage>.in_process`` (index, extract, evaluate): ``"auto"``, True or False; any other value is one line
    naming it."""
    setting = cfg[stage].in_process
    if setting not in ("auto", True, False):
        raise ConfigError(f"{stage}.in_process must be auto, true or false, got {setting!r}")
    return setting


def wants_in_process(cfg, clips_left: int) -> bool:
    """Whether the stage runs its shards in this process (``extract.in_process``: auto, true or false)."""
    setting = in_process_setting(cfg, "extract")
    if setting == "auto":
        return str(cfg.trainer.accelerator) == "cpu" and clips_left <= AUTO_MAX_CLIPS
    return bool(setting)


def cluster_pays_off(cfg, run_dir: Path) -> bool:
    """Whether an extract stage about to start will run its shards on Dask workers, judged before anything
    heavy is imported: its index's clips less those the ledger records done (clips of adopted parts count as
    left). The command line then starts the cluster at once, in the background; the stage decides again on the
    exact count."""
    index = Path(run_dir) / "index.parquet"
    if not index.is_file():
        return False
    try:
        clips = pq.read_metadata(index).num_rows
    except (OSError, pa.ArrowException):  # the stage says what is wrong with it
        return False
    done = recorded(run_dir, "done").values()
    left = clips - sum(int(e.get("clips") or 0) for e in done if isinstance(e, dict))
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
