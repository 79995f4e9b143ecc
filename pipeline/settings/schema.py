"""The top-level settings: one dataclass per section, every setting with its type, default, allowed values and doc.

``conf/config.yaml`` only picks the group options (``dataset``, ``model``, ``method``, ``sampler``, ``cluster``,
whose schemas are in :mod:`pipeline.settings.groups`) and overrides; the defaults live here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.settings.fields import setting

#: ``execution``: where the sharded stages run
EXECUTIONS = ("auto", "driver", "cluster")
#: the per-stage settings ``execution`` replaces, each value with the ``execution`` it means
OLD_IN_PROCESS = ("index.in_process", "extract.in_process", "evaluate.in_process")


@dataclass
class Paths:
    root: str = setting("${hydra:runtime.cwd}", "the folder outputs/ lives in (default: where the command runs)")
    outputs: str = setting("${paths.root}/outputs", "every run's folder, the synthetic data and the demo model")
    run_dir: str = setting("${paths.outputs}/${run_name}", "this run's folder")


@dataclass
class Target:
    mode: str = setting("pred", "which classes each clip is explained for", choices=("pred", "label", "topk"))
    k: int = setting(3, "classes per clip with mode=topk", at_least=1)


@dataclass
class Index:
    clips_per_shard: int = setting(32, "clips per shard (one Dask task of the extract stage)", at_least=1)
    probe_batch: int = setting(32, "videos probed per Dask task", at_least=1)
    probe_cache: str | None = setting(
        "${paths.run_dir}/probes.parquet", "probe results kept between index runs (null: probe every time)"
    )


@dataclass
class Extract:
    batch_size: int = setting(8, "clips per forward pass", at_least=1)
    num_workers: Any = setting(
        "auto",
        "DataLoader processes per task; auto = on GPU the worker's cores but one (>= 2), 0 on CPU",
        choices=("auto",),
        at_least=0,
    )
    prefetch_factor: Any = setting(
        "auto",
        "batches each DataLoader process decodes ahead; auto = >= 2 each and 8 in all",
        choices=("auto",),
        at_least=1,
    )
    resize: str = setting(
        "auto",
        "where clips are resized: loader (float32 clips), device (uint8 frames resized on the device), auto = device on GPUs",
        choices=("auto", "loader", "device"),
    )
    torch_threads: Any = setting(
        1,
        "torch threads per task (fixed: byte-identical tubes for any worker count); auto = cores / workers",
        choices=("auto",),
        at_least=1,
    )
    retries: int = setting(
        2, "a failing shard task tries again this often; then its clips become failure rows", at_least=0
    )
    fail_fast: bool = setting(False, "stop at the first failed clip or shard instead of recording it")
    concurrent: str = setting(
        "wait",
        "a second extract driver on this run folder: wait (for the first) | refuse (one line)",
        choices=("wait", "refuse"),
    )
    share: str | None = setting(
        None,
        "this driver's share of the shards, for SLURM job arrays: null (every shard) | auto (from "
        "SLURM_ARRAY_TASK_ID/COUNT/MIN) | 'i/n' (the shards s with s mod n == i)",
    )


@dataclass
class Store:
    codec: str = setting(
        "float16",
        "tube codec: float16 (half the bytes, <= 2^-11 of the peak) | float32 (lossless)",
        choices=("float16", "float32"),
    )


@dataclass
class Trainer:
    accelerator: str = setting(
        "cpu",
        "each extract task's Lightning accelerator (gpu needs GPU workers: cluster.gpus / cluster.gpus_per_job)",
        choices=("cpu", "gpu", "cuda"),
    )
    devices: Any = setting(1, "devices per Dask task; with strategy=ddp: the devices of this node", at_least=1)
    strategy: str = setting("auto", "auto: one device per Dask task | ddp: stage=extract as one Lightning DDP job")
    precision: Any = setting("32-true", "Lightning precision, e.g. 16-mixed, bf16-mixed on GPUs")


@dataclass
class Stats:
    boxes: str | None = setting(None, "ground-truth boxes CSV (video_id,frame,x0,y0,x1,y1); null = the dataset's own")
    pointing_tolerance: float = setting(0.0, "source pixels added around a box for the pointing game", at_least=0.0)
    compare_runs: list[str] = setting([], "other runs over the same index (e.g. [gradcam]): agreement, side by side")


@dataclass
class Report:
    clips_per_class: int = setting(3, "gallery clips per class", at_least=1)


@dataclass
class Evaluate:
    clips_per_class: int | None = setting(
        None, "clips evaluated per class, drawn at random; null = every clip", at_least=1
    )
    protocol: str = setting(
        "project",
        "deletion / insertion: project (voxels, blur/mean baseline) | li2021 (Li et al. WACV 2021: 16x16 cells per "
        "frame faded to 0 in the normalised input, 128 steps); docs/evaluation.md",
        choices=("project", "li2021"),
    )
    steps: int | None = setting(
        None,
        "curves: 0, 1/steps, ..., 1 of the voxels (cells); null = the protocol's (project 10, li2021 128)",
        at_least=1,
    )
    cells: int | None = setting(
        None, "li2021: cells per side of each frame's grid; null = the protocol's (16); project: null", at_least=1
    )
    baseline: str = setting(
        "blur",
        "project: what removed voxels become: blur (Gaussian, blur_sigma input pixels) | mean (clip mean)",
        choices=("blur", "mean"),
    )
    blur_sigma: float = setting(5.0, "the blur baseline's Gaussian sigma in input pixels", above=0.0)
    iou_level: float = setting(
        0.5, "tube IoU: the salient region is where the tube reaches this share of its peak", above=0.0, at_most=1.0
    )
    batch_size: int = setting(4, "clips per batch (each becomes 2 x 2 x (steps + 1) perturbed clips)", at_least=1)
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    seed: int = setting(0, "random tubes and the randomised model")
    retries: int = setting(
        2, "a failing shard task tries again this often; then its clips become failure rows", at_least=0
    )


@dataclass
class Train:
    epochs: int = setting(8, "epochs over the train split", at_least=1)
    batch_size: int = setting(16, "clips per optimiser step", at_least=1)
    lr: float = setting(0.003, "learning rate", above=0.0)
    clips_per_video: int = setting(3, "random clips drawn per video and epoch", at_least=1)
    seed: int = setting(0, "the initial weights and the clip draws")


STAGE_DOC = (
    "index | extract | stats | evaluate (faithfulness, opt-in) | report | all (= index, extract, stats, report) | "
    "train (fits the demo model) | demo (train, all and evaluate); or a list of stages"
)


@dataclass
class Settings:
    """Every setting of ``python -m pipeline``; the groups' nodes are their options' schemas."""

    dataset: Any = setting(doc="the dataset reader (conf/dataset)")
    model: Any = setting(doc="the model and how it reads (conf/model)")
    method: Any = setting(doc="the saliency method (conf/method)")
    sampler: Any = setting(doc="where clips are taken from each video (conf/sampler)")
    cluster: Any = setting(doc="the Dask cluster (conf/cluster)")
    stage: Any = setting("all", STAGE_DOC)
    execution: str = setting(
        "auto",
        "where probing, extract and evaluate run: auto (in this process when a cluster cannot pay off: <= 1,000 "
        "videos to probe, <= 256 CPU clips to extract (16 from a stage=extract command line), evaluate on threads "
        "when no cluster is up) | driver "
        "(always in this process) | cluster (always on the Dask cluster)",
        choices=EXECUTIONS,
    )
    run_name: str = setting("demo", "the run's folder under outputs/: letters, digits, '-', '_', '.'")
    paths: Paths = field(default_factory=Paths)
    target: Target = field(default_factory=Target)
    index: Index = field(default_factory=Index)
    extract: Extract = field(default_factory=Extract)
    store: Store = field(default_factory=Store)
    trainer: Trainer = field(default_factory=Trainer)
    stats: Stats = field(default_factory=Stats)
    report: Report = field(default_factory=Report)
    evaluate: Evaluate = field(default_factory=Evaluate)
    train: Train = field(default_factory=Train)
