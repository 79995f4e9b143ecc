"""Parts that fail on purpose. A demo network with traps for the cluster tests: a forward pass inside a Dask worker springs one trap
(a ``raise-*`` or ``exit-*`` file in ``trap``) by deleting it, then raises or kills its worker process.

Deleting a file succeeds for exactly one process, so N trap files fail exactly N forward passes, wherever
the workers run.
"""

from __future__ import annotations

import os
import time
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


class HeldNet(DemoNet3D):
    """A demo network whose first forward pass inside a Dask worker holds its shard mid-run until the test
    lets go: the stand-in for "a job is cancelled / a worker dies / the scheduler goes while a shard runs".

    The pass that claims ``<trap>/hold`` (renamed to ``<trap>/held``, which one process only can do) writes
    ``pid <pid> job <SLURM job id or ->`` into it, then waits until ``<trap>/release`` exists (at most
    ``wait_s``). Every other pass runs as the demo network does.
    """

    def __init__(self, num_classes: int, width: int = 16, trap: str = "", wait_s: float = 120.0):
        super().__init__(num_classes, width)
        self.trap, self.wait_s = Path(trap), wait_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dask.distributed import get_worker

        try:
            get_worker()
        except ValueError:  # the driver checking the model
            return super().forward(x)
        held = self.trap / "held"
        try:
            os.rename(self.trap / "hold", held)
        except FileNotFoundError:  # not held, or held by another pass
            return super().forward(x)
        held.write_text(f"pid {os.getpid()} job {os.environ.get('SLURM_JOB_ID', '-')}\n")
        deadline = time.monotonic() + self.wait_s
        while not (self.trap / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().forward(x)
