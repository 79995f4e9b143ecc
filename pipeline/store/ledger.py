"""The run's manifest (``outputs/<run>/manifest.json``): which shards are finished, with how many rows, and
which configuration made them.

Only the driver of the extract stage writes it, after each shard, atomically (temp + fsync + rename), so a
killed run leaves the last consistent record. The part files stay the ground truth: a part published just
before a kill but missing from the manifest is adopted on the next run (its Parquet metadata names the
configuration and clips it was made for). A manifest that cannot be read is set aside (never deleted) and
rebuilt the same way, from the parts' own metadata.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.store.files import atomic_write

log = logging.getLogger(__name__)


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
        data = self._read()
        recorded = data.get("config_hash", config_hash)
        if recorded != config_hash:
            raise ConfigError(
                f"{run_dir} holds tubes made with another configuration (manifest {recorded} != {config_hash}); "
                "choose a new run_name or delete the run directory"
            )
        self.done: dict[int, dict] = {int(k): v for k, v in data.get("done", {}).items()}
        self.failed: dict[int, dict] = {int(k): v for k, v in data.get("failed", {}).items()}

    def _read(self) -> dict:
        """The manifest's record; empty when there is none, or when it cannot be read (then it is moved to
        ``manifest.json.unreadable-<time>`` and the parts it described are adopted again by the extract stage)."""
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in ("done", "failed")):
                raise ValueError("not a manifest of this pipeline")
            for entries in (data.get("done", {}), data.get("failed", {})):
                if not all(str(k).isdigit() and isinstance(v, dict) and "shard_hash" in v for k, v in entries.items()):
                    raise ValueError("a shard entry without its shard_hash")
            return data
        except (ValueError, UnicodeDecodeError) as err:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
            os.replace(self.path, aside)
            log.warning(
                "%s cannot be read (%s); moved to %s, rebuilding it from the parts' own metadata",
                self.path,
                err,
                aside.name,
            )
            return {}

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

    def reopen(self, shard: int) -> None:
        """Forget that a shard is done (its part was set aside): the run computes it again."""
        if self.done.pop(shard, None) is not None:
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


def recorded(run_dir: str | Path, kind: str = "failed") -> dict:
    """The shards the ledger of ``run_dir`` records as ``kind`` (``done`` or ``failed``), read without touching
    the file (nothing when there is no ledger or it cannot be read: the extract stage sets a bad one aside and
    rebuilds it)."""
    path = Path(run_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    entries = data.get(kind) if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}
