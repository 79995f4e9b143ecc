"""Decoder and index-stage throughput: clips/s of seeking vs decoding from the start vs decoding whole files,
and of the index stage (probe + sample + shard) on 1 and 2 Dask workers.

The videos are written here: 320x240 at 25 fps, 20 s (10 s with ``--quick``), H.264 (keyframe every 2 s,
B-frames), MPEG-4 Part 2 AVI (UCF-101's codec, keyframe every 12 frames) and VP9 WebM (Something-Something v2's
and YouTube's codec, keyframe every 2 s). Clips are the model's usual 8 steps
every 2 frames, 6 per video spread with the uniform sampler. The index benchmark lists hard links to those
files in a manifest (so that probing, not writing videos, is what it times) and runs the real index stage.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from hydra import compose, initialize_config_dir

from pipeline.data.sampling import UniformSampler
from pipeline.data.video import read_frames, write_video
from pipeline.runtime.cluster import open_client
from pipeline.stages import index

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
FPS = 25
CLIPS_PER_VIDEO = 6


def _frames(seconds: int, seed: int) -> np.ndarray:
    """A textured scene panning 2 px per frame (realistic motion for the encoders)."""
    n, height, width = seconds * FPS, 240, 320
    rng = np.random.default_rng(seed)
    texture = rng.integers(40, 215, size=(height // 4, (width + 2 * n) // 4, 3), dtype=np.uint8)
    texture = texture.repeat(4, axis=0).repeat(4, axis=1)
    return np.stack([texture[:, 2 * i : 2 * i + width] for i in range(n)])


def _whole_file(path: Path, indices: list[int]) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return np.stack([frames[i] for i in indices])


def _decoder_rows(root: Path, seconds: int, videos: int) -> list[str]:
    kinds = {
        "H.264 MP4": dict(suffix=".mp4", codec="libx264", g=str(2 * FPS), bf="2", preset="veryfast"),
        "MPEG-4 AVI": dict(suffix=".avi", codec="mpeg4", g="12", qscale="4"),
        # SSv2's and YouTube's (Kinetics) codec: WebM stores no frame count, so seeking checks every packet first
        "VP9 WebM": {
            "suffix": ".webm",
            "codec": "libvpx-vp9",
            "g": str(2 * FPS),
            "deadline": "realtime",
            "cpu-used": "8",
        },
    }
    sampler = UniformSampler(8, frame_stride=2, num_clips=CLIPS_PER_VIDEO)
    rows = []
    for name, options in kinds.items():
        options = dict(options)
        suffix = options.pop("suffix")
        paths = []
        for k in range(videos):
            paths.append(root / f"{name.split()[0]}_{k}{suffix}")
            write_video(paths[-1], _frames(seconds, k), FPS, **options)
        clips = [(p, c.frame_indices) for p in paths for c in sampler(0, seconds * FPS)]
        timings = {}
        for method, read in (
            ("seek (read_frames)", read_frames),
            ("from start to last frame", lambda p, i: read_frames(p, i, seek=False)),
            ("whole file", _whole_file),
        ):
            started = time.perf_counter()
            for path, indices in clips:
                read(path, indices)
            timings[method] = time.perf_counter() - started
        for method, seconds_taken in timings.items():
            speedup = timings["whole file"] / seconds_taken
            rows.append(
                f"| decode | {name}, {seconds} s | {method} | {len(clips)} | {seconds_taken:.2f} | {len(clips) / seconds_taken:.1f} | {speedup:.1f}x |"
            )
    return rows


def _index_rows(root: Path, out_dir: Path, count: int) -> list[str]:
    originals = sorted(p for p in root.iterdir() if p.suffix in (".mp4", ".avi", ".webm"))
    links = root / "links"
    links.mkdir(exist_ok=True)
    lines = ["path,label"]
    for k in range(count):
        target = links / f"video_{k:05d}{originals[k % len(originals)].suffix}"
        if not target.exists():
            os.link(originals[k % len(originals)], target)
        lines.append(f"{target},class_{k % 10}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    rows = []
    for workers in (1, 2):
        for cached in (False, True):
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(
                    "config",
                    overrides=[
                        f"paths.run_dir={out_dir}/index-{workers}-workers",
                        "dataset=manifest",
                        f"dataset.csv={root / 'manifest.csv'}",
                        "sampler=uniform",
                        f"sampler.num_clips={CLIPS_PER_VIDEO}",
                        f"cluster.n_workers={workers}",
                        "cluster.threads_per_worker=1",
                        f"index.probe_cache={out_dir / f'index-probes-{workers}.parquet' if cached else 'null'}",
                    ],
                )
            run_dir = Path(cfg.paths.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            if cached:  # fill the cache first; the timed run finds every file unchanged
                with open_client(cfg.cluster) as client:
                    index.run(cfg, run_dir, client)
            with open_client(cfg.cluster) as client:
                client.wait_for_workers(workers)
                client.run(
                    importlib.import_module, "pipeline.data.probing"
                )  # workers import the stage before the clock starts
                started = time.perf_counter()
                frame = index.run(cfg, run_dir, client)
                seconds = time.perf_counter() - started
            label = f"{workers} Dask worker{'s' if workers > 1 else ''}" + (", probe cache warm" if cached else "")
            rows.append(
                f"| index | {count} videos (manifest) | {label} | {len(frame)} | {seconds:.2f} | {len(frame) / seconds:.0f} | {count / seconds:.0f} videos/s |"
            )
    return rows


def run(out_dir: Path, quick: bool) -> str:
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    seconds, videos, count = (10, 2, 300) if quick else (20, 3, 10000)
    out_dir = Path(out_dir).resolve()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        root = Path(tmp)
        rows = _decoder_rows(root, seconds, videos)
        rows += _index_rows(root, out_dir, count)
    return "\n".join(
        [
            "## Decoding and indexing (pipeline/bench/decode.py)",
            "",
            "| stage | input | method | clips | seconds | clips/s | vs whole file / note |",
            "|---|---|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"Decode: {CLIPS_PER_VIDEO} clips of 8 frames (stride 2) per 320x240 video, each clip decoded on its own, as the "
            "extract stage's DataLoader does. *seek* is `read_frames` (keyframe seek, timestamps checked); *from start* "
            "decodes from frame 0 to the clip's last frame; *whole file* decodes every frame. Index: the real index stage "
            "(probe on Dask, sample, shard, write Parquet) with `cluster=local` worker processes (started, and the stage "
            "imported, before timing), probe cache off unless noted.",
            "",
        ]
    )
