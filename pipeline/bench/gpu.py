"""Feeding a GPU: clips/s of one extract task and the share of its wall time the device is busy, against the
rate at which the task's DataLoader alone decodes the same clips.

One extract task is what a Dask GPU worker runs per shard: the project's own ``shard_job`` (TubeModule,
DataLoader with ``extract.num_workers=auto``, TubeWriter) under the project's Lightning Trainer, over the
synthetic dataset (every split, 7 clips per video, 1,680 clips; ``--quick``: 120), ``method=cam``:

- ``r3d_18`` at 16 x 112 x 112 in ``bf16-mixed`` (random weights), and the demo model (8 x 64 x 64, fp32);
- **busy**: CUDA events recorded on the device's stream at the start and end of every ``predict_step`` (the
  forward, the tubes, their statistics), summed, over the wall time of ``Trainer.predict``; on the CPU the same
  callback times ``predict_step`` with the wall clock;
- **decode**: the same DataLoader iterated with nothing else to do: clips/s the task's decode processes reach.

Without CUDA the GPU rows say so and only the demo model runs, on the CPU. ``python -m pipeline.bench gpu``;
on one GPU with 16 cores it completes in a couple of minutes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

import pipeline.settings  # noqa: F401  (registers the settings schema Hydra composes with)
from pipeline.data.datasets.synthetic import SyntheticSpec, generate
from pipeline.runtime.builders import make_trainer, quiet_lightning
from pipeline.runtime.job import ShardJob
from pipeline.runtime.resolve import loader_workers
from pipeline.runtime.shard import shard_job
from pipeline.store import read_index

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


class BusyMeter(pl.Callback):
    """Seconds the device spends in ``predict_step`` (CUDA events on the stream; the wall clock on the CPU)."""

    def __init__(self, cuda: bool):
        self.cuda, self.pairs, self.wall = cuda, [], 0.0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs.append((self.start, end))
        else:
            self.wall += time.perf_counter() - self.start

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.pairs) / 1000
        return self.wall


def config(root: Path, data: Path, model: str, gpu: bool, extra: list[str] = ()):
    overrides = [
        f"paths.root={root}",
        f"run_name=gpu-{model}",
        f"dataset.root={data}",
        "dataset.generate_if_missing=false",
        "dataset.split=all",
        "sampler=uniform",
        "sampler.num_clips=7",
        f"model={model}",
        "model.checkpoint=null",
        "method=cam",
        "extract.batch_size=16" if gpu else "extract.batch_size=8",
        f"trainer.accelerator={'gpu' if gpu else 'cpu'}",
        "cluster.gpus=1" if gpu else "cluster.n_workers=1",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def index(cfg, limit: int):
    """The index stage over the dataset (once per model: clip length and stride differ), cut to ``limit`` clips."""
    from pipeline.__main__ import run as run_stages

    run_dir = Path(cfg.paths.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_stages(cfg_with_stage(cfg, "index"))
    rows, meta = read_index(run_dir)
    rows = rows.iloc[np.linspace(0, len(rows) - 1, min(limit, len(rows))).round().astype(int)]
    return rows.reset_index(drop=True), meta["classes"], run_dir


def cfg_with_stage(cfg, stage: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.stage = stage
    return cfg


def measure(cfg, rows, classes, run_dir: Path, cuda: bool) -> dict:
    """One task over ``rows``: clips/s, busy share, and the DataLoader's decode-only clips/s."""
    quiet_lightning()
    if not cuda:
        torch.set_num_threads(1)  # as the extract stage's default torch_threads
    module, loader, writer = shard_job(cfg, ShardJob(run_dir, 0, rows, classes, "bench"))
    started = time.perf_counter()
    clips = sum(len(batch.positions) for batch in loader)
    decode_rate = clips / (time.perf_counter() - started)
    warm, loader_warm, writer_warm = shard_job(
        cfg, ShardJob(run_dir, 0, rows.head(4 * loader.batch_size), classes, "bench")
    )
    trainer = make_trainer(cfg, [writer_warm], inference_mode=not warm.explainer.method.needs_grad)
    trainer.predict(warm, loader_warm, return_predictions=False)  # warm-up: cuDNN autotuning, first kernels
    meter = BusyMeter(cuda)  # before the writer: its end event is recorded before the batch's rows are written
    trainer = make_trainer(cfg, [meter, writer], inference_mode=not module.explainer.method.needs_grad)
    started = time.perf_counter()
    trainer.predict(module, loader, return_predictions=False)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    assert pq.ParquetFile(writer.path).metadata.num_rows == len(rows)
    return dict(
        clips=len(rows),
        loader_workers=loader_workers(cfg),
        clips_per_s=len(rows) / wall,
        busy=meter.seconds() / wall,
        decode_per_s=decode_rate,
    )


def run(out_dir: Path, quick: bool) -> str:
    root = Path(out_dir).resolve() / "gpu"
    data = generate(root / "data", SyntheticSpec(groups=2, clips_per_group=3) if quick else SyntheticSpec(), False)
    limit = 120 if quick else 1680
    cuda = torch.cuda.is_available()
    rows_md = []
    cases = [("r3d_18", ["trainer.precision=bf16-mixed"], "16x112x112 bf16"), ("demo", [], "8x64x64 fp32")]
    for model, extra, what in cases:
        if not cuda and model == "r3d_18":
            rows_md.append(f"| {model} {what} | GPU | skipped: no CUDA device here | | | | |")
            continue
        cfg = config(root, data, model, cuda, extra)
        rows, classes, run_dir = index(cfg, limit)
        r = measure(cfg, rows, classes, run_dir, cuda)
        device = "GPU" if cuda else "CPU (no CUDA: busy = predict_step's share of the wall)"
        rows_md.append(
            f"| {model} {what} | {device} | {r['clips']} | {r['loader_workers']} | {r['clips_per_s']:.0f} "
            f"| {r['busy']:.0%} | {r['decode_per_s']:.0f} ({r['clips_per_s'] / r['decode_per_s']:.2f}) |"
        )
        print(f"  {model}: {r}", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    return "\n".join(
        [
            "## Feeding a GPU (`gpu`)",
            "",
            f"One extract task (shard_job + Trainer.predict, `method=cam`, `extract.num_workers=auto`) on {name}, "
            f"{len(os.sched_getaffinity(0))} cores; busy = device time in predict_step / wall; decode = the same "
            "DataLoader alone (ratio: the task's clips/s over it).",
            "",
            "| model | device | clips | loader workers | clips/s | busy | decode clips/s (ratio) |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows_md,
            "",
        ]
    )
