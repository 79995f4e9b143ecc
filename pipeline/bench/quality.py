"""Quality benchmark: does a method point at what the network used, and what does it cost?

On a synthetic set where the distractors move too (each along one of the class directions, so only the red
disc's motion tells the class: :mod:`pipeline.data.datasets.synthetic` with ``distractor_motion=actions``) a
coarse 3D CNN is trained (the demo network with four blocks: its last map is 2 x 4 x 4 for 16 x 64 x 64 clips),
and on the demo's own set a tiny VideoMAE (HF ``VideoMAEForVideoClassification`` from a small config: a 4 x 8 x
8 token grid), each once by ``stage=train``'s code and cached under ``<out>/quality/``. For every method the
test clips' tubes (predicted class) are scored by

- the pointing game of ``stage=stats`` (:func:`pipeline.tables.pointing.pointing_rows`), both definitions: this
  project's (does each time step's peak fall in the disc's box, over all boxed steps) and Li et al.'s (the box
  grown by 7/112 of the view, the mean of the classes' scores);
- deletion and insertion AUC under both ``evaluate.protocol`` options (:mod:`pipeline.explain.protocols`), each
  beside the AUC of that protocol's random tube;
- time per clip of the explainer (forward, backward where needed, the tube) on one torch thread, as an extract
  task runs by default: per batch the fastest of three runs, the methods interleaved batch by batch so that load
  from other processes hits all alike.

The CNN gets the CAM family, the transformer Grad-CAM on its tokens, attention rollout and gradient-weighted
rollout; the demo's own set and model (``make demo``'s; trained here if missing) are scored the same way for
``cam``, ``gradcam`` and ``fusion``. Every explainer is built as the extract stage builds it
(:func:`pipeline.runtime.builders.make_explainer`). ``python -m pipeline.bench quality [--quick]``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import pipeline.settings  # noqa: F401  (registers the schema the configs are composed with)
from pipeline.data.clip_index import build_clips
from pipeline.data.clips import ClipDataset
from pipeline.data.probing import probe_all
from pipeline.data.resize import ResizeCrop
from pipeline.data.sampling import CenterSampler
from pipeline.explain.clipstats import clip_statistics
from pipeline.explain.protocols import Li2021, Project
from pipeline.explain.upsample import upsample
from pipeline.models import build_model
from pipeline.models.adapters import adapt
from pipeline.models.inputs import Normalise
from pipeline.runtime.builders import make_explainer
from pipeline.stages import train
from pipeline.store import read_boxes
from pipeline.tables.pointing import pointing_rows

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: the coarse set: distractors move like actors of other classes, 16 x 64 x 64 clips
COARSE_SET = [
    "+dataset.distractor_motion=actions",
    "+dataset.distractors=3",
    "+dataset.min_frames=34",
    "+dataset.max_frames=44",
    "model.input.clip_len=16",
]
#: a four-block 3D CNN on the coarse set: its last map is 2 x 4 x 4
COARSE_CNN = [*COARSE_SET, "+model.net.strides=[[1,2,2],[2,2,2],[2,2,2],[2,2,2]]", "train.epochs=10"]
#: a tiny VideoMAE (HF VideoMAEForVideoClassification: tubelets of 2 x 8 x 8, so a 4 x 8 x 8 token grid for
#: 8 x 64 x 64 clips; two blocks of width 64, tokens mean-pooled) trained from scratch on the demo's set. Every
#: fourth frame: the disc's motion between two frames of a tubelet must be large enough for a model this small
#: to learn it in 40 epochs (with every second frame it stays at chance)
TINY_VIDEOMAE = [
    "model=videomae_b",
    "model.net.num_labels=4",
    "+model.net.patch_size=8",
    "+model.net.hidden_size=64",
    "+model.net.num_hidden_layers=2",
    "+model.net.num_attention_heads=4",
    "+model.net.intermediate_size=128",
    "model.layer=videomae.encoder.layer.1",
    "model.fusion_layers=[videomae.encoder.layer.0,videomae.encoder.layer.1]",
    "model.input.clip_len=8",
    "model.input.frame_stride=4",
    "model.input.short_side=64",
    "model.input.size=[64,64]",
    "model.input.mean=[0.45,0.45,0.45]",
    "model.input.std=[0.225,0.225,0.225]",
    "train.lr=0.001",
    "train.epochs=40",
]
#: each method's settings (conf/method), by the name the tables give it
METHODS = {
    "cam": ["method=cam"],
    "gradcam": ["method=gradcam"],
    "gradcampp": ["method=gradcampp"],
    "layercam": ["method=layercam"],
    "scorecam": ["method=scorecam", "method.batch_size=64"],
    "fusion": ["method=fusion"],
    "rollout": ["method=rollout"],
    "gradrollout": ["method=gradrollout"],
}
#: both evaluate protocols, each with its own defaults (blur baseline and 10 steps; Li et al.'s 16 x 16 cells
#: faded to zero in 128 steps)
PROTOCOLS = (Project(steps=10, baseline="blur", blur_sigma=5.0), Li2021(steps=128, cells=16))
BATCH, REPEATS = 8, 3
TIMING_THREADS = 1  # as each extract task (extract.torch_threads); two threads on a shared machine time noise


@dataclass(frozen=True)
class Case:
    """One model on one set: its settings, the methods scored and the method times are compared with."""

    title: str
    overrides: list[str]
    methods: list[str]
    reference: str = "gradcam"
    root: Path | None = None  # outputs under the bench's folder, or here


def settings(root: Path, overrides: list[str]):
    """The project's config (``conf/``) with outputs under ``root``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", *overrides])


def test_clips(cfg) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """The test split's centre clips: index rows, ``[0, 1]`` videos ``(N, 3, T, H, W)`` and crop boxes."""
    records, _ = instantiate(cfg.dataset, split="test").records()
    inp = cfg.model.input
    rows, _ = build_clips(
        records,
        probe_all([r.source for r in records], progress=False),
        CenterSampler(int(inp.clip_len), int(inp.frame_stride)),
    )
    dataset = ClipDataset(rows, ResizeCrop(int(inp.short_side), tuple(inp.size)))
    items = [dataset[i] for i in range(len(dataset))]
    ok = [item for item in items if item["ok"]]
    rows = rows.iloc[[item["position"] for item in ok]].reset_index(drop=True)
    return rows, torch.stack([item["video"] for item in ok]), torch.stack([item["crop_box"] for item in ok])


def layer_of(explainer) -> str:
    """What a method explains: its layer(s), or the attention of every block (the rollouts)."""
    return "every block's attention" if explainer.capture is not None else explainer.layer_name


def score(root: Path, case: Case, quick: bool) -> tuple[list[dict], dict]:
    """Pointing game (both definitions), deletion / insertion AUC under both protocols (and a random tube's)
    and seconds per clip of each method of ``case``."""
    configs = {name: settings(case.root or root, [*case.overrides, *METHODS[name]]) for name in case.methods}
    cfg = next(iter(configs.values()))
    train.run(cfg)  # a cached checkpoint is kept
    net = adapt(build_model(cfg.model), cfg.model)
    rows, videos, crops = test_clips(cfg)
    if quick:
        rows, videos, crops = rows.head(16), videos[:16], crops[:16]
    x_all = Normalise(cfg.model.input.mean, cfg.model.input.std)(videos)
    shape = tuple(x_all.shape[1:])
    explainers = {name: make_explainer(c) for name, c in configs.items()}
    seconds = dict.fromkeys(explainers, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(TIMING_THREADS)
    native = {name: [] for name in explainers}
    targets = []
    for start in range(0, len(x_all), BATCH):
        x = x_all[start : start + BATCH]
        for name, explainer in explainers.items():
            times = []
            for _ in range(REPEATS):  # the fastest of a few runs: load from other processes only adds time
                began = time.perf_counter()
                out = explainer(x, lambda logits: logits.argmax(1, keepdim=True))
                times.append(time.perf_counter() - began)
                if times[-1] > 1.0:  # Score-CAM: one run says enough
                    break
            seconds[name] += min(times)
            native[name].append(out.tubes[:, 0].detach())
        targets.append(out.targets[:, 0])
    torch.set_num_threads(threads)
    targets = torch.cat(targets)
    boxes = read_boxes(instantiate(cfg.dataset, split="test").boxes_path)
    results = []
    with torch.no_grad():
        for name, parts in native.items():
            tubes = torch.cat(parts)
            up = upsample(tubes, shape[1:])
            stats = clip_statistics(up, crops)
            steps = rows.assign(
                method=name,
                target_rank=0,
                crop_box=list(crops.numpy()),
                frame_peak_x=list(stats["frame_peak_x"].numpy()),
                frame_peak_y=list(stats["frame_peak_y"].numpy()),
            )
            hits = pointing_rows(steps, boxes, 0.0)
            row = dict(
                method=name,
                layer=layer_of(explainers[name]),
                grid="x".join(map(str, tubes.shape[1:])),
                pointing=float(hits["hit"].mean()),
                pointing_li2021=float(hits.groupby("label")["hit_li2021"].mean().mean()),
                chance=float(hits["chance"].mean()),
                seconds_per_clip=seconds[name] / len(x_all),
            )
            for protocol in PROTOCOLS:
                generator = torch.Generator().manual_seed(0)
                random = protocol.random_tubes(tubes, shape[1:], generator)
                for prefix, saliency in (("", up), ("random_", random)):
                    deletion, insertion = protocol.curves(net, x_all, saliency, targets, generator)
                    row[f"{prefix}{protocol.name}_deletion"] = float(protocol.auc(deletion).mean())
                    row[f"{prefix}{protocol.name}_insertion"] = float(protocol.auc(insertion).mean())
            results.append(row)
    accuracy = float((targets.numpy() == rows["label"].to_numpy()).mean())
    return results, dict(clips=len(rows), accuracy=accuracy, grid="x".join(map(str, shape[1:])))


def table(results: list[dict], reference: str) -> str:
    base = next((r["seconds_per_clip"] for r in results if r["method"] == reference), None)
    names = " | ".join(f"{p.name} {kind} (random)" for p in PROTOCOLS for kind in ("deletion", "insertion"))
    lines = [
        f"| method | layer(s) | tube | pointing game | pointing li2021 | {names} | ms / clip | time vs {reference} |",
        "| --- | --- | --- | --- | --- | " + "--- | " * 2 * len(PROTOCOLS) + "--- | --- |",
    ]
    for r in results:
        ratio = f"{r['seconds_per_clip'] / base:.2f}x" if base else "-"
        aucs = " | ".join(
            f"{r[f'{p.name}_{kind}']:.3f} ({r[f'random_{p.name}_{kind}']:.3f})"
            for p in PROTOCOLS
            for kind in ("deletion", "insertion")
        )
        lines.append(
            f"| {r['method']} | {r['layer']} | {r['grid']} | {r['pointing']:.1%} | {r['pointing_li2021']:.1%} | "
            f"{aucs} | {1000 * r['seconds_per_clip']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def run(out_dir: Path, quick: bool) -> str:
    root = out_dir / "quality"
    data = [f"dataset.root={root / 'data'}"]
    cases = {
        "coarse": Case(
            "A four-block 3D CNN",
            [*data, f"model.checkpoint={root / 'coarse-4block.pt'}", *COARSE_CNN],
            ["cam", "gradcam", "gradcampp", "layercam", "scorecam", "fusion"],
        ),
        "videomae": Case(
            "A tiny VideoMAE",
            [f"model.checkpoint={root / 'tiny-videomae.pt'}", *TINY_VIDEOMAE],
            ["gradcam", "rollout", "gradrollout"],
            root=Path.cwd(),  # the demo's set (outputs/data)
        ),
        # make demo's own dataset and model (outputs/data, outputs/models)
        "demo": Case("The demo model", [], ["cam", "gradcam", "fusion"], root=Path.cwd()),
    }
    scored = {name: score(root, case, quick) for name, case in cases.items()}
    (out_dir / "quality.json").write_text(json.dumps(scored, indent=2))
    coarse_info = scored["coarse"][1]
    chance = np.mean([r["chance"] for r in scored["coarse"][0]])
    lines = [
        "## Quality: pointing game, deletion / insertion, time per clip",
        "",
        f"Coarse set: {coarse_info['clips']} test clips of {coarse_info['grid']} (distractors move along the class "
        f"directions); chance of the pointing game {chance:.1%}. Pointing game: this project's (hits over every "
        "boxed frame) and Li et al.'s (7/112 of the view around the box, mean of the classes). Deletion / "
        "insertion AUC under both protocols (`evaluate.protocol`); random = that protocol's random tube. "
        f"Target = predicted class; time on {TIMING_THREADS} torch thread, batches of {BATCH}.",
    ]
    for name, case in cases.items():
        results, info = scored[name]
        lines += [
            "",
            f"{case.title} ({info['clips']} test clips of {info['grid']}, test accuracy {info['accuracy']:.1%}):",
            "",
            table(results, case.reference),
        ]
    return "\n".join([*lines, ""])
