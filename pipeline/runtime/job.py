"""The records that cross the runtime: a shard's job (what the driver sends a task) and its result. A leaf: it
imports nothing of the project."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas costs the command line 0.3 s before it can start the cluster
    import pandas as pd
    import torch

#: ``target.mode``: which class each clip's tube explains (predicted, labelled, or the k best)
TARGET_MODES = ("pred", "label", "topk")

#: the Dask resource a GPU worker offers and a GPU task asks for
GPU = "GPU"


@dataclass
class ShardJob:
    """One unit of extract work: the clips of one shard of the index, and where their part file goes.

    Args:
        run_dir: ``outputs/<run_name>``.
        shard: the shard number (names the part file and the log).
        rows: the shard's index rows.
        classes: the class names the tube rows use (index = class).
        config_hash: the run's fingerprint, stored in the part file's metadata.
        rank, ranks: under Lightning DDP, this process's rank and the number of ranks sharing the shard
            (``rank=None``: the whole shard).
        progress_topic: the Dask event topic per-batch progress is sent to (None: no progress events).
    """

    run_dir: Path
    shard: int
    rows: pd.DataFrame
    classes: list[str]
    config_hash: str
    rank: int | None = None
    ranks: int = 1
    progress_topic: str | None = None


class StopShard(RuntimeError):
    """Raised inside a shard's work to end the task at once, without retries (``extract.fail_fast``)."""


@dataclass
class ShardResult:
    """How a shard task ended. ``error`` is set when every attempt failed (its type in ``error_type``);
    ``stop`` when the run must stop at once (``extract.fail_fast``); ``bytes`` is the size of what it published."""

    shard: int
    rows: int = 0
    clips: int = 0
    failures: int = 0
    seconds: float = 0.0
    bytes: int | None = None
    attempts: int = 1
    error: str | None = None
    error_type: str | None = None
    stop: bool = False


@dataclass
class Prediction:
    """What ``predict_step`` hands the writer for one batch: ``n`` decoded clips x ``k`` targets, on the CPU.

    ``positions`` index the shard's rows; ``failures`` are ``(position, error_type, message)`` of the batch's
    clips that could not be decoded. ``tubes`` hold the stored (encoded) values, ``scale`` their codec scale,
    ``stats`` the per-clip statistics of :func:`~pipeline.explain.clipstats.clip_statistics` (``n * k`` rows).
    Every tensor field is None when no clip of the batch could be decoded.
    """

    positions: torch.Tensor  # (n,)
    failures: list[tuple[int, str, str]]
    crop_box: torch.Tensor | None = None  # (n, 4)
    input_size: tuple[int, int, int] | None = None
    targets: torch.Tensor | None = None  # (n, k)
    target_logit: torch.Tensor | None = None  # (n, k)
    target_prob: torch.Tensor | None = None  # (n, k)
    pred: torch.Tensor | None = None  # (n,)
    pred_prob: torch.Tensor | None = None  # (n,)
    tubes: torch.Tensor | None = None  # (n, k, t, h, w)
    scale: torch.Tensor | None = None  # (n, k)
    stats: dict[str, torch.Tensor] | None = None
    #: method=fusion: ``(stored, scale)`` of each fused layer's own tube (``(n, k, t, h, w)``, ``(n, k)``)
    layer_tubes: list[tuple[torch.Tensor, torch.Tensor]] | None = None
