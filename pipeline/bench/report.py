"""Benchmark: stats + report over a dataset of 100,000 clips (``--quick``: 10,000), with no model.

:func:`write_synthetic_run` writes a run directory as the extractor would (``index.parquet``, tube part files
with the store's schema, statistics computed by :func:`pipeline.explain.clipstats.clip_statistics` on the decoded
tubes, a boxes CSV, failure rows); every clip points at one of a few short real videos, so the report decodes
and renders real frames. The benchmark times the stats and report stages and measures the report's size on
disk and its largest page: both must depend on the number of classes, not of clips.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from omegaconf import OmegaConf

from pipeline.data.video import write_video
from pipeline.explain.clipstats import clip_statistics
from pipeline.explain.upsample import upsample
from pipeline.stages import report, stats
from pipeline.store import (
    INDEX_SCHEMA,
    TUBE_SCHEMA,
    Failure,
    encode_layer_volumes,
    encode_volume,
    failures_table,
    quantise,
    write_table_atomic,
)
from pipeline.store.run_dir import RunDir

CLIP_LEN, SIDE, NATIVE = 8, 32, (4, 8, 8)
VIDEO_FRAMES, VIDEO_W, VIDEO_H = 24, 48, 40


def _videos(folder: Path, count: int, rng: np.random.Generator) -> tuple[list[str], pd.DataFrame]:
    """``count`` short videos of a moving square, and its box in every frame."""
    sources, boxes = [], []
    for v in range(count):
        frames = np.full((VIDEO_FRAMES, VIDEO_H, VIDEO_W, 3), rng.integers(40, 90), dtype=np.uint8)
        for t in range(VIDEO_FRAMES):
            x, y = 4 + t, 8 + (v % 4) * 4
            frames[t, y : y + 10, x : x + 10] = (220, 40, 40)
            boxes.append(dict(video_id=f"video{v:03d}", frame=t, x0=x, y0=y, x1=x + 10, y1=y + 10))
        path = folder / f"video{v:03d}.mp4"
        write_video(path, frames, fps=25)
        sources.append(str(path))
    return sources, pd.DataFrame(boxes)


def write_synthetic_run(
    run_dir: Path,
    clips: int,
    classes: list[str],
    clips_per_part: int = 1000,
    videos: int = 8,
    seed: int = 0,
    method: str = "cam",
    volumes=None,
    layers: list[str] | None = None,
) -> pd.DataFrame:
    """Write a complete extracted run of ``clips`` clips over ``classes`` without a model; returns its index.

    ``volumes(rng, n) -> (n, *NATIVE)`` makes the native tubes (default: a random blob per clip). Labels
    are dealt in turn; about 10 % of the clips are predicted wrong; two splits; one failure row per 1,000 clips.
    ``layers`` makes it a fused run: each named layer gets its own tube (``layer_volumes``), the first at the
    tube's resolution and each next one twice as coarse in space.
    """
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    sources, boxes = _videos(run_dir / "videos", videos, rng)
    boxes.to_csv(run_dir / "boxes.csv", index=False)
    k = len(classes)
    label = np.arange(clips) % k
    video = rng.integers(0, videos, clips)
    start = rng.integers(0, VIDEO_FRAMES - 2 * CLIP_LEN + 1, clips)
    index = pd.DataFrame(
        dict(
            clip_id=[f"clip{i:07d}" for i in range(clips)],
            video_id=[f"video{v:03d}" for v in video],
            source=[sources[v] for v in video],
            label=label.astype(np.int32),
            label_name=[classes[c] for c in label],
            split=np.where(np.arange(clips) % 5 == 0, "val", "test"),
            frame_indices=[list(range(s, s + 2 * CLIP_LEN, 2)) for s in start],
            padded=0,
            num_frames=VIDEO_FRAMES,
            fps=25.0,
            width=VIDEO_W,
            height=VIDEO_H,
            shard=(np.arange(clips) // clips_per_part).astype(np.int32),
            segment_id=None,
            start_frame=0,
            end_frame=VIDEO_FRAMES,
            codec="h264",
            duration=VIDEO_FRAMES / 25.0,
        )
    )
    meta = dict(classes=list(classes), boxes=str(run_dir / "boxes.csv"))
    write_table_atomic(
        pa.Table.from_pandas(index, schema=INDEX_SCHEMA, preserve_index=False),
        RunDir(run_dir).index,
        {"saliency_tubes": json.dumps(meta)},
    )
    make = volumes or blob_tubes
    crop = np.array([(VIDEO_W - VIDEO_H) / 2, 0, (VIDEO_W + VIDEO_H) / 2, VIDEO_H], dtype=np.float32)
    for shard, rows in index.groupby("shard"):
        n = len(rows)
        native = torch.from_numpy(make(rng, n)).float()
        stored, scale = quantise(native, "float16")
        per_layer = None
        if layers:
            per_layer = [
                quantise(torch.nn.functional.avg_pool3d(native[:, None], (1, 2**i, 2**i))[:, 0], "float16")
                for i in range(len(layers))
            ]
        decoded = stored.float() * scale[:, None, None, None]
        st = clip_statistics(upsample(decoded, (CLIP_LEN, SIDE, SIDE)), torch.from_numpy(np.tile(crop, (n, 1))))
        probs = rng.uniform(0.3, 1.0, n).astype(np.float32)
        wrong = rng.uniform(size=n) < 0.1
        pred = np.where(wrong, (rows["label"].to_numpy() + 1) % k, rows["label"].to_numpy()).astype(np.int32)
        columns = {
            c: rows[c].to_numpy()
            for c in ("clip_id", "video_id", "source", "label", "label_name", "split", "padded", "shard")
        }
        columns["frame_indices"] = list(rows["frame_indices"])
        columns["model_label"] = columns["label"]  # the model scores the dataset's own classes
        columns.update(
            crop_box=[crop] * n,
            input_size=[[CLIP_LEN, SIDE, SIDE]] * n,
            method=[method] * n,
            layer=["+".join(layers) if layers else "features"] * n,
            target=pred,
            target_name=[classes[p] for p in pred],
            target_rank=np.zeros(n, np.int32),
            target_logit=np.log(probs),
            target_prob=probs,
            pred=pred,
            pred_name=[classes[p] for p in pred],
            pred_prob=probs,
            volume=[encode_volume(v) for v in stored.numpy()],
            volume_shape=[list(NATIVE)] * n,
            volume_codec=["float16"] * n,
            volume_scale=scale.numpy(),
            peak_frame=np.asarray(columns["frame_indices"])[np.arange(n), st["peak_t"].numpy()],
            layer_volumes=encode_layer_volumes(list(layers or []), per_layer, n),
        )
        for name, value in st.items():
            value = value.numpy()
            columns[name] = list(value) if value.ndim == 2 else value
        write_table_atomic(
            pa.Table.from_pydict({f.name: columns[f.name] for f in TUBE_SCHEMA}, schema=TUBE_SCHEMA),
            RunDir(run_dir).part("extract", int(shard)),
        )
    failed = [
        Failure(
            clip_id=f"lost{i:05d}",
            source=f"missing{i}.mp4",
            stage="index",
            error_type="VideoError",
            message=f"missing{i}.mp4: cannot open",
        )
        for i in range(max(1, clips // 1000))
    ]
    write_table_atomic(failures_table(failed), RunDir(run_dir).index_failures)
    return index


def blob_tubes(rng: np.random.Generator, n: int) -> np.ndarray:
    t, h, w = NATIVE
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    centre = rng.uniform(0, 1, (n, 3)) * [t - 1, h - 1, w - 1]
    d2 = sum((g[None] - centre[:, i, None, None, None]) ** 2 for i, g in enumerate((tt, yy, xx)))
    return (np.exp(-d2 / 4.0) * rng.uniform(0.5, 3.0, (n, 1, 1, 1)) - 0.05).astype(np.float32)


def config(clips_per_class: int = 3, compare_runs=()):
    """The settings the stats and report stages read."""
    return OmegaConf.create(
        dict(
            stats=dict(boxes=None, pointing_tolerance=0.0, compare_runs=list(compare_runs)),
            report=dict(clips_per_class=clips_per_class),
        )
    )


def run(out_dir: Path, quick: bool) -> str:
    clips = 10_000 if quick else 100_000
    classes = [f"action_{c:03d}" for c in range(10 if quick else 50)]
    run_dir = out_dir / "report-run"
    t0 = time.perf_counter()
    write_synthetic_run(run_dir, clips, classes)
    setup = time.perf_counter() - t0
    cfg = config()
    t0 = time.perf_counter()
    stats.run(cfg, run_dir)
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = report.run(cfg, run_dir)
    t_report = time.perf_counter() - t0
    pages = sorted((run_dir / "report").glob("*.html"))
    largest = max(p.stat().st_size for p in pages)
    tubes_mb = sum(p.stat().st_size for p in RunDir(run_dir).tubes.glob("*.parquet")) / 1e6
    lines = [
        "## Report at scale (`pipeline/bench/report.py`)",
        "",
        f"A run of {clips:,} clips in {len(classes)} classes ({clips // 1000} part files, {tubes_mb:.1f} MB of tubes; written in {setup:.1f} s), no model.",
        "",
        "| stage | seconds | output |",
        "|---|---:|---|",
        f"| stats | {t_stats:.1f} | per class / split / overall tables, pointing rows |",
        f"| report | {t_report:.1f} | {result.figures['pages']} pages, {result.clips} gallery clips, {result.figures['bytes'] / 1e6:.1f} MB on disk, largest page {largest / 1e3:.0f} kB |",
        "",
        "Report time and size grow with the number of classes (gallery clips and pictures per class), not with the",
        f"number of clips: {t_report / len(classes):.2f} s and {result.figures['bytes'] / 1e6 / len(classes):.2f} MB per class here.",
    ]
    return "\n".join(lines) + "\n"
