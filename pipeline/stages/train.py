"""Train stage: fit ``model.net`` on the dataset's train split with Lightning and save ``model.checkpoint``.

This is how the demo model comes to exist (a few seconds on 2 CPU cores); a checkpoint that already exists is
kept. It decodes the training clips once into memory, so it suits small datasets like the synthetic one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from pipeline.data.clip_index import build_clips
from pipeline.data.clips import ClipDataset
from pipeline.data.probing import probe_all
from pipeline.data.resize import ResizeCrop
from pipeline.data.sampling import CenterSampler, UniformSampler
from pipeline.models.adapters import adapt
from pipeline.models.inputs import Normalise
from pipeline.runtime.builders import quiet_lightning
from pipeline.stages.result import StageResult
from pipeline.store import atomic_write

log = logging.getLogger(__name__)


class Classifier(pl.LightningModule):
    """Cross-entropy training of a clip classifier on ``[0, 1]`` clips normalised on the device; ``net`` is
    seen through the model's interface settings (:func:`~pipeline.models.adapters.adapt`: input layout, pathways,
    where the logits are), so any ``model=`` option trains, a HuggingFace transformer as well as a 3D CNN."""

    def __init__(self, net: torch.nn.Module, model_cfg, lr: float, epochs: int):
        super().__init__()
        self.net, self.lr, self.epochs = adapt(net, model_cfg).train(), lr, epochs
        self.normalise = Normalise(model_cfg.input.mean, model_cfg.input.std)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(video))

    def training_step(self, batch, batch_idx):
        video, label = batch
        loss = F.cross_entropy(self(video), label)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        steps = self.trainer.estimated_stepping_batches
        return dict(
            optimizer=optimizer,
            lr_scheduler=dict(
                scheduler=torch.optim.lr_scheduler.OneCycleLR(optimizer, self.lr, total_steps=steps), interval="step"
            ),
        )


def load_clips(cfg, split: str, sampler) -> TensorDataset:
    """Decode every clip of a split into memory as (video float16, label)."""
    reader = instantiate(cfg.dataset, split=split)
    records, _ = reader.records()
    frame, failures = build_clips(records, probe_all([r.source for r in records], progress=False), sampler)
    if failures:
        log.warning("%d %s videos skipped: %s", len(failures), split, failures[0]["message"])
    dataset = ClipDataset(frame, ResizeCrop(int(cfg.model.input.short_side), tuple(cfg.model.input.size)))
    items = [item for item in (dataset[i] for i in range(len(dataset))) if item["ok"]]
    videos = torch.stack([item["video"] for item in items]).half()
    labels = torch.tensor(frame["label"].to_numpy()[[item["position"] for item in items]], dtype=torch.long)
    return TensorDataset(videos, labels)


def evaluate(model: Classifier, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(v).argmax(1) for v, _ in DataLoader(data, batch_size=32)])
    return float((preds == data.tensors[1]).float().mean())


def run(cfg, run_dir=None, client=None) -> dict:
    checkpoint = Path(cfg.model.checkpoint)
    if checkpoint.is_file():
        log.info("model: %s exists, not retraining", checkpoint)
        return StageResult("train")
    quiet_lightning()
    pl.seed_everything(int(cfg.train.seed), verbose=False)
    inp = cfg.model.input
    train = load_clips(
        cfg, "train", UniformSampler(int(inp.clip_len), int(inp.frame_stride), num_clips=int(cfg.train.clips_per_video))
    )
    test = load_clips(cfg, "test", CenterSampler(int(inp.clip_len), int(inp.frame_stride)))
    net = instantiate(cfg.model.net)
    model = Classifier(net, cfg.model, float(cfg.train.lr), int(cfg.train.epochs))
    trainer = pl.Trainer(
        max_epochs=int(cfg.train.epochs),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, DataLoader(train, batch_size=int(cfg.train.batch_size), shuffle=True))
    accuracy = dict(train=evaluate(model, train), test=evaluate(model, test))
    with atomic_write(checkpoint) as tmp:
        torch.save(net.state_dict(), tmp)
    log.info(
        "model: trained on %d clips, accuracy train %.3f test %.3f -> %s",
        len(train),
        accuracy["train"],
        accuracy["test"],
        checkpoint,
    )
    print(f"model trained: accuracy train {accuracy['train']:.1%}, test {accuracy['test']:.1%} (saved to {checkpoint})")
    return StageResult("train", clips=len(train), figures={f"{k}_accuracy": v for k, v in accuracy.items()})
