"""The ledger of a sharded stage (extract, evaluate): which shards are finished, with what, and which failed.

``ledger/<stage>/`` holds one journal per driver: ``all.jsonl`` for a driver of every shard, ``share-I-of-N.jsonl``
for one share of a SLURM array. A driver appends one JSON line per finished or failed shard (one ``write`` on an
append-only file: the cost per shard does not grow with the run), and when it opens the ledger it reads every
journal of the stage (the latest line of a shard wins) and rewrites its own, compacted. Only the driver holding the
journal's lock (:mod:`pipeline.runtime.lock`) writes it, so array tasks finishing together lose no entry.

The part files stay the ground truth: a part published just before a kill but missing from the ledger (or whose
line was cut short) is adopted by the next run from its own Parquet metadata. A journal with an unreadable line
inside it is set aside (``*.unreadable-<time>``, never deleted) and its shards' parts adopted the same way.
``config.json`` pins the fingerprint of the configuration the stage's outputs were made with (extract);
``shares.json`` the share count of a SLURM array, fixed when the array first runs on the folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.store.files import atomic_write
from pipeline.store.run_dir import RunDir

log = logging.getLogger(__name__)

ALL = "all"


@dataclass
class Entry:
    """One journal line: the state of one shard. ``digest`` names the work it was done for (its clips and the
    stage's settings); ``bytes`` the published parts' size, checked against the folder's listing when planning."""

    shard: int
    state: str  # done | failed | open
    digest: str
    time_ns: int = field(default_factory=time.time_ns)
    rows: int = 0
    clips: int = 0
    failures: int = 0
    seconds: float = 0.0
    bytes: int | None = None
    runs: int = 0
    error: str | None = None
    adopted: bool = False

    @classmethod
    def parse(cls, line: str) -> Entry:
        data = json.loads(line)
        if not isinstance(data, dict) or data.get("state") not in ("done", "failed", "open"):
            raise ValueError("not a ledger line")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def read_journal(path: Path) -> list[Entry]:
    """The entries of one journal; a last line cut short (a kill mid-write) is ignored.

    Raises:
        ValueError: a line before the last cannot be read.
    """
    lines = path.read_text(encoding="utf-8", errors="strict").split("\n")
    entries = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(Entry.parse(line))
        except (ValueError, TypeError, KeyError) as err:
            if i == len(lines) - 1:  # no newline after it: cut short
                break
            raise ValueError(f"line {i + 1}: {err}") from None
    return entries


def read_entries(run: RunDir, stage: str, set_aside: bool = False) -> tuple[dict[int, Entry], dict[str, list[Entry]]]:
    """Every journal of ``stage`` merged (the latest entry of each shard), and each journal's own entries.
    A journal that cannot be read counts as empty (and with ``set_aside`` is moved aside, logged)."""
    merged: dict[int, Entry] = {}
    own: dict[str, list[Entry]] = {}
    folder = run.ledger(stage)
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        try:
            entries = read_journal(path)
        except (OSError, ValueError, UnicodeDecodeError) as err:
            if set_aside:
                aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
                os.replace(path, aside)
                log.warning("%s cannot be read (%s); moved to %s, its parts are adopted again", path, err, aside.name)
            continue
        own[path.stem] = entries
        for entry in entries:
            if entry.shard not in merged or merged[entry.shard].time_ns <= entry.time_ns:
                merged[entry.shard] = entry
    return merged, own


class Ledger:
    """The ledger of one stage as one driver sees it: every journal read, its own journal ``writer`` open for appending.

    Args:
        run: the run folder.
        stage: ``extract`` or ``evaluate``.
        writer: this driver's journal: ``all``, or ``share-I-of-N``.
        config_hash: the fingerprint the stage's outputs must have been made with (None: not checked).

    Raises:
        ConfigError: the folder records another configuration.
    """

    def __init__(self, run: RunDir, stage: str, writer: str = ALL, config_hash: str | None = None):
        self.run, self.stage, self.writer = RunDir(run), stage, writer
        self.folder = self.run.ledger(stage)
        self.folder.mkdir(parents=True, exist_ok=True)
        if config_hash is not None:
            recorded = record_once(self.folder / "config.json", {"config_hash": config_hash}).get("config_hash")
            if recorded != config_hash:
                raise ConfigError(
                    f"{self.run.root} holds {stage} outputs made with another configuration (ledger {recorded} != "
                    f"{config_hash}); choose a new run_name or delete the run directory"
                )
        self.entries, journals = read_entries(self.run, stage, set_aside=True)
        own = journals.get(writer, [])
        mine = {e.shard: e for e in own}
        self.path = self.folder / f"{writer}.jsonl"
        if len(mine) < len(own) or not _ends_a_line(self.path):  # compacted: one line per shard it knows (a line
            # cut short by a kill is dropped, so the next line does not continue it)
            with atomic_write(self.path) as tmp:
                tmp.write_text("".join(_line(e) for e in sorted(mine.values(), key=lambda e: e.shard)))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def done(self) -> dict[int, Entry]:
        return {s: e for s, e in self.entries.items() if e.state == "done"}

    @property
    def failed(self) -> dict[int, Entry]:
        return {s: e for s, e in self.entries.items() if e.state == "failed"}

    def is_done(self, shard: int, digest: str) -> bool:
        entry = self.entries.get(shard)
        return entry is not None and entry.state == "done" and entry.digest == digest

    def _append(self, entry: Entry) -> None:
        self.entries[entry.shard] = entry
        os.write(self._fd, _line(entry).encode())

    def finish(self, shard: int, digest: str, **record) -> None:
        """Record a published shard (``rows``, ``clips``, ``failures``, ``seconds``, ``bytes``, ``adopted``)."""
        self._append(Entry(shard, "done", digest, **record))

    def fail(self, shard: int, digest: str, error: str) -> None:
        """Record a shard that failed after its retries (a later run tries it again)."""
        before = self.entries.get(shard)
        runs = (before.runs if before is not None and before.state == "failed" else 0) + 1
        self._append(Entry(shard, "failed", digest, error=error, runs=runs))

    def reopen(self, shard: int) -> None:
        """Forget that a shard is done (its part was set aside): the run computes it again."""
        before = self.entries.get(shard)
        if before is not None and before.state == "done":
            self._append(Entry(shard, "open", before.digest))


def _ends_a_line(path: Path) -> bool:
    """Whether ``path`` exists and is empty or ends with a newline."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return True
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except FileNotFoundError:
        return False


def _line(entry: Entry) -> str:
    return json.dumps({k: v for k, v in vars(entry).items() if v not in (None, False, 0, 0.0) or k == "shard"}) + "\n"


def record_once(path: Path, value: dict) -> dict:
    """The record at ``path``, written with ``value`` when there is none (atomically: the first of several drivers
    starting at once wins, the others read its record).

    Raises:
        ConfigError: the record cannot be read.
    """
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(value))
        try:
            os.link(tmp, path)  # fails if another driver recorded it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict):
            raise ValueError("not a record of this pipeline")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); delete it to let the next run record it again") from None
    return recorded


def read_ledger(run: str | Path | RunDir, stage: str = "extract", state: str = "failed") -> dict[int, Entry]:
    """The shards the ledger of ``run`` records as ``state`` (done, failed), read without touching any file."""
    merged, _ = read_entries(RunDir(run), stage)
    return {s: e for s, e in merged.items() if e.state == state}
