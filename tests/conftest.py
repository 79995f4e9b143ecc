"""Shared fixtures: a small synthetic dataset on disk, a random demo-model checkpoint, pipeline overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.config import SMALL_SPEC, small_run
from helpers.deploy import dask_deployment, slurm  # noqa: F401 - fixtures of the cluster tests
from pipeline.data.datasets.synthetic import generate
from pipeline.models import DemoNet3D


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """8 train and 8 test videos of the synthetic dataset (4 classes)."""
    return generate(tmp_path_factory.mktemp("data") / "synthetic", SMALL_SPEC, progress=False)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A Lightning-style checkpoint of a randomly initialised DemoNet3D (weights under ``net.``)."""
    torch.manual_seed(0)
    net = DemoNet3D(num_classes=4)
    for module in net.modules():  # non-trivial BatchNorm statistics, so eval differs from identity
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("models") / "random.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, path)
    return path


@pytest.fixture
def pipeline_overrides(synthetic_root, random_checkpoint) -> list[str]:
    """Overrides that point the pipeline at the small dataset and the random model."""
    return small_run(synthetic_root, random_checkpoint)
