"""The project's config, composed for tests with outputs under a temporary root."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

import pipeline.settings  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from pipeline.data.datasets.synthetic import SyntheticSpec

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
#: the small synthetic dataset of the ``synthetic_root`` fixture: 8 train and 8 test videos, 4 classes
SMALL_SPEC = SyntheticSpec(groups=2, clips_per_group=2, test_groups=1, min_frames=24, max_frames=30)


def make_cfg(root: Path, overrides: list[str] = ()):
    """The project's config with outputs under ``root`` (no Hydra run context needed)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", *overrides])


def small_run(synthetic_root: Path, checkpoint: Path) -> list[str]:
    """Overrides that point the pipeline at the small dataset and a checkpoint: small shards and batches, one
    worker, one gallery clip per class (the ``pipeline_overrides`` fixture, for fixtures of any scope)."""
    return [
        f"dataset.root={synthetic_root}",
        "dataset.generate_if_missing=false",
        f"model.checkpoint={checkpoint}",
        "index.clips_per_shard=3",
        "extract.batch_size=2",
        "cluster.n_workers=1",
        "report.clips_per_class=1",
    ]
