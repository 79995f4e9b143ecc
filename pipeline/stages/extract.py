"""Extract stage: ``index.parquet`` -> ``tubes/part-NNNNN.parquet`` (+ ``failures/part-NNNNN.parquet``).

The stage's work on the sharded-stage engine (:mod:`pipeline.runtime.engine`): each shard is one task
(:func:`pipeline.runtime.shard.run_shard`) on Dask (one GPU each on GPUs) or, for small CPU runs, in this
process. A part file appears only when complete; the ledger records finished shards and the fingerprint. A rerun
skips finished shards and refuses a run directory of another configuration. A task retries itself
``extract.retries`` times (Dask reruns a killed worker's); a shard that keeps failing becomes failure rows. One
progress bar counts clips over all workers. ``extract.share`` makes this driver one share of a SLURM array.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from pipeline.errors import ConfigError, Interrupted
from pipeline.runtime.cluster import offers_gpus, open_client, uses_ddp
from pipeline.runtime.engine import left_message, run_plan
from pipeline.runtime.inprocess import in_this_process, wants_in_process
from pipeline.runtime.job import GPU, TARGET_MODES, ShardJob, ShardResult
from pipeline.runtime.lock import POLICIES, run_lock
from pipeline.runtime.planning import Plan, Published, ShardWork, Share, claim, listing, parse_share, plan, shards_of
from pipeline.runtime.progress import ShardProgress
from pipeline.runtime.resolve import task_config
from pipeline.runtime.tasks import Task
from pipeline.stages.result import StageResult
from pipeline.store.files import file_metadata
from pipeline.store.provenance import fingerprint, rows_digest, save_tubes_config
from pipeline.store.run_dir import RunDir
from pipeline.store.schema import CODECS

# What checks the model, and the readers, import torch: they are imported where used, so that the command line
# checks this stage's settings and starts its cluster before paying for torch.

log = logging.getLogger(__name__)


def inspect_parts(config_hash: str, parts: list[Path]) -> Published:
    """What a shard's published parts were made for (one part, or one per rank of the DDP run that made it): their
    shard digest, None unless complete, consistent and readable (then ``why`` says what is wrong).

    Raises:
        ConfigError: a part was made with another configuration.
    """
    for path in parts:  # a part cut short (a copy, a full disk) has no footer: it is set aside and recomputed
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as err:
            return Published(None, why=f"{path.name} cannot be read ({type(err).__name__}: {err})")
    metas = [file_metadata(path) for path in parts]
    for path, meta in zip(parts, metas):
        if meta.get("config_hash") != config_hash:
            raise ConfigError(
                f"{path.parent.parent} holds tubes made with another configuration ({path.name}: {meta.get('config_hash')} != {config_hash}); "
                "choose a new run_name or delete the run directory"
            )
    digests = {meta.get("shard_hash") for meta in metas}
    complete = len(digests) == 1 and all(int(meta.get("ranks", 1)) == len(parts) for meta in metas)
    return Published(
        digests.pop() if complete else None, rows=sum(pq.ParquetFile(path).metadata.num_rows for path in parts)
    )


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
    parse_share(cfg.extract.get("share"))
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
    path = RunDir(cfg.paths.run_dir).index
    return json.loads(file_metadata(path)["saliency_tubes"])["classes"] if path.is_file() else None


def run(cfg, run_dir: Path, client=None) -> StageResult:
    """Explain every shard of the index (of this driver's share) not finished yet."""
    run = RunDir(run_dir)
    share = claim(run, "extract", cfg.extract.get("share"))
    if client is None and not uses_ddp(cfg):
        with open_client(cfg.cluster, lazy=True) as own:
            return _run(cfg, run, share, own)
    return _run(cfg, run, share, client)


def _run(cfg, run: RunDir, share: Share | None, client) -> StageResult:
    if uses_ddp(cfg):  # every rank is a driver of its own share: Lightning coordinates them
        return _run_locked(cfg, run, share, client)
    with run_lock(run, str(cfg.extract.concurrent), share.name if share else None):
        return _run_locked(cfg, run, share, client)


def shard_work(cfg, run: RunDir, classes: list[str], config_hash: str, topic: str | None = None) -> ShardWork:
    """The extract stage's work for the engine: one :func:`pipeline.runtime.shard.run_shard` task per shard."""
    cfg_dict = task_config(cfg)
    return ShardWork(
        stage="extract",
        task=Task("pipeline.runtime.shard", "run_shard"),
        job=lambda shard: (
            cfg_dict,
            ShardJob(run.root, shard.number, shard.rows, classes, config_hash, progress_topic=topic),
        ),
        inspect=functools.partial(inspect_parts, config_hash),
        resources={GPU: 1} if str(cfg.trainer.accelerator) != "cpu" else None,
        fail_fast=bool(cfg.extract.fail_fast),
    )


def _run_locked(cfg, run: RunDir, share: Share | None, client) -> StageResult:
    from pipeline.store.readers import read_index

    index, meta = read_index(run.root)
    config_hash = fingerprint(cfg)
    topic = f"extract-progress-{uuid.uuid4().hex}"
    work = shard_work(cfg, run, meta["classes"], config_hash, topic)
    rank = int(os.environ.get("LOCAL_RANK", 0)) if uses_ddp(cfg) else 0  # DDP: rank 0 records the shards
    writer = f"ddp-rank{rank}" if rank else None
    p = plan(work, run, shards_of(index, rows_digest), share, config_hash, writer)  # refuses another config
    save_tubes_config(run.root, cfg)
    which = f" ({share.name} of the array)" if share else ""
    log.info("extract: %d shards%s, %d already done, %d to run", len(p.shards), which, p.skipped, len(p.todo))
    try:
        with p.ledger:
            failed = compute(client, cfg, run, work, p, topic, (meta["classes"], config_hash))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: finished shards are published (a rerun adopts any not recorded)

        def how_far() -> str:  # counted when printed, once the workers are gone
            published = set(listing(run.tubes)) & set(p.shards)
            return f"interrupted: {len(published)} of {len(p.shards)} shards done; rerun the same command to resume"

        raise Interrupted(how_far) from None
    if failed is None:
        return StageResult("extract", shards=len(p.shards))  # a DDP rank other than 0: rank 0 reports
    return summarise(run, p, failed)


def compute(client, cfg, run: RunDir, work: ShardWork, p: Plan, topic: str, made_for: tuple) -> dict[int, str] | None:
    """Run the plan's shards (on Dask, in this process, or as one DDP job); the failed shards' errors, None on DDP
    ranks > 0. ``made_for``: the index's class names and the fingerprint (what a DDP rank's writer records)."""
    todo = p.todo
    if uses_ddp(cfg):
        from pipeline.runtime import ddp

        def done(shard, rows):
            parts = run.parts("extract", shard)
            rows_written = sum(pq.ParquetFile(path).metadata.num_rows for path in parts)
            p.ledger.finish(shard, todo[shard].digest, rows=rows_written, clips=len(rows),
                            bytes=sum(path.stat().st_size for path in parts))  # fmt: skip

        todo_rows = {s: shard.rows for s, shard in todo.items()}
        return {} if ddp.run_shards(cfg, run.root, todo_rows, *made_for, done) == 0 else None
    clips_left = sum(shard.clips for shard in todo.values())
    if not todo or wants_in_process(cfg, clips_left):  # no cluster started
        if todo:
            log.info("extract: %d clips left, run in this process (execution)", clips_left)
        with in_this_process():
            return follow_shards(None, run, work, p, topic)
    return follow_shards(client, run, work, p, topic)


def follow_shards(client, run: RunDir, work: ShardWork, p: Plan, topic: str) -> dict[int, str]:
    """The plan's shards on ``client`` (None: one after another in this process), with one progress bar over
    every worker (the shards' batch events). Returns the failed shards' errors."""
    total = sum(shard.clips for shard in p.shards.values())
    done_before = total - sum(shard.clips for shard in p.todo.values())
    with tqdm(total=total, initial=done_before, desc="extract", unit="clip", smoothing=0.1) as bar:
        progress = ShardProgress(bar)

        def on_end(shard: int, result: ShardResult) -> None:
            progress.add_failed(result.failures if result.error is None else p.todo[shard].clips)
            progress.set(shard, p.todo[shard].clips, end=True)

        if client is not None:
            client.subscribe_topic(topic, progress.on_event)
        try:
            return run_plan(work, run, p.todo, p.ledger, client, on_end).failed
        finally:
            if client is not None:
                client.unsubscribe_topic(topic)


def summarise(run: RunDir, p: Plan, failed: dict[int, str]) -> StageResult:
    """The stage's result: shards done, skipped and failed, rows, and extract failures counted by reason."""
    from pipeline.store.readers import read_failures

    failures = read_failures(run.root)
    reasons = failures[failures["stage"] == "extract"]["error_type"].value_counts().to_dict()
    done = {s: e for s, e in p.ledger.done.items() if s in p.shards}
    result = StageResult(
        "extract",
        left=left_message("extract", run, p),
        shards=len(p.shards),
        skipped=p.skipped,
        failed_shards=sorted(failed),
        rows=sum(entry.rows for entry in done.values()),
        clips=sum(shard.clips for shard in p.shards.values()),
        failures=reasons,
    )
    log.info(
        "extract: %d/%d shards done (%d skipped as finished), %d rows; failures: %s",
        len(done),
        len(p.shards),
        p.skipped,
        result.rows,
        ", ".join(f"{k} {v}" for k, v in reasons.items()) or "none",
    )
    if failed:
        log.error("extract: %d shards failed and will be retried by the next run: %s", len(failed), sorted(failed))
    return result
