"""Run extract shards in the driver process when a cluster cannot pay off.

A Dask worker process pays for its own start and for importing torch and Lightning again (seconds on a small
machine, more than the tubes of a few hundred clips cost). ``extract.in_process=auto`` runs a CPU job whose
clips left to compute are at most :data:`AUTO_MAX_CLIPS` here instead: one shard after another, the same
:func:`~pipeline.runtime.shard.run_shard` a worker runs (same torch threads, so the same bytes), each shard
retried ``extract.retries`` times. What only a separate process gives is lost: a shard that kills its process
(a crash in native code) ends the run instead of becoming failure rows; rerunning resumes it as any killed run.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from pipeline.runtime.shard import run_shard

#: ``extract.in_process=auto``: at most this many clips left on the CPU run in the driver. On 2 cores a worker
#: process costs about as much CPU as this many clips of a small 3D CNN (``make bench BENCH=e2e``).
AUTO_MAX_CLIPS = 256


def wants_in_process(cfg, clips_left: int) -> bool:
    """Whether the stage runs its shards in this process (``extract.in_process``: auto, true or false)."""
    setting = cfg.extract.get("in_process", "auto")
    if setting == "auto":
        return str(cfg.trainer.accelerator) == "cpu" and clips_left <= AUTO_MAX_CLIPS
    return bool(setting)


def run_here(
    cfg_dict: dict,
    run_dir: str,
    todo: dict[int, pd.DataFrame],
    classes: list[str],
    config_hash: str,
    retries: int,
    on_done: Callable[[int, dict], None],
    on_failed: Callable[[int, BaseException], None],
) -> None:
    """Run every shard of ``todo`` here, in order; ``on_done(shard, result)`` or ``on_failed(shard, error)``
    after each (after its last attempt). ``on_failed`` may raise to stop the run (``extract.fail_fast``).
    The driver's torch thread count (a task sets ``extract.torch_threads``) is restored for the next stages."""
    threads = torch.get_num_threads()
    try:
        _run_all(cfg_dict, run_dir, todo, classes, config_hash, retries, on_done, on_failed)
    finally:
        torch.set_num_threads(threads)


def _run_all(cfg_dict, run_dir, todo, classes, config_hash, retries, on_done, on_failed) -> None:
    for shard, rows in todo.items():
        for attempt in range(retries + 1):
            try:
                result = run_shard(cfg_dict, run_dir, shard, rows, classes, config_hash)
            except Exception as err:  # Ctrl-C and SystemExit end the run, as they would a cluster's driver
                if attempt == retries:
                    on_failed(shard, err)
                continue
            on_done(shard, result)
            break
