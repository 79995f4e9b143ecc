"""The LightningModule of the extract stage: ``predict_step`` = forward + tubes + per-clip statistics."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from pipeline.data.clips import ClipBatch, transform_batch
from pipeline.data.resize import ResizeCrop
from pipeline.errors import ConfigError
from pipeline.explain.clipstats import clip_statistics
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.upsample import upsample
from pipeline.models.inputs import Normalise
from pipeline.runtime.job import TARGET_MODES, Prediction
from pipeline.store import dequantise, quantise


class TubeModule(pl.LightningModule):
    """Explains batches of clips.

    Args:
        explainer: the model, layer and method.
        mean, std: per-channel normalisation applied on the device to ``[0, 1]`` clips.
        target: ``pred`` (the predicted class), ``label`` (the clip's true class) or ``topk`` (the ``k``
            highest-scoring classes, sharing one forward pass).
        k: number of classes for ``target=topk``.
        codec: the store codec; tubes are encoded here and statistics computed on the decoded tube.
        labels: ``(num_clips,)`` true labels of the shard's clips (-1 = unknown), needed for ``target=label``.
        transform: the resize / crop of batches that carry raw uint8 ``frames`` (resized on the device).
        batches_owned: the batches' clips are this module's to overwrite (a DataLoader that builds every batch
            afresh, as the extract stage's does): they are normalised in place, with no clip-sized tensor
            allocated. False for batches that may be handed over again.
    """

    def __init__(
        self,
        explainer: TubeExplainer,
        mean,
        std,
        target: str = "pred",
        k: int = 1,
        codec: str = "float16",
        labels: torch.Tensor | None = None,
        transform: ResizeCrop | None = None,
        batches_owned: bool = False,
    ):
        super().__init__()
        if target not in TARGET_MODES:
            raise ConfigError(f"target.mode must be one of {TARGET_MODES}, got {target!r}")
        self.explainer = explainer
        self.normalise = Normalise(mean, std)
        self.target, self.k, self.codec = target, (int(k) if target == "topk" else 1), codec
        self.labels = labels
        self.transform, self.batches_owned = transform, batches_owned

    def _selector(self, positions: torch.Tensor):
        if self.target == "pred":
            return lambda logits: logits.argmax(1, keepdim=True)
        if self.target == "topk":
            return lambda logits: logits.topk(min(self.k, logits.shape[1]), dim=1).indices
        labels = self.labels[positions.cpu()].to(self.device)[:, None]
        return lambda logits: labels

    def predict_step(self, batch: ClipBatch, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        with torch.autocast(self.device.type, enabled=False):  # the input in float32, whatever the precision
            video = transform_batch(batch, self.transform)
            if video is None:
                return Prediction(positions=batch.positions, failures=batch.failures)
            # a batch resized here is always new; the [0, 1] clips are not read after this
            x = self.normalise(video, in_place=self.batches_owned or video is not batch.video)
        explanation = self.explainer(x, self._selector(batch.positions))
        n, k = explanation.targets.shape
        stored, scale = quantise(explanation.tubes, self.codec)
        decoded = dequantise(stored, scale)
        size = tuple(x.shape[2:])
        up = upsample(decoded.reshape(n * k, *decoded.shape[2:]), size)
        stats = clip_statistics(up, batch.crop_box.repeat_interleave(k, dim=0))
        layer_tubes = None  # method=fusion: each fused layer's own tube, stored beside the fused one
        if explanation.layer_tubes is not None:
            layer_tubes = [tuple(v.cpu() for v in quantise(tube, self.codec)) for tube in explanation.layer_tubes]
        probs = explanation.logits.softmax(1)
        pred_prob, pred = probs.max(1)
        return Prediction(
            positions=batch.positions.cpu(),
            failures=batch.failures,
            crop_box=batch.crop_box.cpu(),
            input_size=size,
            targets=explanation.targets.cpu(),
            target_logit=explanation.logits.gather(1, explanation.targets).cpu(),
            target_prob=probs.gather(1, explanation.targets).cpu(),
            pred=pred.cpu(),
            pred_prob=pred_prob.cpu(),
            tubes=stored.cpu(),
            scale=scale.cpu(),
            layer_tubes=layer_tubes,
            stats={name: value.cpu() for name, value in stats.items()},
        )
