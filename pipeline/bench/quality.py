"""Quality benchmark: does a method point at what the network used, and what does it cost?

On a synthetic set where the distractors move too (each along one of the class directions, so only the red
disc's motion tells the class: :mod:`pipeline.data.datasets.synthetic` with ``distractor_motion=actions``) a
coarse 3D CNN is trained (the demo network with four blocks: its last map is 2 x 4 x 4 for 16 x 64 x 64 clips;
trained once by ``stage=train``'s code and cached under ``<out>/quality/``). For every method the test clips'
tubes (predicted class) are scored by

- the pointing game of ``stage=stats`` (:func:`pipeline.stages.stats.pointing_rows`): does each time step's peak
  fall in the disc's box;
- deletion and insertion AUC of ``stage=evaluate``'s maths (:mod:`pipeline.explain.faithfulness`, blur baseline,
  10 steps) against a random tube of the method's own resolution;
- time per clip of the explainer (forward, backward where needed, the tube) on one torch thread, as an extract
  task runs by default: per batch the fastest of three runs, the methods interleaved batch by batch so that load
  from other processes hits all alike.

The demo's own set and model (``make demo``'s; trained here if missing) are scored the same way for ``cam`` and
``fusion``. ``python -m pipeline.bench quality [--quick]``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pipeline.data.clip_index import build_clips
from pipeline.data.clips import ClipDataset
from pipeline.data.probing import probe_all
from pipeline.data.sampling import CenterSampler
from pipeline.data.video import ResizeCrop
from pipeline.explain import faithfulness as fm
from pipeline.explain.clipstats import clip_statistics
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.fusion import explainer_options
from pipeline.explain.methods import CAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from pipeline.explain.upsample import upsample
from pipeline.models import build_model
from pipeline.models.inputs import Normalise
from pipeline.stages import train
from pipeline.stages.stats import pointing_rows
from pipeline.store import read_boxes

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: the coarse set and model: distractors move like actors of other classes; four blocks, last map 2 x 4 x 4
COARSE = [
    "+dataset.distractor_motion=actions",
    "+dataset.distractors=3",
    "+dataset.min_frames=34",
    "+dataset.max_frames=44",
    "model.input.clip_len=16",
    "+model.net.strides=[[1,2,2],[2,2,2],[2,2,2],[2,2,2]]",
    "train.epochs=10",
]
METHODS = {
    "cam": CAM,
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "layercam": LayerCAM,
    "scorecam": lambda: ScoreCAM(batch_size=64),
    "fusion": lambda: instantiate(settings(Path.cwd(), ["method=fusion"]).method),  # conf/method/fusion.yaml
}
STEPS, BLUR_SIGMA, BATCH, REPEATS = 10, 5.0, 8, 3
TIMING_THREADS = 1  # as each extract task (extract.torch_threads); two threads on a shared machine time noise


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


def score(cfg, methods: dict, quick: bool) -> tuple[list[dict], dict]:
    """Pointing game, deletion / insertion AUC (and the random tube's) and seconds per clip of each method."""
    train.run(cfg)  # a cached checkpoint is kept
    net = build_model(cfg.model)
    rows, videos, crops = test_clips(cfg)
    if quick:
        rows, videos, crops = rows.head(16), videos[:16], crops[:16]
    x_all = Normalise(cfg.model.input.mean, cfg.model.input.std)(videos)
    shape = tuple(x_all.shape[1:])
    explainers = {
        name: TubeExplainer(net, input_shape=shape, layout=cfg.model.layout, **explainer_options(make()))
        for name, make in methods.items()
    }
    seconds = dict.fromkeys(methods, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(TIMING_THREADS)
    native = {name: [] for name in methods}
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
    generator = torch.Generator().manual_seed(0)
    base = fm.baseline_clip(x_all, "blur", BLUR_SIGMA)
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
                layer=explainers[name].layer_name,
                grid="x".join(map(str, tubes.shape[1:])),
                pointing=float(hits["hit"].mean()),
                chance=float(hits["chance"].mean()),
                seconds_per_clip=seconds[name] / len(x_all),
            )
            random_up = upsample(torch.rand(tubes.shape, generator=generator), shape[1:])
            for prefix, saliency in (("", up), ("random_", random_up)):
                deletion, insertion = fm.perturbation_curves(
                    net, x_all, base, fm.saliency_order(saliency, generator), targets, STEPS
                )
                row[f"{prefix}deletion_auc"] = float(fm.curve_auc(deletion).mean())
                row[f"{prefix}insertion_auc"] = float(fm.curve_auc(insertion).mean())
            results.append(row)
    accuracy = float((targets.numpy() == rows["label"].to_numpy()).mean())
    return results, dict(clips=len(rows), accuracy=accuracy, grid="x".join(map(str, shape[1:])))


def table(results: list[dict], reference: str = "gradcam") -> str:
    base = next((r["seconds_per_clip"] for r in results if r["method"] == reference), None)
    lines = [
        "| method | layer(s) | tube | pointing game | deletion AUC (random) | insertion AUC (random) | ms / clip | "
        f"time vs {reference} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ratio = f"{r['seconds_per_clip'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {r['method']} | {r['layer']} | {r['grid']} | {r['pointing']:.1%} | {r['deletion_auc']:.3f} "
            f"({r['random_deletion_auc']:.3f}) | {r['insertion_auc']:.3f} ({r['random_insertion_auc']:.3f}) | "
            f"{1000 * r['seconds_per_clip']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def run(out_dir: Path, quick: bool) -> str:
    root = out_dir / "quality"
    coarse = settings(
        root,
        [
            f"dataset.root={root / 'data'}",
            f"model.checkpoint={root / 'coarse-4block.pt'}",
            *COARSE,
        ],
    )
    coarse_results, coarse_info = score(coarse, METHODS, quick)
    demo = settings(Path.cwd(), [])  # make demo's own dataset and model (outputs/data, outputs/models)
    demo_results, demo_info = score(demo, {k: METHODS[k] for k in ("cam", "gradcam", "fusion")}, quick)
    (out_dir / "quality.json").write_text(
        json.dumps(dict(coarse=[coarse_results, coarse_info], demo=[demo_results, demo_info]), indent=2)
    )
    chance = np.mean([r["chance"] for r in coarse_results])
    return "\n".join(
        [
            "## Quality: pointing game, deletion / insertion, time per clip",
            "",
            f"Coarse set: {coarse_info['clips']} test clips of {coarse_info['grid']} (distractors move along the "
            f"class directions), a four-block 3D CNN (test accuracy {coarse_info['accuracy']:.1%}); chance of the "
            f"pointing game {chance:.1%}. Blur baseline, {STEPS} steps; random = a random tube of the method's "
            f"own resolution; target = predicted class; time on {TIMING_THREADS} torch thread, batches of {BATCH}.",
            "",
            table(coarse_results),
            "",
            f"Demo set and model ({demo_info['clips']} clips of {demo_info['grid']}, test accuracy "
            f"{demo_info['accuracy']:.1%}):",
            "",
            table(demo_results),
            "",
        ]
    )
