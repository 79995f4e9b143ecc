"""The one engine of the sharded stages (extract, evaluate): a list of shards, some already finished.

    plan     which shards are left: the ledger, checked against one listing of the parts' folder (a part missing,
             or of another size, is recomputed; a part the ledger does not know is adopted from its own metadata)
    claim    this driver's share: every shard, or ``s mod n == i`` for a share ``i/n`` (a SLURM array task)
    run      in the driver, on Dask workers or threads (:func:`pipeline.runtime.tasks.follow`)
    retry    inside the task (:func:`attempts`): every attempt's traceback appended to the shard's log
    publish  the stage's own work writes its part atomically (temp file, fsync, rename); then the ledger line
    report   progress, failures as rows, one console line per failed shard, and the shards' outcomes

A stage gives the engine a :class:`ShardWork`: its name, the task that does one shard's work and publishes its
part, and how to read what a published part was made for. Probing runs on the same ``follow`` loop; its results
go to the probe cache, not to parts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, StageFailed
from pipeline.runtime.job import ShardResult, StopShard
from pipeline.runtime.tasks import follow
from pipeline.store.files import failures_table, shard_failure_rows, write_table_atomic
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


# --- run and retry ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def shard_log(path: Path):
    """A logger writing to a shard's log (appended: every attempt of the shard is kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # one logger per thread, reused: loggers are never freed
    logger = logging.getLogger(f"pipeline.shard.thread-{threading.get_ident()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def _worker_name() -> str:
    try:
        from dask.distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return "(driver)"


def attempts(
    work: Callable[[logging.Logger], ShardResult], shard: int, clips: int, log_path: Path, tries: int
) -> ShardResult:
    """Run one shard's ``work(log)`` up to ``tries`` times in the task; every attempt and its traceback go to the
    shard's log. A :class:`StopShard` ends the task at once (``fail_fast``); when every attempt failed the result
    carries the last error."""
    with shard_log(log_path) as slog:
        for attempt in range(1, tries + 1):
            started = time.perf_counter()
            slog.info(
                "shard %d: %d clips, attempt %d of %d, worker %s, pid %d",
                shard, clips, attempt, tries, _worker_name(), os.getpid(),
            )  # fmt: skip
            try:
                result = work(slog)
            except StopShard as err:
                slog.error("shard %d stopped: %s", shard, err)
                return ShardResult(shard, attempts=attempt, error=str(err), error_type="ClipFailure", stop=True)
            except Exception as err:
                slog.error(
                    "shard %d, attempt %d failed: %s: %s", shard, attempt, type(err).__name__, err, exc_info=True
                )
                if attempt == tries:
                    return ShardResult(
                        shard, attempts=attempt, error=f"{type(err).__name__}: {err}", error_type=type(err).__name__
                    )
                continue
            result.seconds, result.attempts = round(time.perf_counter() - started, 3), attempt
            slog.info(
                "shard %d done: %d rows, %d failures, %.2f s", shard, result.rows, result.failures, result.seconds
            )
            return result
    raise AssertionError("unreachable: every attempt returns")


@dataclass
class Outcome:
    """How the claimed shards ended in this run: the failed ones with their errors."""

    failed: dict[int, str] = field(default_factory=dict)


def run_plan(
    work: ShardWork,
    run: RunDir,
    todo: dict[int, Shard],
    ledger: Ledger,
    runner,
    on_end: Callable[[int, ShardResult], None] | None = None,
) -> Outcome:
    """Run the shards of ``todo`` on ``runner`` (a Dask client, or None: one after another in this process);
    record each in the ledger as it ends. A failed shard (after its retries, or its worker lost) becomes one failure
    row per clip and one console line naming its log.

    Raises:
        StageFailed: with ``fail_fast``, at the first failed shard.
    """
    outcome = Outcome()
    jobs = {number: work.job(shard) for number, shard in todo.items()}
    for number, result, error in follow(runner, work.task, jobs, name=work.stage, resources=work.resources):
        shard = todo[number]
        if error is not None:  # the task itself was lost (its worker died): Dask's own retries are spent
            result = ShardResult(number, error=f"{type(error).__name__}: {error}", error_type=type(error).__name__)
        if result.error is None:
            ledger.finish(
                number,
                shard.digest,
                rows=result.rows,
                clips=result.clips,
                failures=result.failures,
                seconds=result.seconds,
                bytes=result.bytes,
            )
        elif work.fail_fast or result.stop:
            raise StageFailed(
                f"{work.stage} stopped at the first failure (extract.fail_fast=true), shard {number}: {result.error}; "
                f"see {run.shard_log(work.stage, number)}; the finished shards are kept: fix the cause and rerun the "
                "same command to resume"
            )
        else:
            outcome.failed[number] = result.error
            message = f"shard {number} failed after {result.attempts} attempt(s): {result.error}"
            failures = shard_failure_rows(shard.rows, work.stage, result.error_type or "Error", message)
            write_table_atomic(failures_table(failures), run.failure_part(work.stage, number))
            ledger.fail(number, shard.digest, result.error)
            log.error("%s %s (%s)", work.stage, message, run.shard_log(work.stage, number))
        if on_end is not None:
            on_end(number, result)
    return outcome


def left_message(stage: str, run: RunDir, plan: Plan) -> str | None:
    """What is left of the claimed shards after a run (None when every one is done), with how to go on."""
    left = sorted(s for s, shard in plan.shards.items() if not plan.ledger.is_done(s, shard.digest))
    if not left:
        return None
    which = f" of {plan.share.name}" if plan.share else ""
    return (
        f"{stage}: {len(plan.shards) - len(left)} of {len(plan.shards)} shards{which} done, {len(left)} left "
        f"(shards {few(left)}); see {run.failures} and {run.logs}, fix the cause and rerun the same command to resume"
    )


def few(numbers: list[int], most: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:most]))
    return shown + (f" and {len(numbers) - most} more" if len(numbers) > most else "")
