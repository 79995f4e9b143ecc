"""Parts that fail on purpose. A demo network with traps for the cluster tests: a forward pass inside a Dask worker springs one trap
(a ``raise-*`` or ``exit-*`` file in ``trap``) by deleting it, then raises or kills its worker process.

Deleting a file succeeds for exactly one process, so N trap files fail exactly N forward passes, wherever
the workers run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.data.datasets.base import DatasetReader
from pipeline.models import DemoNet3D


class TrappedNet(DemoNet3D):
    def __init__(self, num_classes: int, width: int = 16, trap: str = ""):
        super().__init__(num_classes, width)
        self.trap = Path(trap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dask.distributed import get_worker

        try:
            get_worker()
        except ValueError:  # the driver checking the model: no traps
            return super().forward(x)
        for path in sorted(self.trap.glob("*")):
            try:
                path.unlink()
            except FileNotFoundError:  # another process sprang this one
                continue
            if path.name.startswith("exit"):
                os._exit(1)
            raise RuntimeError(f"trap {path.name} sprang")
        return super().forward(x)


class BrokenReader(DatasetReader):
    """A dataset reader with a bug (it divides by zero): the stand-in for a genuine bug in the pipeline."""

    classes = ["a", "b"]

    def __init__(self, **_):
        pass

    def records(self):
        return [], [1 / 0]
