"""The one engine of the sharded stages (extract, evaluate): a list of shards, some already finished.

    plan     which shards are left (:mod:`pipeline.runtime.planning`): the ledger, checked against one listing of the
             parts' folder
    claim    this driver's share: every shard, or ``s mod n == i`` for a share ``i/n`` (a SLURM array task)
    run      in the driver, on Dask workers or threads (:func:`pipeline.runtime.tasks.follow`)
    retry    inside the task (:func:`attempts`): every attempt's traceback appended to the shard's log
    publish  the stage's own work writes its part atomically (temp file, fsync, rename); then the ledger line
    report   progress, failures as rows, one console line per failed shard, and the shards' outcomes

A stage gives the engine a :class:`~pipeline.runtime.planning.ShardWork`: its name, the task that does one shard's
work and publishes its part, and how to read what a published part was made for. Probing runs on the same
``follow`` loop; its results go to the probe cache, not to parts.
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

from pipeline.errors import StageFailed
from pipeline.runtime.job import ShardResult, StopShard
from pipeline.runtime.planning import Plan, Shard, ShardWork
from pipeline.runtime.tasks import follow
from pipeline.store.files import failures_table, shard_failure_rows, write_table_atomic
from pipeline.store.ledger import Ledger
from pipeline.store.run_dir import RunDir

log = logging.getLogger(__name__)


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
