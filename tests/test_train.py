"""stage=train fits any model through its interface settings: a HuggingFace VideoMAE as well as the demo CNN."""

from __future__ import annotations

import pytest
import torch

from helpers.config import make_cfg
from pipeline.models import build_model
from pipeline.models.adapters import adapt
from pipeline.stages import train

pytest.importorskip("transformers")

#: a VideoMAE small enough to train for an epoch in seconds: tubelets of 2 x 16 x 16 on 8 x 32 x 32 clips
TINY_VIDEOMAE = [
    "model=videomae_b",
    "model.net.num_labels=4",
    "+model.net.patch_size=16",
    "+model.net.hidden_size=32",
    "+model.net.num_hidden_layers=1",
    "+model.net.num_attention_heads=2",
    "+model.net.intermediate_size=64",
    "model.layer=videomae.encoder.layer.0",
    "model.input.clip_len=8",
    "model.input.frame_stride=2",
    "model.input.short_side=32",
    "model.input.size=[32,32]",
    "train.epochs=1",
    "train.clips_per_video=1",
    "train.batch_size=4",
]


def test_train_fits_a_transformer_and_saves_weights_the_model_loads(tmp_path, synthetic_root):
    checkpoint = tmp_path / "tiny-videomae.pt"
    cfg = make_cfg(
        tmp_path,
        [f"dataset.root={synthetic_root}", "dataset.generate_if_missing=false", f"model.checkpoint={checkpoint}"]
        + TINY_VIDEOMAE,
    )
    result = train.run(cfg)
    assert result.clips == 8 and 0.0 <= result.figures["test_accuracy"] <= 1.0
    trained = adapt(build_model(cfg.model), cfg.model)  # the saved weights load strictly into the config's model
    untrained = cfg.copy()
    untrained.model.checkpoint = None
    seeded = adapt(build_model(untrained.model), untrained.model)
    clip = torch.rand(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert trained(clip).shape == (2, 4)
        assert not torch.allclose(trained(clip), seeded(clip))  # training moved the weights
    stamp = checkpoint.stat().st_mtime_ns
    assert not train.run(cfg).figures and checkpoint.stat().st_mtime_ns == stamp  # a checkpoint is kept
