"""Extract stage: ``index.parquet`` -> ``tubes/part-NNNNN.parquet`` (+ ``failures/part-NNNNN.parquet``).

The driver: each shard is one task (:func:`pipeline.runtime.shard.run_shard`) on Dask (one GPU each on GPUs) or,
for small CPU runs, in this process. A part file appears only when complete; ``manifest.json`` records finished
shards and the fingerprint. A rerun skips finished shards and refuses a run directory of another configuration.
A task retries itself ``extract.retries`` times (Dask reruns a killed worker's); a shard that keeps failing
becomes failure rows. One progress bar counts clips over all workers.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from pipeline.errors import ConfigError, Interrupted, StageFailed
from pipeline.runtime.cluster import offers_gpus, open_client, uses_ddp
from pipeline.runtime.inprocess import in_process_setting, in_this_process, wants_in_process
from pipeline.runtime.job import GPU, TARGET_MODES, ShardJob, ShardResult, log_path, run_shard
from pipeline.runtime.lock import POLICIES, run_lock
from pipeline.runtime.progress import ShardProgress
from pipeline.runtime.tasks import follow
from pipeline.store.files import (
    failures_table,
    file_metadata,
    part_name,
    shard_failure_rows,
    shard_parts,
    write_table_atomic,
)
from pipeline.store.ledger import Ledger
from pipeline.store.provenance import fingerprint, save_tubes_config, shard_digest
from pipeline.store.schema import CODECS

# What checks the model, and the readers, import torch: they are imported where used, so that the command line
# checks this stage's settings and starts its cluster before paying for torch.

log = logging.getLogger(__name__)


def published_shard(run_dir: Path, shard: int, config_hash: str) -> dict | None:
    """What a shard's published parts hold: ``shard_hash`` (None unless complete, consistent and readable, then
    ``why`` says what is wrong) and ``rows``; None when it has no part. A shard is one part, or one part per rank
    of the DDP run that made it.

    Raises:
        RuntimeError: a part was made with another configuration.
    """
    parts = shard_parts(run_dir / "tubes", shard)
    if not parts:
        return None
    for path in parts:  # a part cut short (a copy, a full disk) has no footer: it is set aside and recomputed
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as err:
            return dict(shard_hash=None, rows=0, why=f"{path.name} cannot be read ({type(err).__name__}: {err})")
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
            aside = run_dir / folder / ".stale" / path.name
            aside.parent.mkdir(exist_ok=True)
            if aside.exists():  # set aside before: keep both
                aside = aside.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
            os.replace(path, aside)
            log.warning("%s: %s; moved to %s", path, why, aside)


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


def check_settings(cfg, upstream: tuple[str, ...] = ()) -> None:
    """This stage's settings, checked without building anything (see :func:`validate` for the model)."""
    if cfg.target.mode not in TARGET_MODES:
        raise ConfigError(f"target.mode must be one of {TARGET_MODES}, got {cfg.target.mode!r}")
    if cfg.target.mode == "topk" and int(cfg.target.k) < 1:
        raise ConfigError(f"target.k must be >= 1, got {cfg.target.k}")
    if cfg.store.codec not in CODECS:
        raise ConfigError(f"store.codec must be one of {CODECS}, got {cfg.store.codec!r}")
    for key, least in (("batch_size", 1), ("prefetch_factor", 1), ("num_workers", 0), ("retries", 0)):
        if (
            not (key in ("num_workers", "prefetch_factor") and cfg.extract[key] == "auto")
            and int(cfg.extract[key]) < least
        ):
            raise ConfigError(f"extract.{key} must be >= {least}, got {cfg.extract[key]}")
    if cfg.extract.resize not in ("auto", "loader", "device"):
        raise ConfigError(f"extract.resize must be auto, loader or device, got {cfg.extract.resize!r}")
    if cfg.extract.concurrent not in POLICIES:
        raise ConfigError(f"extract.concurrent must be one of {POLICIES}, got {cfg.extract.concurrent!r}")
    in_process_setting(cfg, "extract")
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


def validate(cfg, upstream: tuple[str, ...] = ()) -> None:
    """What would otherwise fail inside every task: the model, layer and classifier against the method and the
    targets, on a probe clip. ``upstream``: the stages that run before this one in the same invocation (a
    checkpoint that ``train`` will write is not required yet)."""
    from pipeline.models.classes import check_targets
    from pipeline.runtime.builders import build_explainer

    check_settings(cfg, upstream)
    model = cfg.model
    if "train" in upstream and not Path(str(model.checkpoint)).is_file():
        model = OmegaConf.merge(model, {"checkpoint": None})  # check layer and classifier on random weights
    check_targets(cfg.model, cfg.target.mode, build_explainer(cfg, model), dataset_classes(cfg, upstream))


def dataset_classes(cfg, upstream: tuple[str, ...] = ()) -> list[str] | None:
    """The dataset's class names: the index's, or the dataset reader's when the index stage runs first; None
    when there is no index yet."""
    if "index" in upstream:
        return list(instantiate(cfg.dataset).classes)
    path = Path(cfg.paths.run_dir) / "index.parquet"
    return json.loads(file_metadata(path)["saliency_tubes"])["classes"] if path.is_file() else None


def run(cfg, run_dir: Path, client=None) -> dict:
    """Explain every shard of the index not finished yet; returns a summary (shards, rows, failures by reason)."""
    if client is None and not uses_ddp(cfg):
        with open_client(cfg.cluster, lazy=True) as own:
            return run(cfg, run_dir, own)
    if uses_ddp(cfg):  # every rank is a driver of its own share: Lightning coordinates them
        return _run_locked(cfg, run_dir, client)
    with run_lock(run_dir, str(cfg.extract.concurrent)):
        return _run_locked(cfg, run_dir, client)


def _run_locked(cfg, run_dir: Path, client) -> dict:
    from pipeline.store.readers import read_index

    index, meta = read_index(run_dir)
    config_hash = fingerprint(cfg)
    ledger = Ledger(run_dir, config_hash)
    save_tubes_config(run_dir, cfg)
    shards = {int(shard): rows for shard, rows in index.groupby("shard", sort=True)}
    todo = plan(run_dir, shards, config_hash, ledger)
    log.info("extract: %d shards, %d already done, %d to run", len(shards), len(shards) - len(todo), len(todo))
    try:
        failed = compute(client, cfg, run_dir, todo, meta["classes"], config_hash, ledger, total=len(index))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: finished shards are published (a rerun adopts any not recorded)

        def how_far() -> str:  # counted when printed, once the workers are gone
            published = {shard for shard in shards if shard_parts(run_dir / "tubes", shard)}
            return (
                f"interrupted: {len(published | set(ledger.done))} of {len(shards)} shards done; "
                "rerun the same command to resume"
            )

        raise Interrupted(how_far) from None
    if failed is None:
        return dict(shards=len(shards))  # a DDP rank other than 0: rank 0 reports
    summary = summarise(run_dir, shards, ledger, skipped=len(shards) - len(todo), failed=failed)
    left = sorted(set(shards) - set(ledger.done))
    if left:  # the command's exit status says so (pipeline.__main__)
        summary["left"] = (
            f"extract: {len(ledger.done)} of {len(shards)} shards done, {len(left)} left (shards {_few(left)}); "
            f"see {run_dir / 'failures'} and {run_dir / 'logs'}, fix the cause and rerun the same command to resume"
        )
    return summary


def _few(numbers: list[int], most: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:most]))
    return shown + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


def compute(client, cfg, run_dir: Path, todo, classes, config_hash: str, ledger: Ledger, total: int) -> dict | None:
    """Run the shards of ``todo`` (on Dask, or as one DDP job); the failed shards' errors, None on DDP ranks > 0."""
    if uses_ddp(cfg):
        from pipeline.runtime import ddp

        def done(shard, rows):
            ledger.finish(
                shard, shard_digest(rows), rows=published_shard(run_dir, shard, config_hash)["rows"], clips=len(rows)
            )

        return {} if ddp.run_shards(cfg, run_dir, todo, classes, config_hash, done) == 0 else None
    if not todo or wants_in_process(cfg, sum(len(rows) for rows in todo.values())):  # no cluster started
        if todo:
            log.info("extract: %d clips left, run in this process (extract.in_process)", sum(map(len, todo.values())))
        with in_this_process():
            return run_on_dask(None, cfg, run_dir, todo, classes, config_hash, ledger, total=total)
    return run_on_dask(client, cfg, run_dir, todo, classes, config_hash, ledger, total=total)


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
        recorded = ledger.done.get(shard, {}).get("rows") if ledger.is_done(shard, rows_hash) else None
        if part is not None and part["shard_hash"] == rows_hash:
            if recorded is None or recorded == part["rows"]:
                if recorded is None:
                    ledger.finish(shard, rows_hash, rows=part["rows"], adopted=True)
                continue
            part["why"] = f"holds {part['rows']} rows where the ledger recorded {recorded}"
        if part is not None:  # unreadable, other clips (the index was rebuilt) or a DDP run's unfinished share
            set_aside(run_dir, shard, part.get("why") or "made for other clips of this shard, or incomplete")
            ledger.reopen(shard)
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
    With ``client=None`` the shards run one after another in this process (progress then moves per shard).

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
        if client is not None:
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
                    progress.add_failed(result.failures)
                elif fail_fast or result.stop:
                    raise StageFailed(
                        f"extract stopped at the first failure (extract.fail_fast=true), shard {shard}: {result.error}; "
                        f"see {log_path(run_dir, shard)}; the finished shards are kept: fix the cause and rerun the "
                        "same command to resume"
                    )
                else:
                    failed[shard] = result.error
                    record_failed_shard(run_dir, shard, todo[shard], result, ledger)
                    progress.add_failed(len(todo[shard]))
                progress.set(shard, len(todo[shard]), end=True)
        finally:
            if client is not None:
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
    from pipeline.store.readers import read_failures, tube_files

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
