"""Extract stage: ``index.parquet`` -> ``tubes/part-NNNNN.parquet`` (+ ``failures/part-NNNNN.parquet``).

The driver: each shard of the index is one Dask task (:func:`pipeline.runtime.shard.run_shard`), asking for one GPU
when the trainer runs on GPUs. A shard's part file appears only when complete, and ``manifest.json`` records
the finished shards with their row counts and the configuration's fingerprint. Rerunning skips finished
shards (a killed run resumes where it stopped) and refuses a run directory made with another configuration.
Dask retries a failing shard ``extract.retries`` times (a killed worker is retried too); a shard that keeps
failing becomes failure rows and the run goes on. One progress bar counts clips over all workers.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from tqdm import tqdm

from pipeline.errors import ConfigError, StageFailed
from pipeline.runtime import ddp
from pipeline.runtime.builders import build_explainer
from pipeline.runtime.cluster import GPU, offers_gpus, open_client
from pipeline.runtime.job import ShardJob, ShardResult
from pipeline.runtime.module import TARGET_MODES
from pipeline.runtime.shard import log_path, run_shard
from pipeline.runtime.tasks import follow
from pipeline.store import (
    CODECS,
    failures_table,
    file_metadata,
    part_name,
    read_failures,
    read_index,
    shard_failure_rows,
    shard_parts,
    tube_files,
    write_table_atomic,
)
from pipeline.store.ledger import Ledger
from pipeline.store.provenance import fingerprint, shard_digest

log = logging.getLogger(__name__)


def published_shard(run_dir: Path, shard: int, config_hash: str) -> dict | None:
    """What a shard's published parts hold: ``shard_hash`` (None unless complete and consistent) and ``rows``;
    None when it has no part. A shard is one part, or one part per rank of the DDP run that made it.

    Raises:
        RuntimeError: a part was made with another configuration.
    """
    parts = shard_parts(run_dir / "tubes", shard)
    if not parts:
        return None
    metas = [file_metadata(path) for path in parts]
    for path, meta in zip(parts, metas):
        if meta.get("config_hash") != config_hash:
            raise ConfigError(
                f"{run_dir} holds tubes made with another configuration ({path.name}: {meta.get('config_hash')} != {config_hash}); "
                "choose a new run_name or delete the run directory"
            )
    hashes = {meta.get("shard_hash") for meta in metas}
    complete = len(hashes) == 1 and all(int(meta.get("ranks", 1)) == len(parts) for meta in metas)
    return dict(
        shard_hash=hashes.pop() if complete else None,
        rows=sum(pq.ParquetFile(path).metadata.num_rows for path in parts),
    )


def set_aside(run_dir: Path, shard: int, why: str) -> None:
    """Move a shard's part files (tubes and failures) to ``.stale/`` so readers never mix them in; nothing is deleted."""
    for folder in ("tubes", "failures"):
        for path in shard_parts(run_dir / folder, shard):
            (run_dir / folder / ".stale").mkdir(exist_ok=True)
            os.replace(path, run_dir / folder / ".stale" / path.name)
            log.warning("%s: %s; moved to %s", path, why, path.parent / ".stale")


def remove_partial_files(run_dir: Path) -> None:
    """Delete temporary part files a killed run left behind (never a published part)."""
    for folder in ("tubes", "failures"):
        for path in (run_dir / folder).glob(".part-*.parquet.tmp-*"):
            log.info("removing %s, left by an interrupted run", path)
            path.unlink(missing_ok=True)


def set_aside_stale_parts(run_dir: Path, shards: set[int]) -> None:
    """Set aside part files of shards the current index no longer has (it was rebuilt smaller)."""
    found = {
        int(p.stem.split("-")[1]) for folder in ("tubes", "failures") for p in (run_dir / folder).glob("part-*.parquet")
    }
    for shard in sorted(found - shards):
        set_aside(run_dir, shard, "belongs to no shard of the current index")


def validate(cfg, upstream: tuple[str, ...] = ()) -> None:
    """Settings of this stage that would otherwise fail inside every task. ``upstream``: the stages that run
    before this one in the same invocation (a checkpoint that ``train`` will write is not required yet)."""
    if cfg.target.mode not in TARGET_MODES:
        raise ConfigError(f"target.mode must be one of {TARGET_MODES}, got {cfg.target.mode!r}")
    if cfg.target.mode == "topk" and int(cfg.target.k) < 1:
        raise ConfigError(f"target.k must be >= 1, got {cfg.target.k}")
    if cfg.store.codec not in CODECS:
        raise ConfigError(f"store.codec must be one of {CODECS}, got {cfg.store.codec!r}")
    for key, least in (("batch_size", 1), ("prefetch_factor", 1), ("num_workers", 0), ("retries", 0)):
        if not (key == "num_workers" and cfg.extract[key] == "auto") and int(cfg.extract[key]) < least:
            raise ConfigError(f"extract.{key} must be >= {least}, got {cfg.extract[key]}")
    threads = cfg.extract.torch_threads
    if threads != "auto" and (not str(threads).isdigit() or int(threads) < 1):
        raise ConfigError(f"extract.torch_threads must be 'auto' or >= 1, got {threads!r}")
    if str(cfg.trainer.accelerator) not in ("cpu", "gpu", "cuda"):
        raise ConfigError(
            f"trainer.accelerator must be cpu or gpu for the extract stage, got {cfg.trainer.accelerator!r}"
        )
    if str(cfg.trainer.accelerator) != "cpu" and not uses_ddp(cfg) and not offers_gpus(cfg.cluster):
        raise ConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator} needs GPU workers: set cluster.gpus (local) or cluster.gpus_per_job (slurm)"
        )
    if uses_ddp(cfg):
        if upstream or cfg.stage not in ("extract", ["extract"]):
            raise ConfigError(
                "trainer.strategy=ddp runs the extract stage alone (every rank reruns the command): use stage=extract"
            )
    elif str(cfg.trainer.strategy) != "auto":
        raise ConfigError(
            f"trainer.strategy must be auto (one device per Dask task) or ddp, got {cfg.trainer.strategy!r}"
        )
    elif str(cfg.trainer.devices) != "1":
        raise ConfigError(
            f"trainer.devices must be 1 with Dask (each task uses one device; more devices = more workers), "
            f"or use trainer.strategy=ddp on one node; got {cfg.trainer.devices}"
        )
    model = cfg.model
    if "train" in upstream and not Path(str(model.checkpoint)).is_file():
        model = OmegaConf.merge(model, {"checkpoint": None})  # check layer and classifier on random weights
    build_explainer(cfg, model)


class ShardProgress:
    """The one progress bar of the stage: clips handled over all workers, fed by the shards' batch events."""

    def __init__(self, bar: tqdm):
        self.bar, self.done, self.ended, self.lock = bar, {}, set(), threading.Lock()

    def set(self, shard: int, done: int, end: bool = False) -> None:
        """``done`` clips of ``shard`` handled so far (a retried shard starts again from 0); after ``end``, a
        late event of the shard changes nothing."""
        with self.lock:
            if shard in self.ended:
                return
            self.bar.update(done - self.done.get(shard, 0))
            self.done[shard] = done
            if end:
                self.ended.add(shard)

    def on_event(self, event) -> None:
        _, msg = event
        self.set(msg["shard"], msg["done"])


def uses_ddp(cfg) -> bool:
    """Whether the stage runs as one Lightning DDP job over this node's devices instead of on a Dask cluster."""
    return str(cfg.trainer.get("strategy", "auto")).startswith("ddp")


def run(cfg, run_dir: Path, client=None) -> dict:
    """Explain every shard of the index not finished yet; returns a summary (shards, rows, failures by reason)."""
    if client is None and not uses_ddp(cfg):
        with open_client(cfg.cluster) as own:
            return run(cfg, run_dir, own)
    index, meta = read_index(run_dir)
    config_hash = fingerprint(cfg)
    ledger = Ledger(run_dir, config_hash)
    shards = {int(shard): rows for shard, rows in index.groupby("shard", sort=True)}
    todo = plan(run_dir, shards, config_hash, ledger)
    log.info("extract: %d shards, %d already done, %d to run", len(shards), len(shards) - len(todo), len(todo))
    if uses_ddp(cfg):

        def done(shard, rows):
            ledger.finish(
                shard, shard_digest(rows), rows=published_shard(run_dir, shard, config_hash)["rows"], clips=len(rows)
            )

        if ddp.run_shards(cfg, run_dir, todo, meta["classes"], config_hash, done) != 0:
            return dict(shards=len(shards))  # rank 0 reports
        failed = {}
    else:
        failed = run_on_dask(client, cfg, run_dir, todo, meta["classes"], config_hash, ledger, total=len(index))
    return summarise(run_dir, shards, ledger, skipped=len(shards) - len(todo), failed=failed)


def plan(run_dir: Path, shards: dict[int, pd.DataFrame], config_hash: str, ledger: Ledger) -> dict[int, pd.DataFrame]:
    """The shards still to compute. Clears what a killed run left (temporary files), sets aside parts that do not
    belong to the current index, and adopts parts published just before a kill but missing from the manifest."""
    remove_partial_files(run_dir)
    set_aside_stale_parts(run_dir, set(shards))
    ledger.forget(set(shards))
    todo = {}
    for shard, rows in shards.items():
        rows_hash = shard_digest(rows)
        part = published_shard(run_dir, shard, config_hash)
        if part is not None and part["shard_hash"] == rows_hash:
            if not ledger.is_done(shard, rows_hash):
                ledger.finish(shard, rows_hash, rows=part["rows"], adopted=True)
            continue
        if part is not None:  # other clips (the index was rebuilt) or a DDP run's unfinished share
            set_aside(run_dir, shard, "made for other clips of this shard, or incomplete")
        for stale in shard_parts(run_dir / "failures", shard):  # the recompute writes its own (maybe per rank)
            stale.unlink()
        todo[shard] = rows
    return todo


def run_on_dask(
    client,
    cfg,
    run_dir: Path,
    todo: dict[int, pd.DataFrame],
    classes: list[str],
    config_hash: str,
    ledger: Ledger,
    total: int,
) -> dict[int, str]:
    """One task per shard (one GPU each on GPUs); records each shard as it ends. Returns the failed shards' errors.

    Raises:
        StageFailed: with ``extract.fail_fast``, at the first failed clip or shard.
    """
    fail_fast = bool(cfg.extract.fail_fast)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    topic = f"extract-progress-{uuid.uuid4().hex}"
    jobs = {
        shard: (cfg_dict, ShardJob(run_dir, shard, rows, classes, config_hash, progress_topic=topic))
        for shard, rows in todo.items()
    }
    resources = {GPU: 1} if str(cfg.trainer.accelerator) != "cpu" else None
    failed = {}
    done_before = total - sum(len(r) for r in todo.values())
    with tqdm(total=total, initial=done_before, desc="extract", unit="clip", smoothing=0.1) as bar:
        progress = ShardProgress(bar)
        client.subscribe_topic(topic, progress.on_event)
        try:
            for shard, result, error in follow(client, run_shard, jobs, name="extract", resources=resources):
                if error is not None:  # the task itself was lost (its worker died): Dask's own retries are spent
                    result = ShardResult(
                        shard, error=f"{type(error).__name__}: {error}", error_type=type(error).__name__
                    )
                if result.error is None:
                    ledger.finish(
                        shard,
                        shard_digest(todo[shard]),
                        rows=result.rows,
                        clips=result.clips,
                        failures=result.failures,
                        seconds=result.seconds,
                    )
                elif fail_fast or result.stop:
                    raise StageFailed(
                        f"extract stopped at the first failure (extract.fail_fast=true), shard {shard}: {result.error}; "
                        f"see {log_path(run_dir, shard)}"
                    )
                else:
                    failed[shard] = result.error
                    record_failed_shard(run_dir, shard, todo[shard], result, ledger)
                progress.set(shard, len(todo[shard]), end=True)
        finally:
            client.unsubscribe_topic(topic)
    return failed


def record_failed_shard(run_dir: Path, shard: int, rows: pd.DataFrame, result: ShardResult, ledger: Ledger) -> None:
    """A shard that failed after its retries: one failure row per clip, noted in the ledger, one console line
    (the tracebacks are in the shard's log); the run goes on."""
    message = f"shard {shard} failed after {result.attempts} attempt(s): {result.error}"
    failures = shard_failure_rows(rows, "extract", result.error_type or "Error", message)
    write_table_atomic(failures_table(failures), run_dir / "failures" / part_name(shard))
    ledger.fail(shard, shard_digest(rows), result.error)
    log.error("%s (%s)", message, log_path(run_dir, shard))


def summarise(run_dir: Path, shards: dict, ledger: Ledger, skipped: int, failed: dict) -> dict:
    """The stage's summary: shards done, skipped and failed, rows, and extract failures counted by reason."""
    failures = read_failures(run_dir)
    reasons = failures[failures["stage"] == "extract"]["error_type"].value_counts().to_dict()
    summary = dict(
        shards=len(shards),
        skipped=skipped,
        failed_shards=sorted(failed),
        parts=len(tube_files(run_dir)),
        rows=sum(entry.get("rows", 0) for entry in ledger.done.values()),
        failures=reasons,
    )
    log.info(
        "extract: %d/%d shards done (%d skipped as finished), %d rows; failures: %s",
        len(ledger.done),
        len(shards),
        skipped,
        summary["rows"],
        ", ".join(f"{k} {v}" for k, v in reasons.items()) or "none",
    )
    if failed:
        log.error("extract: %d shards failed and will be retried by the next run: %s", len(failed), sorted(failed))
    return summary
