"""The schemas of the config groups' options (``conf/<group>/<option>.yaml``): one dataclass per option or family.

Each option's YAML names its schema first in its defaults list, e.g. ``conf/dataset/ucf101.yaml``::

    defaults:
      - /schema/dataset/ucf101@_here_
      - _self_

so a misspelt key in the file or on the command line (``dataset.rooot=...``) is refused with the nearest key, and
the YAML holds only what differs from the schema's defaults. :data:`OPTIONS` maps each group to its options'
schemas; :func:`pipeline.settings.register` stores them as ``schema/<group>/<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.settings.fields import setting

# ---------------------------------------------------------------------------------------------------- dataset


@dataclass
class SyntheticDataset:
    _target_: str = "pipeline.data.datasets.synthetic.Synthetic"
    root: str = setting("${paths.outputs}/data/synthetic", "where the synthetic videos are (written there if missing)")
    split: str = setting("test", "train | test | all", choices=("train", "test", "all"))
    generate_if_missing: bool = setting(True, "write the dataset when root has none")
    seed: int = setting(0, "the generator's seed (same seed, same videos)")


@dataclass
class UCF101Dataset:
    _target_: str = "pipeline.data.datasets.ucf101.UCF101"
    root: str = setting(doc="the folder of <Class>/<video> files")
    split: str = setting("test", "train | test | all (of fold)", choices=("train", "test", "all"))
    fold: int = setting(1, "the official split: 1, 2 or 3", choices=(1, 2, 3))
    splits_dir: str | None = setting(None, "classInd.txt, trainlist0N.txt, testlist0N.txt; null = root")


@dataclass
class EpicDataset:
    """EPIC-Kitchens-100 (epic100) and -55 (epic55); the split names differ (the reader checks them)."""

    _target_: str = "pipeline.data.datasets.epic_kitchens.Epic100"
    root: str = setting(doc="the folder of PXX/videos (or PXX/rgb_frames)")
    annotations_dir: str = setting(doc="the release's annotation CSVs")
    split: str = setting("validation", "epic100: train | validation | test; epic55: train | test_s1 | test_s2")
    label: str = setting("verb", "what a clip's label is", choices=("verb", "noun", "action"))
    media: str = setting(
        "videos", "videos (PXX/videos/PXX_YY.MP4) | frames (JPEG folders)", choices=("videos", "frames")
    )
    videos: str = setting("{participant_id}/videos/{video_id}.MP4", "a video's path under root")
    frames: str = setting(
        "{participant_id}/rgb_frames/{video_id}", "a frame folder under root (frame_%010d.jpg from 1)"
    )
    fps: float | None = setting(None, "null: each video's fps from the release's video_info CSV", above=0.0)


@dataclass
class Epic55Dataset(EpicDataset):
    _target_: str = "pipeline.data.datasets.epic_kitchens.Epic55"
    split: str = setting("train", "train | test_s1 | test_s2")


@dataclass
class ManifestDataset:
    _target_: str = "pipeline.data.datasets.manifest.Manifest"
    csv: str = setting(doc="the CSV: path [label, start_frame, end_frame | start_sec, end_sec, video_id, split]")
    root: str | None = setting(None, "the folder relative paths start from; null = the CSV's folder")
    split: str = setting("all", "keep rows whose split column equals this; all = every row")
    classes: str | None = setting(None, "text file of class names, one per line; null = the CSV's labels, sorted")
    fps: float | None = setting(None, "frame rate of frame folders (videos know their own)", above=0.0)


@dataclass
class KineticsDataset:
    _target_: str = "pipeline.data.datasets.kinetics.Kinetics"
    csv: str = setting(doc="the annotation CSV as released: label,youtube_id,time_start,time_end,split")
    root: str = setting(doc="folder of the videos (flat, or <label>/ or <label_with_underscores>/)")
    split: str = setting("all", "keep rows whose split column equals this (train, val, test); all = every row")
    classes: str | None = setting(None, "text file of class names, one per line; null = the CSV's labels, sorted")


@dataclass
class SSv2Dataset:
    _target_: str = "pipeline.data.datasets.ssv2.SomethingSomethingV2"
    root: str = setting(doc="folder of the <id>.webm videos")
    annotations_dir: str = setting(doc="folder of labels.json and something-something-v2-{train,validation,test}.json")
    split: str = setting("validation", "train | validation | test (test: no labels)",
                         choices=("train", "validation", "test"))  # fmt: skip
    suffix: str = setting(".webm", "the videos' file ending (.webm as released)")


@dataclass
class HMDB51Dataset:
    _target_: str = "pipeline.data.datasets.hmdb51.HMDB51"
    root: str = setting(doc="folder holding the <class>/ video folders")
    split: str = setting(
        "test", "train (1 in the split files) | test (2) | all (both)", choices=("train", "test", "all")
    )
    split_id: int = setting(1, "which official split: <class>_test_split<N>.txt", choices=(1, 2, 3))
    splits_dir: str | None = setting(None, "folder of the split files; null = dataset.root")


@dataclass
class FolderDataset:
    _target_: str = "pipeline.data.datasets.folder.VideoFolder"
    root: str = setting(doc="<root>/<class>/<video> (classes = folder names) or <root>/<video> (no labels)")
    split: str = setting("all", "the split written in the index rows (a folder has no splits)")


# ---------------------------------------------------------------------------------------------------- model


@dataclass
class ModelInput:
    layout: str = setting(
        "ncthw", "ncthw (torchvision, pytorchvideo) | ntchw (HF transformers, TSN/TSM)", choices=("ncthw", "ntchw")
    )
    pathways: Any = setting(None, "several clips from one: frame strides per pathway, e.g. [4, 1] or {alpha: 4}")
    clip_len: int = setting(16, "frames per clip", at_least=1)
    frame_stride: int = setting(2, "source frames between clip frames", at_least=1)
    short_side: int = setting(128, "frames are resized so that their short side is this", at_least=1)
    size: list[int] = setting([112, 112], "the centre crop [H, W]")
    mean: list[float] = setting([0.43216, 0.394666, 0.37645], "per-channel normalisation mean (RGB, 0..1)")
    std: list[float] = setting([0.22803, 0.22145, 0.216989], "per-channel normalisation std")


@dataclass
class ModelSettings:
    """Every model option (conf/model/*.yaml) is this one family: what differs is said by its values."""

    net: Any = setting(doc="the network: _target_ plus its arguments (+model.net.<arg>=... adds one)")
    checkpoint: str | None = setting(
        None, "a local state_dict or Lightning checkpoint; null = random weights (init_seed)"
    )
    init_seed: int = setting(0, "the seed of the random weights when there is no checkpoint")
    classes: Any = setting(
        None, "the model's class names: dataset | kinetics400 | a file | a list | null (HF id2label, else class 0 ...)"
    )
    class_map: Any = setting(None, "dataset class -> model class (name or index) where names differ")
    output: Any = setting(
        None, "the logits in the forward's result: null (a tensor) | an attribute or key | a tuple index"
    )
    layer: str | None = setting(None, "dotted module name explained; null = last module with a 5-D output")
    classifier: str | None = setting(
        None, "dotted name of the linear classifier (cam); null = last nn.Linear or 1x1x1 conv"
    )
    layout: str = setting(
        "auto", "how the layer's output reads", choices=("auto", "ncthw", "nthwc", "folded", "tokens")
    )
    grid: Any = setting(None, "tokens without a grid of their own: [t, h, w]; null = the model's or the layer's")
    token_order: str | None = setting(
        None, "tokens: thw (time-major) | hwt (space-major); null = the model's own", choices=("thw", "hwt")
    )
    fusion_layers: Any = setting(None, "method=fusion: the layers to fuse (the fusion option's layers can name them)")
    input: ModelInput = field(default_factory=ModelInput)


# ---------------------------------------------------------------------------------------------------- method

COMBINE = ("weighted", "product", "mean", "max")


@dataclass
class MethodSettings:
    """CAM, Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM: nothing to set but the class."""

    _target_: str = setting(doc="the method's class")


@dataclass
class GradCAMFamily(MethodSettings):
    """Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM: where the channel weights are pooled."""

    pool: str | None = setting(
        "thw",
        "channel weights pooled over thw (the whole clip, as pytorch-grad-cam) | hw (each time slice, as mmaction2 "
        "/ PySlowFast); null for layercam (every voxel has its own weight)",
        choices=("thw", "hw"),
    )


@dataclass
class ScoreCAMSettings(MethodSettings):
    _target_: str = "pipeline.explain.methods.ScoreCAM"
    batch_size: int = setting(32, "masked clips per forward pass", at_least=1)


@dataclass
class RolloutSettings(MethodSettings):
    """Attention rollout (Abnar & Zuidema): nothing to set."""

    _target_: str = "pipeline.explain.rollout.AttentionRollout"


@dataclass
class GradRolloutSettings(MethodSettings):
    """Gradient-weighted attention rollout (Chefer et al.): nothing to set."""

    _target_: str = "pipeline.explain.rollout.GradRollout"


@dataclass
class FusionSettings(MethodSettings):
    _target_: str = "pipeline.explain.fusion.Fusion"
    method: Any = setting({"_target_": "pipeline.explain.methods.LayerCAM"}, "the method run on each layer")
    layers: Any = setting("auto", "the layers fused: auto (the model's resolution levels) or a list of names")
    levels: int = setting(3, "resolution levels fused by layers=auto", at_least=1)
    combine: str = setting(
        "weighted", "weighted (product, coarser layers weighted 1/2, 1/4, ...) | product | mean | max", choices=COMBINE
    )


# ---------------------------------------------------------------------------------------------------- sampler


@dataclass
class SamplerSettings:
    _target_: str = "pipeline.data.sampling.CenterSampler"
    clip_len: int = setting("${model.input.clip_len}", "frames per clip (the model's)", at_least=1)
    frame_stride: int = setting(
        "${model.input.frame_stride}", "source frames between clip frames (the model's)", at_least=1
    )
    target_fps: float | None = setting(
        None, "e.g. 15: step by each video's fps / target_fps instead of frame_stride", above=0.0
    )


@dataclass
class SlidingSampler(SamplerSettings):
    _target_: str = "pipeline.data.sampling.SlidingSampler"
    clip_stride: int | None = setting(None, "source frames between clip starts; null = back to back", at_least=1)


@dataclass
class UniformSampler(SamplerSettings):
    _target_: str = "pipeline.data.sampling.UniformSampler"
    num_clips: int = setting(3, "clips spread evenly over each video", at_least=1)


# ---------------------------------------------------------------------------------------------------- cluster


@dataclass
class LocalCluster:
    _target_: str = "pipeline.runtime.local.local"
    n_workers: Any = setting(
        "auto",
        "worker processes: auto = one per CPU core (at most one per 2 GiB) | a number",
        choices=("auto",),
        at_least=1,
    )
    threads_per_worker: int = setting(1, "threads per worker", at_least=1)
    processes: bool = setting(True, "workers are processes (false: threads of the driver)")
    memory_limit: Any = setting("auto", "per worker: auto | a size like 8GB | 0 (none)")
    dashboard_address: str = setting(":0", "the dashboard's address (:0 = a free port; logged)")
    gpus: int = setting(0, "> 0: one worker per GPU, each offering the Dask resource GPU=1", at_least=0)
    start_method: str = setting(
        "forkserver",
        "forkserver (fork from one process that imported torch once) | spawn",
        choices=("forkserver", "spawn"),
    )


@dataclass
class SlurmCluster:
    _target_: str = "pipeline.runtime.slurm.slurm"
    queue: str | None = setting(None, "the partition")
    account: str | None = setting(None, "the account charged")
    walltime: str = setting("04:00:00", "per job (SLURM's -t); the workers retire before it, see worker_lifetime")
    worker_lifetime: str | None = setting(
        "auto",
        "Dask's --lifetime: auto = walltime less a tenth (1 to 15 min) | a duration like 230m | null (until "
        "the job ends)",
    )
    lifetime_stagger: str | None = setting(
        "auto", "Dask's --lifetime-stagger: auto = a third of that margin | a duration | null"
    )
    cores: int = setting(8, "per job; DataLoader workers decode on these", at_least=1)
    memory: str = setting("32GB", "per job")
    gpus_per_job: int = setting(0, "adds --gres=gpu:N; N workers per job, one per GPU", at_least=0)
    jobs: int = setting(1, "jobs started when not adaptive", at_least=1)
    adapt_min: int | None = setting(None, "with adapt_max: jobs come and go with the work", at_least=0)
    adapt_max: int | None = setting(None, "the most jobs when adaptive", at_least=0)
    job_extra_directives: list[str] = setting([], 'more #SBATCH lines, e.g. ["--constraint=a100"]')
    job_script_prologue: list[str] = setting(
        [], 'shell lines before the worker starts, e.g. ["source ~/venv/bin/activate"]'
    )
    log_directory: str | None = setting(
        "${paths.run_dir}/logs", "the jobs' own output, dask-worker-<job>.out / .err (null: where the command runs)"
    )
    local_directory: str | None = setting(None, "node-local scratch for the workers")
    interface: str | None = setting(None, "network interface, e.g. ib0")
    python: str | None = setting(None, "the workers' Python (default: this one)")
    dashboard_address: str = setting(":0", "the dashboard's address")


@dataclass
class AddressCluster:
    _target_: str = "pipeline.runtime.cluster.address"
    address: str = setting(doc="a running scheduler, e.g. tcp://host:8786")


#: group -> option -> its schema (an option's YAML names it as /schema/<group>/<option>@_here_)
OPTIONS: dict[str, dict[str, type]] = {
    "dataset": {
        "synthetic": SyntheticDataset,
        "ucf101": UCF101Dataset,
        "epic100": EpicDataset,
        "epic55": Epic55Dataset,
        "manifest": ManifestDataset,
        "kinetics": KineticsDataset,
        "ssv2": SSv2Dataset,
        "hmdb51": HMDB51Dataset,
        "folder": FolderDataset,
    },
    "model": {"model": ModelSettings},
    "method": {
        "cam": MethodSettings,
        "gradcam": GradCAMFamily,
        "gradcampp": GradCAMFamily,
        "xgradcam": GradCAMFamily,
        "layercam": GradCAMFamily,
        "scorecam": ScoreCAMSettings,
        "fusion": FusionSettings,
        "rollout": RolloutSettings,
        "gradrollout": GradRolloutSettings,
    },
    "sampler": {"center": SamplerSettings, "sliding": SlidingSampler, "uniform": UniformSampler},
    "cluster": {"local": LocalCluster, "slurm": SlurmCluster, "address": AddressCluster},
}
