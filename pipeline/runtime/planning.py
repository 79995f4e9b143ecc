"""Which shards of a sharded stage are left, and whose they are: the first two steps of the engine
(:mod:`pipeline.runtime.engine` runs what they leave).

    claim  this driver's share: every shard, or ``s mod n == i`` for a share ``i/n`` (a SLURM array task); the share
           count is fixed when shares first run on the folder
    plan   the ledger, checked against one listing of the parts' folder: a part missing, or of another size, is
           recomputed; a part the ledger does not know is adopted from its own metadata; a part made for other clips
           or settings is set aside in ``.stale/``, never deleted
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError
from pipeline.runtime.job import ShardResult
from pipeline.store.ledger import ALL, Ledger, record_once
from pipeline.store.run_dir import RunDir, shard_of

log = logging.getLogger(__name__)


# --- claim --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """Share ``index`` of ``count``: the shards ``s`` with ``s mod count == index``."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"share-{self.index}-of-{self.count}"

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index


def parse_share(setting, environ: dict | None = None) -> tuple[int, int, int] | None:
    """``extract.share`` as ``(task id, task count, first task id)``: None (every shard), ``auto`` (SLURM's array
    variables) or ``"i/n"``.

    Raises:
        ConfigError: anything else, or ``auto`` outside a SLURM array task.
    """
    if setting is None or setting in ("null", "none", ""):
        return None
    env = os.environ if environ is None else environ
    if setting == "auto":
        try:
            return (
                int(env["SLURM_ARRAY_TASK_ID"]),
                int(env["SLURM_ARRAY_TASK_COUNT"]),
                int(env.get("SLURM_ARRAY_TASK_MIN", 0)),
            )
        except (KeyError, ValueError):
            raise ConfigError(
                "extract.share=auto: not a SLURM array task (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT unset); "
                'submit with sbatch --array, or give the share as extract.share="i/n"'
            ) from None
    text = str(setting)
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ConfigError(f"extract.share must be null, auto or 'i/n' with 0 <= i < n, got {setting!r}")
    return int(index), int(count), 0


def claim(run: RunDir, stage: str, setting, environ: dict | None = None) -> Share | None:
    """This driver's share of ``stage``'s shards (None: every shard). The share count is fixed when shares first
    run on the folder (``ledger/<stage>/shares.json``): a resubmitted array task, whose environment counts only
    itself, keeps its original share.

    Raises:
        ConfigError: an explicit ``i/n`` whose ``n`` is not the recorded count.
    """
    parsed = parse_share(setting, environ)
    if parsed is None:
        return None
    task, count, first = parsed
    folder = run.ledger(stage)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = record_once(folder / "shares.json", {"count": count, "first": first})
    if setting != "auto" and recorded.get("count") != count:
        raise ConfigError(
            f"extract.share={setting!r}: this run folder's shards were split into {recorded.get('count')} shares when "
            f"shares first ran on it ({folder / 'shares.json'}); use i/{recorded.get('count')}"
        )
    count, first = int(recorded["count"]), int(recorded.get("first", 0))
    index = task - first if setting == "auto" else task
    if not 0 <= index < count:
        raise ConfigError(
            f"extract.share=auto: array task {task} is outside the {count} shares recorded in "
            f"{folder / 'shares.json'} (tasks {first}-{first + count - 1})"
        )
    return Share(index, count)


# --- plan -----------------------------------------------------------------------------------------------------------


@dataclass
class Published:
    """What a shard's published parts were made for: ``digest`` (None when incomplete or unreadable; ``why`` says
    what is wrong), and their rows."""

    digest: str | None
    rows: int = 0
    why: str | None = None


@dataclass
class ShardWork:
    """What a sharded stage gives the engine.

    Args:
        stage: ``extract`` or ``evaluate`` (names its ledger, parts, failure parts and logs: :class:`RunDir`).
        task: ``task(*job(shard))`` does one shard's work in a task and publishes its part; returns a
            :class:`ShardResult`. Picklable.
        job: the task's arguments for one shard.
        inspect: what a shard's published parts were made for (reads their metadata; may raise ConfigError).
        resources: Dask resources a task holds (a GPU).
        fail_fast: stop at the first failed shard.
    """

    stage: str
    task: Callable[..., ShardResult]
    job: Callable[[Shard], tuple]
    inspect: Callable[[list[Path]], Published]
    resources: dict | None = None
    fail_fast: bool = False


@dataclass
class Shard:
    """One shard: its number, the digest of its work and its index rows (sliced from the index when first read)."""

    number: int
    index: pd.DataFrame
    start: int
    stop: int
    digest: str

    @property
    def rows(self) -> pd.DataFrame:
        return self.index.iloc[self.start : self.stop]

    @property
    def clips(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    """The claimed shards, those left to run and how many were found done."""

    shards: dict[int, Shard]
    todo: dict[int, Shard]
    ledger: Ledger
    share: Share | None = None
    adopted: int = 0

    @property
    def skipped(self) -> int:
        return len(self.shards) - len(self.todo)


def listing(folder: Path) -> dict[int, dict[str, int]]:
    """``shard -> {part name: size}`` of the published parts in ``folder``, from one directory scan."""
    found: dict[int, dict[str, int]] = {}
    if folder.is_dir():
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("part-") and entry.name.endswith(".parquet"):
                    found.setdefault(shard_of(entry.name), {})[entry.name] = entry.stat().st_size
    return found


def plan(
    work: ShardWork,
    run: RunDir,
    shards: dict[int, Shard],
    share: Share | None,
    config_hash: str | None = None,
    writer: str | None = None,
) -> Plan:
    """The claimed shards left to run. Clears the temporary files a killed run left, sets aside parts that belong
    to no shard, to other clips or are cut short, and adopts parts published just before a kill. ``writer``: this
    driver's journal, when not its share's (a DDP rank's)."""
    ledger = Ledger(run, work.stage, writer or (share.name if share else ALL), config_hash)
    folder = run.parts_folder(work.stage)
    mine = {s: shard for s, shard in shards.items() if share is None or share.owns(s)}
    _remove_temporary(run, folder, share)
    parts = listing(folder)
    failed_parts = _failure_listing(run, work.stage)
    aside: dict[str, list[int]] = {}  # why -> shards whose parts were set aside
    for stale in sorted(s for s in parts if s not in shards and (share is None or share.owns(s))):
        set_aside(run, work.stage, stale)
        aside.setdefault("they belong to no shard of the current index", []).append(stale)
    todo, adopted = {}, 0
    for number, shard in mine.items():
        present = parts.get(number, {})
        entry = ledger.entries.get(number)
        if present and ledger.is_done(number, shard.digest) and entry.bytes in (None, sum(present.values())):
            continue
        if present:
            found = work.inspect([folder / name for name in sorted(present)])
            if found.digest == shard.digest:
                ledger.finish(number, shard.digest, rows=found.rows, clips=shard.clips, adopted=True,
                              bytes=sum(present.values()))  # fmt: skip
                adopted += 1
                continue
            set_aside(run, work.stage, number)
            why = found.why or f"they were made with other {work.stage} settings or for other clips, or are incomplete"
            aside.setdefault(why, []).append(number)
        ledger.reopen(number)
        for old in failed_parts.get(number, []):  # the recompute writes its own (maybe per rank)
            old.unlink(missing_ok=True)
        todo[number] = shard
    for why, numbers in aside.items():  # one line per reason, not one per shard of a 100,000-shard run
        listed = ", ".join(map(str, numbers[:5])) + (f" ... ({len(numbers)} in all)" if len(numbers) > 5 else "")
        log.warning("%s: the parts of shard(s) %s moved to %s: %s", work.stage, listed, run.stale(folder), why)
    return Plan(mine, todo, ledger, share, adopted)


def _failure_listing(run: RunDir, stage: str) -> dict[int, list[Path]]:
    """``shard -> failure parts`` of ``stage``, from one directory scan."""
    found: dict[int, list[Path]] = {}
    if run.failures.is_dir():
        with os.scandir(run.failures) as it:
            for entry in it:
                shard = run.failure_shard(stage, entry.name)
                if shard is not None:
                    found.setdefault(shard, []).append(Path(entry.path))
    return found


def _remove_temporary(run: RunDir, folder: Path, share: Share | None) -> None:
    """Delete temporary part files a killed driver of this share left behind (never a published part)."""
    for place in (folder, run.failures):
        for path in place.glob(".*.tmp-*"):
            shard = shard_of(path.name)
            if shard is not None and (share is None or share.owns(shard)):
                log.info("removing %s, left by an interrupted run", path)
                path.unlink(missing_ok=True)


def set_aside(run: RunDir, stage: str, shard: int) -> None:
    """Move a shard's part files (and failure parts) to ``.stale/`` so readers never mix them in; nothing is
    deleted (the caller says why, once for every shard alike)."""
    for path in [*run.parts(stage, shard), *run.failure_parts(stage, shard)]:
        aside = run.stale(path.parent) / path.name
        aside.parent.mkdir(exist_ok=True)
        if aside.exists():  # set aside before: keep both
            aside = aside.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
        os.replace(path, aside)
        log.debug("%s moved to %s", path, aside)


def shards_of(index: pd.DataFrame, digest: Callable[[list, list], str]) -> dict[int, Shard]:
    """The shards of an index, each with ``digest(clip_ids, frame_indices)`` of its rows, in one pass over the
    columns (no table per shard: 100,000 shards cost a second)."""
    index = index.sort_values("shard", kind="stable").reset_index(drop=True)
    numbers = index["shard"].to_numpy()
    if not len(numbers):
        return {}
    starts = [0, *(np.flatnonzero(numbers[1:] != numbers[:-1]) + 1).tolist(), len(numbers)]
    clip_ids = index["clip_id"].tolist()
    frames = [f.tolist() if hasattr(f, "tolist") else list(f) for f in index["frame_indices"]]
    return {
        int(numbers[a]): Shard(int(numbers[a]), index, a, b, digest(clip_ids[a:b], frames[a:b]))
        for a, b in zip(starts[:-1], starts[1:])
    }
