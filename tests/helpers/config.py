"""The project's config, composed for tests with outputs under a temporary root."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from pipeline.data.datasets.synthetic import SyntheticSpec

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
#: the small synthetic dataset of the ``synthetic_root`` fixture: 8 train and 8 test videos, 4 classes
SMALL_SPEC = SyntheticSpec(groups=2, clips_per_group=2, test_groups=1, min_frames=24, max_frames=30)


def make_cfg(root: Path, overrides: list[str] = ()):
    """The project's config with outputs under ``root`` (no Hydra run context needed)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", *overrides])
