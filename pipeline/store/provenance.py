"""What made a run's tubes: the fingerprint of the tube-deciding settings and the hashes that identify a shard.

The fingerprint is stored in every part file's metadata and in the ledger; a run directory never mixes tubes
of two fingerprints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_digest(rows: pd.DataFrame) -> str:
    return digest([[c, list(map(int, f))] for c, f in zip(rows["clip_id"], rows["frame_indices"])])


#: config sections that decide what a tube is; a run directory holds tubes of one such configuration
FINGERPRINT_KEYS = ("dataset", "model", "method", "sampler", "target", "store")


def checkpoint_digest(path) -> str | None:
    """SHA-256 of a checkpoint file's bytes (None when there is none): retraining to the same path is a new config."""
    if path is None or not Path(str(path)).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(cfg) -> str:
    """The hash of everything that decides what a tube is: the config sections and the checkpoint's contents."""
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    keyed = {key: resolved.get(key) for key in FINGERPRINT_KEYS}
    keyed["checkpoint_sha256"] = checkpoint_digest(resolved["model"].get("checkpoint"))
    return digest(keyed)
