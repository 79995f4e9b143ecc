"""How the extract stage scales: throughput with 2 Dask workers vs 1, and peak memory for 1x vs 10x the clips.

Each measurement runs ``python -m pipeline stage=extract`` as its own process on a LocalCluster of worker
processes, over the synthetic dataset and a randomly initialised demo model. The 10x index repeats the 1x
clips ten times under new clip ids (same videos, ten times the shards), so it measures what grows with the
number of clips and nothing else. Memory is the resident set of the whole process tree (driver, scheduler,
workers, DataLoader workers), sampled every 50 ms; throughput is clips over the stage's own time (the
"stage extract done in" log line: no interpreter or cluster start-up).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.data.clip_index import assign_shards
from pipeline.data.datasets.synthetic import SyntheticSpec, generate
from pipeline.models import DemoNet3D
from pipeline.store import INDEX_SCHEMA, write_table_atomic
from pipeline.store.run_dir import RunDir

CLIPS_PER_SHARD = 8


def _extract(root: Path, run_name: str, overrides: list[str]) -> dict:
    """Run the extract stage in a fresh process; its stage time, wall time and peak tree RSS."""
    args = [sys.executable, "-m", "pipeline", "stage=extract", f"paths.root={root}", f"run_name={run_name}"]
    args += ["extract.in_process=false", *overrides]  # on workers at every size: 64 clips would run in the driver
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    top = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:  # a process ended between listing and reading
            pass
        time.sleep(0.05)
    output = proc.stdout.read()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"extract failed ({run_name}):\n{output[-3000:]}")
    stage = float(re.search(r"stage extract done in ([\d.]+) s", output).group(1))
    return dict(stage_s=stage, wall_s=wall, peak_rss_mb=peak / 2**20)


def _index(root: Path, base: Path, run_name: str, repeats: int) -> int:
    """Write ``outputs/<run_name>/index.parquet``: the base index repeated ``repeats`` times under new clip ids."""
    table = pq.read_table(base)
    frame = table.to_pandas()
    copies = [frame.assign(clip_id=frame["clip_id"] + (f"#{r}" if r else "")) for r in range(repeats)]
    index = pd.concat(copies, ignore_index=True)
    index["shard"] = assign_shards(len(index), CLIPS_PER_SHARD)
    run_dir = root / "outputs" / run_name
    shutil.rmtree(run_dir, ignore_errors=True)
    meta = table.schema.metadata[b"saliency_tubes"].decode()
    write_table_atomic(
        pa.Table.from_pandas(index, schema=INDEX_SCHEMA, preserve_index=False),
        RunDir(run_dir).index,
        {"saliency_tubes": meta},
    )
    return len(index)


def run(out_dir: Path, quick: bool) -> str:
    root = Path(out_dir).resolve() / "scaling"
    spec = (
        SyntheticSpec(groups=3, clips_per_group=2, test_groups=1)
        if quick
        else SyntheticSpec(groups=5, clips_per_group=4, test_groups=2)
    )
    data = generate(root / "data", spec, progress=False)
    checkpoint = root / "random.ckpt"
    torch.manual_seed(0)
    torch.save(DemoNet3D(num_classes=4).state_dict(), checkpoint)
    common = [
        f"dataset.root={data}",
        "dataset.generate_if_missing=false",
        f"model.checkpoint={checkpoint}",
        "sampler=uniform",
        "sampler.num_clips=2",
        "extract.batch_size=8",
        "cluster.processes=true",
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "stage=index",
            f"paths.root={root}",
            "run_name=base",
            *common,
            "cluster.n_workers=1",
        ],
        check=True,
        capture_output=True,
    )
    base = RunDir(root / "outputs" / "base").index

    rows, figures = [], {}
    for name, repeats, workers in (("1x, 1 worker", 1, 1), ("10x, 1 worker", 10, 1), ("10x, 2 workers", 10, 2)):
        run_name = re.sub(r"\W+", "-", name).strip("-")
        clips = _index(root, base, run_name, repeats)
        result = _extract(root, run_name, [*common, f"cluster.n_workers={workers}"])
        result.update(clips=clips, workers=workers, clips_per_s=clips / result["stage_s"])
        figures[name] = result
        rows.append(
            f"| {name} | {clips} | {result['stage_s']:.1f} | {result['clips_per_s']:.1f} | {result['wall_s']:.1f} | {result['peak_rss_mb']:.0f} |"
        )
    speedup = figures["10x, 2 workers"]["clips_per_s"] / figures["10x, 1 worker"]["clips_per_s"]
    memory = figures["10x, 1 worker"]["peak_rss_mb"] / figures["1x, 1 worker"]["peak_rss_mb"]
    (root / "scaling.json").write_text(json.dumps(figures, indent=1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "\n".join(
        [
            "## Extract scaling (pipeline/bench/scaling.py)",
            "",
            f"Synthetic videos, random demo model, batch 8, {CLIPS_PER_SHARD} clips per shard, 1 torch thread per task, "
            f"worker processes on {cores} CPU cores. Stage time excludes interpreter and cluster start-up; "
            "peak RSS is the whole process tree (driver, scheduler, workers).",
            "",
            "| run | clips | stage s | clips/s | wall s | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Throughput 2 workers / 1 worker (10x clips): **{speedup:.2f}x**. Peak RSS 10x clips / 1x clips (1 worker): "
            f"**{memory:.2f}x** (target <= 1.1x). A worker's first shard also imports torch and builds the model "
            "(seconds), so the 1x stage time is mostly start-up.",
            "",
        ]
    )
