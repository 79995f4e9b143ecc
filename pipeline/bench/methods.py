"""Benchmark of the CAM family: speed against forward-only and against the peers, stored bytes and peak memory
(the extract stage end to end against the loop a user writes is :mod:`pipeline.bench.e2e`).

Every figure comes from the same clips in one process (peak memory: one fresh process per measurement, so
that each high-water mark is its own). The peers get their target classes computed beforehand (not timed),
which favours them: this project picks the targets inside its one forward pass.

``python -m pipeline.bench methods [--quick]``; ``python -m pipeline.bench.methods --peak MODEL METHOD BATCH``
measures one peak (used by the benchmark itself).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import pipeline.settings  # noqa: F401  (registers the settings schema Hydra composes with)
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.fusion import Combiner
from pipeline.explain.methods import CAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from pipeline.explain.upsample import upsample
from pipeline.models import DemoNet3D
from pipeline.store import dequantise, quantise

#: model label -> (builder, explained layer, classifier, fusion layers, clip shape (3, T, H, W))
MODELS = {
    "r3d_18": (
        lambda: __import__("torchvision").models.video.r3d_18(num_classes=400),
        "layer4",
        "fc",
        ["layer3", "layer4"],
        (3, 16, 112, 112),
    ),
    "demo": (
        lambda: DemoNet3D(num_classes=4),
        "features",
        "fc",
        ["features.block2", "features.block3"],
        (3, 8, 64, 64),
    ),
}
OURS = {
    "cam": CAM,
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
}
#: Score-CAM scores one masked clip per channel (512 for r3d_18's layer4): it is timed on the demo model only
SCORECAM_MODELS = {"demo"}


def _paired(fn, forward, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and the median of its per-round ratio to ``forward``, the two run back to back
    in every round, so that load from other processes hits both alike."""
    seconds, ratios = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        forward()
        middle = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - middle)
        ratios.append(seconds[-1] / (middle - started))
    return statistics.median(seconds), statistics.median(ratios)


def _build(label: str):
    builder, layer, classifier, fusion_layers, shape = MODELS[label]
    torch.manual_seed(0)
    return builder().eval(), layer, classifier, fusion_layers, shape


def _ours(net, name: str, layer: str, classifier: str, fusion_layers, shape):
    """A callable explaining a batch the way the extract stage does (cam under inference_mode)."""
    if name == "fusion":  # Grad-CAM on the fusion layers, their tubes multiplied
        method, layer, combiner = GradCAM(), fusion_layers, Combiner("product")
    else:
        method, combiner = OURS[name](), None
    explainer = TubeExplainer(net, method, shape, layer=layer, classifier=classifier, combiner=combiner)
    pred = lambda logits: logits.argmax(1, keepdim=True)

    def run(x):
        if method.needs_grad:
            return explainer(x, pred).tubes
        with torch.inference_mode():
            return explainer(x, pred).tubes

    return run


class _OneBackwardPerTarget(TubeExplainer):
    """Top-k the way the explainer did before: one ``autograd.grad`` per target with ``retain_graph``."""

    def _gradients(self, logits, outputs, targets):
        flat = [part for parts in outputs for part in parts]  # per layer, per pathway, as the explainer's
        inputs = [part.tensor for part in flat]
        k = targets.shape[1]
        per_target = [
            torch.autograd.grad(logits.gather(1, targets[:, j : j + 1]).sum(), inputs, retain_graph=j < k - 1)
            for j in range(k)
        ]
        grads = iter(
            [
                part.as_ncthw(torch.stack([g[i] for g in per_target])).movedim(0, 1).float()
                for i, part in enumerate(flat)
            ]
        )
        return [[next(grads) for _ in parts] for parts in outputs]


def _topk_explainers(net, layer: str, shape) -> dict:
    """Gradients of 3 targets per clip: one batched backward (``is_grads_batched``) vs 3 backwards."""
    return {
        "gradcam top-3: one batched backward": TubeExplainer(net, GradCAM(), shape, layer=layer),
        "gradcam top-3: 3 backward calls": _OneBackwardPerTarget(net, GradCAM(), shape, layer=layer),
    }


def _peers(net, layer: str, classifier: str, shape):
    """Callables of the peers as shipped, given the targets: Captum LayerGradCam + trilinear upsampling,
    pytorch-grad-cam GradCAM (min-max scaling, resize to the clip), torch-cam CAM."""
    from captum.attr import LayerAttribution, LayerGradCam
    from pytorch_grad_cam import GradCAM as PgcGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.methods import CAM as TorchCamCAM

    net = copy.deepcopy(net).requires_grad_(True)  # a user's model, as it comes out of training
    module = net.get_submodule(layer)
    captum = LayerGradCam(net, module)

    def captum_run(x, targets):
        maps = captum.attribute(x, target=targets, relu_attributions=True)
        return LayerAttribution.interpolate(maps, shape[1:], interpolate_mode="trilinear")

    def pgc_run(x, targets):
        with PgcGradCAM(model=net, target_layers=[module]) as cam:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])

    def torchcam_run(x, targets):
        extractor = TorchCamCAM(net, target_layer=layer, fc_layer=classifier, input_shape=shape)
        try:
            with torch.no_grad():
                scores = net(x)
            return extractor(class_idx=targets.tolist(), scores=scores)
        finally:
            extractor.remove_hooks()

    return {
        "Captum LayerGradCam + trilinear": captum_run,
        "pytorch-grad-cam GradCAM": pgc_run,
        "torch-cam CAM": torchcam_run,
    }


def speed(label: str, batch: int, repeats: int) -> list[dict]:
    """Seconds per batch of every method and peer, and the ratio to forward-only (paired rounds)."""
    net, layer, classifier, fusion_layers, shape = _build(label)
    torch.manual_seed(1)
    x = torch.randn(batch, *shape)
    with torch.no_grad():  # not inference_mode: the peers use the targets under autograd
        targets = net(x).argmax(1)

    def forward_only():
        with torch.inference_mode():
            net(x)

    forward_only()  # warm-up: allocator, kernels
    runs = {"forward only": forward_only}
    for name in [*OURS, "fusion"]:
        if name != "scorecam" or label in SCORECAM_MODELS:
            explain = _ours(net, name, layer, classifier, fusion_layers, shape)
            runs[f"this project: {name}"] = lambda explain=explain: explain(x)
    for peer, run_peer in _peers(net, layer, classifier, shape).items():
        runs[peer] = lambda run_peer=run_peer: run_peer(x.clone(), targets)
    for what, explainer in _topk_explainers(net, layer, shape).items():
        runs[what] = lambda explainer=explainer: explainer(x, lambda logits: logits.topk(3, dim=1).indices)
    rows = []
    for what, fn in runs.items():
        seconds, ratio = _paired(fn, forward_only, repeats)
        rows.append(dict(model=label, what=what, batch=batch, seconds=seconds, ratio=ratio))
    return rows


def _peak_in_subprocess(label: str, what: str, batch: int) -> dict:
    # a fixed mmap threshold: large tensors are mapped and unmapped, so the resident set follows them
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.methods", "--peak", label, what, str(batch)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak(label: str, what: str, batch: int) -> dict:
    """Peak resident memory (MiB) of one pass of ``what`` above the resident set just before it (model, clips
    and a first pass already done), sampled every millisecond."""
    net, layer, classifier, fusion_layers, shape = _build(label)
    x = torch.randn(batch, *shape)
    if what == "forward":

        def run():
            with torch.inference_mode():
                net(x)
    elif what in OURS or what == "fusion":
        explain = _ours(net, what, layer, classifier, fusion_layers, shape)

        def run():
            explain(x)
    else:
        targets = torch.zeros(batch, dtype=torch.long)
        peer = _peers(net, layer, classifier, shape)[what]

        def run():
            peer(x.clone(), targets)

    run()  # warm-up, then measure the second pass
    gc.collect()
    before = _resident_mib()
    highest, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            highest[0] = max(highest[0], _resident_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return dict(
        model=label, what=what, batch=batch, baseline_mib=before, extra_mib=max(highest[0], _resident_mib()) - before
    )


def storage(label: str, batch: int) -> dict:
    """Bytes of one stored tube (float16 at the layer's resolution + its float32 scale) against the float32
    volume upsampled to the clip that the peers hand out, and the error of decoding back to that volume."""
    net, layer, classifier, _, shape = _build(label)
    torch.manual_seed(1)
    x = torch.randn(batch, *shape)
    tubes = _ours(net, "gradcam", layer, classifier, None, shape)(x)[:, 0]
    stored, scale = quantise(tubes, "float16")
    decoded = upsample(dequantise(stored, scale), shape[1:])
    reference = upsample(tubes, shape[1:])
    peak_value = reference.flatten(1).abs().amax(1).clamp(min=1e-12)
    error = ((decoded - reference).flatten(1).abs().amax(1) / peak_value).max().item()
    tube_bytes = stored[0].numel() * stored.element_size() + 4
    volume_bytes = int(np.prod(shape[1:])) * 4
    return dict(
        model=label,
        native=list(tubes.shape[1:]),
        tube_bytes=tube_bytes,
        volume_bytes=volume_bytes,
        ratio=volume_bytes / tube_bytes,
        error=error,
    )


def run(out_dir: Path, quick: bool) -> str:
    repeats = 1 if quick else 2
    batch = 2 if quick else 8
    speed_rows = [row for label in MODELS for row in speed(label, batch, repeats)]
    peaks = []
    for label in MODELS:
        for what in (
            "forward",
            "cam",
            "gradcam",
            "layercam",
            "Captum LayerGradCam + trilinear",
            "pytorch-grad-cam GradCAM",
        ):
            peaks.append(_peak_in_subprocess(label, what, batch))
    stores = [storage(label, batch) for label in MODELS]
    (out_dir / "methods.json").write_text(json.dumps(dict(speed=speed_rows, peak=peaks, storage=stores), indent=1))

    lines = [
        f"## Saliency methods (`methods`)\n\nBatch {batch}, random weights, r3d_18 at 16x112x112, demo model at 8x64x64; {repeats} rounds, each "
        "runs forward-only and the method back to back; medians of the seconds and of the per-round ratios.\n"
    ]
    lines += ["| model | what | s / batch | x forward-only |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['what']} | {r['seconds']:.3f} | {r['ratio']:.2f} |" for r in speed_rows]
    forward_peak = {p["model"]: p["extra_mib"] for p in peaks if p["what"] == "forward"}
    lines += ["", "Peak memory of one batch above the loaded model and clips (resident set, fresh process each):", ""]
    lines += ["| model | what | extra MiB | x forward-only |", "|---|---|---:|---:|"]
    lines += [
        f"| {p['model']} | {p['what']} | {p['extra_mib']:.0f} | {p['extra_mib'] / max(forward_peak[p['model']], 1e-9):.2f} |"
        for p in peaks
    ]
    lines += [
        "",
        "Stored tube (float16 at the layer's resolution + float32 scale) vs the peers' float32 upsampled volume:",
        "",
    ]
    lines += [
        "| model | native t x h x w | bytes / tube | bytes / fp32 volume | ratio | max decode error (of peak) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s['model']} | {'x'.join(map(str, s['native']))} | {s['tube_bytes']} | {s['volume_bytes']} | 1/{s['ratio']:.0f} | {s['error']:.1e} |"
        for s in stores
    ]
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.methods")
    parser.add_argument("--peak", nargs=3, metavar=("MODEL", "WHAT", "BATCH"), required=True)
    args = parser.parse_args()
    label, what, batch = args.peak
    print(json.dumps(peak(label, what, int(batch))))


if __name__ == "__main__":
    _main()
