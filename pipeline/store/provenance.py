"""What made a run's tubes: the fingerprint of the tube-deciding settings and the hashes that identify a shard.

The fingerprint is stored in every part file's metadata and in the ledger; a run directory never mixes tubes
of two fingerprints. The extract stage also keeps its whole resolved configuration beside them
(``tubes_config.yaml``): the stages after it read what made the tubes from there, and say so when a command's
tube-deciding settings differ from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.store.files import atomic_write, file_metadata
from pipeline.store.run_dir import RunDir

log = logging.getLogger(__name__)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rows_digest(clip_ids: list[str], frame_indices: list[list[int]]) -> str:
    """What identifies a shard's clips: their ids and source frames (stored in each part's metadata)."""
    return digest([[c, [int(i) for i in f]] for c, f in zip(clip_ids, frame_indices)])


def shard_digest(rows: pd.DataFrame) -> str:
    return rows_digest(rows["clip_id"].tolist(), list(rows["frame_indices"]))


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


def save_tubes_config(run_dir: Path, cfg) -> None:
    """Keep the extract command's resolved configuration with the ledger and the parts (atomically)."""
    with atomic_write(RunDir(run_dir).tubes_config) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def recorded_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint the run's tubes were made with: the ledger's, else the first readable part's metadata."""
    try:
        recorded = json.loads((RunDir(run_dir).ledger("extract") / "config.json").read_text()).get("config_hash")
        if recorded:
            return str(recorded)
    except (OSError, ValueError, AttributeError):
        pass
    for part in sorted(RunDir(run_dir).tubes.glob("part-*.parquet")):
        try:
            return file_metadata(part).get("config_hash")
        except (OSError, ValueError):
            continue
    return None


def _flat(tree, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(made: dict, cfg) -> list[str]:
    """The tube-deciding settings in which ``cfg`` differs from ``made`` (a resolved configuration), as
    ``key: made -> command`` lines."""
    now = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    old = _flat({k: made.get(k) for k in FINGERPRINT_KEYS})
    new = _flat({k: now.get(k) for k in FINGERPRINT_KEYS})
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_tubes_made_by(run_dir: Path, cfg, stage: str) -> None:
    """Warn when ``cfg``'s fingerprint is not the one the run's tubes were made with, naming the settings that
    differ; ``stage`` (stats, report) then describes the tubes as they were made (see ``tubes_config.yaml``)."""
    if any(key not in cfg for key in FINGERPRINT_KEYS):  # a tool's settings of the stats and report stages alone
        return
    recorded = recorded_fingerprint(run_dir)
    if recorded is None or recorded == fingerprint(cfg):
        return
    path = RunDir(run_dir).tubes_config
    made = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None
    changed = differences(made, cfg) if made is not None else []
    if made is not None and not changed:
        changed = ["model.checkpoint: same path, other contents than when the tubes were made"]
    log.warning(
        "%s: this command's tube-deciding settings differ from those that made %s's tubes (%s); "
        "the %s stage uses the tubes as they were made (see %s)",
        stage,
        Path(run_dir).name,
        "; ".join(changed) if changed else f"fingerprint {recorded} != {fingerprint(cfg)}",
        stage,
        path if made is not None else RunDir(run_dir).ledger("extract") / "config.json",
    )
