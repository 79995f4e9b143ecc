"""The run's manifest (``outputs/<run>/manifest.json``): which shards are finished, with how many rows, and
which configuration made them.

Only the driver of the extract stage writes it, after each shard, atomically (temp + fsync + rename), so a
killed run leaves the last consistent record. The part files stay the ground truth: a part published just
before a kill but missing from the manifest is adopted on the next run (its Parquet metadata names the
configuration and clips it was made for).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.store.files import atomic_write


class Ledger:
    """The ledger: finished and failed shards of one run directory.

    Args:
        run_dir: ``outputs/<run_name>``.
        config_hash: the fingerprint of the configuration this run is for.

    Raises:
        RuntimeError: the run directory records another configuration.
    """

    def __init__(self, run_dir: Path, config_hash: str):
        self.path = Path(run_dir) / "manifest.json"
        self.config_hash = config_hash
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        recorded = data.get("config_hash", config_hash)
        if recorded != config_hash:
            raise ConfigError(
                f"{run_dir} holds tubes made with another configuration (manifest {recorded} != {config_hash}); "
                "choose a new run_name or delete the run directory"
            )
        self.done: dict[int, dict] = {int(k): v for k, v in data.get("done", {}).items()}
        self.failed: dict[int, dict] = {int(k): v for k, v in data.get("failed", {}).items()}

    def is_done(self, shard: int, shard_hash: str) -> bool:
        entry = self.done.get(shard)
        return entry is not None and entry["shard_hash"] == shard_hash

    def finish(self, shard: int, shard_hash: str, **record) -> None:
        """Record a published shard (``rows``, ``clips``, ``failures``, ``seconds``, ...)."""
        self.done[shard] = dict(
            shard_hash=shard_hash, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record
        )
        self.failed.pop(shard, None)
        self.save()

    def fail(self, shard: int, shard_hash: str, error: str) -> None:
        """Record a shard that failed after its retries (a later run tries it again)."""
        attempts = self.failed.get(shard, {}).get("runs", 0) + 1
        self.failed[shard] = dict(shard_hash=shard_hash, error=error, runs=attempts)
        self.done.pop(shard, None)
        self.save()

    def forget(self, keep: set[int]) -> None:
        """Drop shards the index no longer has."""
        self.done = {s: v for s, v in self.done.items() if s in keep}
        self.failed = {s: v for s, v in self.failed.items() if s in keep}
        self.save()

    def save(self) -> None:
        data = dict(
            config_hash=self.config_hash,
            done={str(k): v for k, v in sorted(self.done.items())},
            failed={str(k): v for k, v in sorted(self.failed.items())},
        )
        with atomic_write(self.path) as tmp:
            tmp.write_text(json.dumps(data, indent=1))
