"""The host's cost per clip, split by part, with a model that costs nothing: what a GPU node's CPU must do per clip.

One process, one thread (``torch.set_num_threads(1)``), the project's own ``shard_job`` (ClipDataset, TubeModule,
TubeWriter) over synthetic 16 x 112 x 112 clips, ``method=cam``, with :class:`PoolNet` (a strided view of the input
as the 5-D layer CAM explains, then a linear head): the model's own time is next to nothing, so what is left is the
host's work. Parts, in ms per clip, by where they run on a GPU node:

- in the decode processes (the DataLoader's workers):
  - **decode**: ``ClipDataset[i]`` (PyAV decode of the clip's frames + resize / crop);
  - **collate**: ``collate_clips`` (a DataLoader worker collates its own batch);
- in the process that drives the GPU, on its device (here on the CPU, as a CPU-only run does them):
  - **explain**: ``TubeModule.predict_step`` less its statistics (normalisation, forward, tube, codec, upsampling);
  - **statistics**: ``pipeline.explain.clipstats.clip_statistics``;
- in the process that drives the GPU, on its CPU:
  - **transfer**: pin and copy to the device (none without CUDA);
  - **encode + write**: ``TubeWriter.write_on_batch_end`` (the rows' table, Parquet row groups) and its publish;
  - **loop**: Lightning's ``Trainer.predict`` over the same clips (``num_workers=0``), less all of the above (each
    pass is made twice, alternating, and the faster of each kept).

*Beyond decode* is every part but decode and collate: what one process adds to each clip, and all of it where the
device is this CPU. The feed rate of one GPU with N decode processes is ``min(N / (decode + collate), 1 / driver)``
clips/s, where ``driver`` is the driving process's own CPU work (transfer, encode + write, loop) on a GPU node, or
all of beyond decode here. ``python -m pipeline.bench host``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import pipeline.settings  # noqa: F401  (registers the settings schema Hydra composes with)
from pipeline.data.clips import collate_clips
from pipeline.data.datasets.synthetic import SyntheticSpec, generate

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
#: the parts, by where they run on a GPU node: the decode processes, the device, the driving process's CPU
LOADER, DEVICE, DRIVER = ("decode", "collate"), ("explain", "statistics"), ("transfer", "encode + write", "loop")
PARTS = (*LOADER, *DEVICE, *DRIVER)
PROCESSES = (1, 2, 4, 8, 16)
#: passes of each kind (part by part, and Lightning's loop) in one measurement
ROUNDS = 2


class Subsample(nn.Module):
    """Every ``stride``-th pixel of each frame, from the middle of its cell: a view, no arithmetic."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.stride // 2 :: self.stride, self.stride // 2 :: self.stride]


class PoolNet(nn.Module):
    """A network that costs nothing: ``(N, 3, T, 112, 112)`` subsampled to ``(N, 3, T, 7, 7)`` (the explained 5-D
    layer ``features``: a strided view), its mean over the rest, then ``Linear(3, num_classes)``. Its forward takes
    about 0.01 ms a clip on one core, so the bench measures the host, not a model."""

    def __init__(self, num_classes: int = 4, stride: int = 16):
        super().__init__()
        self.features = Subsample(stride)
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3, 4)))


def config(root: Path, data: Path):
    overrides = [
        f"paths.root={root}",
        "run_name=host",
        f"dataset.root={data}",
        "dataset.generate_if_missing=false",
        "dataset.split=all",
        "sampler=uniform",
        "sampler.num_clips=4",
        "model=demo",
        "model.checkpoint=null",
        "model.net._target_=pipeline.bench.host.PoolNet",
        "~model.net.width",
        "model.input.clip_len=16",
        "model.input.frame_stride=1",
        "model.input.short_side=112",
        "model.input.size=[112,112]",
        "method=cam",
        "extract.num_workers=0",
        "trainer.accelerator=cpu",
        "cluster.n_workers=1",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def measure(cfg, rows, classes, run_dir: Path) -> dict[str, float]:
    """Seconds per part over ``rows`` (see the module docstring), and the clip count."""
    import pipeline.runtime.module as module_mod
    from pipeline.runtime.builders import make_trainer, quiet_lightning
    from pipeline.runtime.job import ShardJob
    from pipeline.runtime.shard import shard_job

    quiet_lightning()
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    seconds: dict[str, float] = {}
    original = module_mod.clip_statistics

    def timed_stats(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        seconds["statistics"] += time.perf_counter() - started
        return out

    def loop() -> float:
        module, loader, writer = shard_job(cfg, ShardJob(run_dir, 0, rows, classes, "bench"))
        trainer = make_trainer(cfg, [writer], inference_mode=True)
        started = time.perf_counter()
        trainer.predict(module, loader, return_predictions=False)
        return time.perf_counter() - started

    def parts() -> dict[str, float]:
        """One pass part by part; ``statistics`` is counted by the patched ``clip_statistics``."""
        seconds.update(dict.fromkeys(PARTS, 0.0))
        module, loader, writer = shard_job(cfg, ShardJob(run_dir, 0, rows, classes, "bench"))
        dataset, size = loader.dataset, loader.batch_size
        module_mod.clip_statistics = timed_stats
        try:
            with torch.inference_mode():
                for b, first in enumerate(range(0, len(dataset), size)):  # batch by batch, as the loop holds them
                    started = time.perf_counter()
                    items = [dataset[i] for i in range(first, min(first + size, len(dataset)))]
                    t0 = time.perf_counter()
                    batch = collate_clips(items)
                    tc = time.perf_counter()
                    if cuda:
                        batch.video = batch.video.pin_memory().to("cuda", non_blocking=True)
                    t1 = time.perf_counter()
                    prediction = module.predict_step(batch, b)
                    t2 = time.perf_counter()
                    writer.write_on_batch_end(None, module, prediction, None, batch, b)
                    t3 = time.perf_counter()
                    seconds["decode"] += t0 - started
                    seconds["collate"] += tc - t0
                    seconds["transfer"] += t1 - tc
                    seconds["explain"] += t2 - t1
                    seconds["encode + write"] += t3 - t2
                t0 = time.perf_counter()
                writer.on_predict_end(None, module)
                seconds["encode + write"] += time.perf_counter() - t0
        finally:
            module_mod.clip_statistics = original
        seconds["explain"] -= seconds["statistics"]
        return dict(seconds)

    loop()  # warm-up: first calls of every part
    # the loop's own share is the difference of two walls of seconds each: both are taken ROUNDS times, alternating,
    # and the fastest of each kept, so that a slow moment of a shared machine does not land in one of them
    passes, walls = [], []
    for _ in range(ROUNDS):
        passes.append(parts())
        walls.append(loop())
    best = min(passes, key=lambda p: sum(p.values()))
    wall = min(walls)
    best["loop"] = max(wall - sum(best.values()), 0.0)
    return dict(best, clips=len(rows), wall=wall)


def table(r: dict, cuda: bool) -> tuple[list[str], list[str]]:
    """The parts' rows (ms per clip) and the feed rows (clips/s per N decode processes)."""
    ms = {part: 1000 * r[part] / r["clips"] for part in PARTS}
    loader = sum(ms[p] for p in LOADER)
    beyond = sum(ms.values()) - loader
    driver = sum(ms[p] for p in DRIVER) if cuda else beyond
    parts = [f"| {part} | {where} | {ms[part]:.2f} |" for group, where in (
        (LOADER, "decode processes"), (DEVICE, "device (here the CPU)"), (DRIVER, "driving process")
    ) for part in group]  # fmt: skip
    parts += [
        f"| **beyond decode** | one process | **{beyond:.2f}** |",
        f"| of which the driving process's own CPU work | | **{sum(ms[p] for p in DRIVER):.2f}** |",
        f"| **all** | | **{sum(ms.values()):.2f}** |",
    ]
    feed = [f"| {n} | {min(1000 * n / loader, 1000 / driver):.0f} |" for n in PROCESSES]
    return parts, feed


def run(out_dir: Path, quick: bool) -> str:
    from pipeline.bench.gpu import cfg_with_stage

    root = Path(out_dir).resolve() / "host"
    spec = SyntheticSpec(groups=2 if quick else 10, clips_per_group=2 if quick else 6, width=150, height=112)
    data = generate(root / "data", spec, False)
    cfg = config(root, data)
    from pipeline.__main__ import run as run_stages
    from pipeline.store import read_index

    run_dir = Path(cfg.paths.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_stages(cfg_with_stage(cfg, "index"))
    rows, meta = read_index(run_dir)
    limit = 48 if quick else 480
    rows = rows.iloc[np.linspace(0, len(rows) - 1, min(limit, len(rows))).round().astype(int)].reset_index(drop=True)
    r = measure(cfg, rows, meta["classes"], run_dir)
    parts, feed = table(r, torch.cuda.is_available())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA device: no copy)"
    return "\n".join(
        [
            "## The host's cost per clip (`host`)",
            "",
            f"{r['clips']} clips of 16 x 112 x 112, `method=cam`, a model that costs nothing (PoolNet), one process, "
            f"one thread, {device}; Trainer.predict wall {r['wall']:.2f} s.",
            "",
            "| part | where on a GPU node | ms / clip |",
            "|---|---|---:|",
            *parts,
            "",
            "Clips/s one GPU can at most be fed with N decode processes: min(N / (decode + collate), 1 / driving "
            "process), the driving process's work being all of beyond decode without a CUDA device.",
            "",
            "| decode processes | clips/s |",
            "|---:|---:|",
            *feed,
            "",
        ]
    )
