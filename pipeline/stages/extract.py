"""Extract stage: ``index.parquet`` -> ``tubes/part-NNNNN.parquet`` (+ ``failures/part-NNNNN.parquet``).

Each shard is one Dask task. A task builds the model once per worker process, then runs a Lightning
``Trainer.predict`` loop over its clips; :class:`~pipeline.writer.TubeWriter` streams the rows to a temporary
file that is renamed into place when the shard is complete. A shard whose part file exists, was made with the
same configuration and covers the same clips is never recomputed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from dask.distributed import as_completed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.clips import ClipDataset, collate_clips
from pipeline.models import build_model
from pipeline.module import TARGET_MODES, TubeModule
from pipeline.saliency import TubeExplainer
from pipeline.stages.index import read_index
from pipeline.store import CODECS, failures_table, file_metadata, tube_files, write_table_atomic
from pipeline.video import ResizeCrop
from pipeline.writer import TubeWriter, part_name

log = logging.getLogger(__name__)

#: config sections that decide what a tube is; a run directory holds tubes of one such configuration
FINGERPRINT_KEYS = ("dataset", "model", "method", "sampler", "target", "store")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(cfg) -> str:
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return _digest({key: resolved.get(key) for key in FINGERPRINT_KEYS})


def shard_digest(rows: pd.DataFrame) -> str:
    return _digest([[c, list(map(int, f))] for c, f in zip(rows["clip_id"], rows["frame_indices"])])


def shard_is_done(run_dir: Path, shard: int, config_hash: str, rows_hash: str) -> bool:
    """True when the shard's part file exists for these clips; raises if it was made with another config."""
    path = run_dir / "tubes" / part_name(shard)
    if not path.is_file():
        return False
    meta = file_metadata(path)
    if meta.get("config_hash") != config_hash:
        raise RuntimeError(
            f"{run_dir} holds tubes made with another configuration ({path.name}: {meta.get('config_hash')} != {config_hash}); "
            "choose a new run_name or delete the run directory"
        )
    return meta.get("shard_hash") == rows_hash


_cache = threading.local()


def build_explainer(cfg, model_cfg=None) -> TubeExplainer:
    """The explainer for ``cfg.model`` (or ``model_cfg``) and ``cfg.method``, built and loaded once per thread.

    A worker reuses it for every shard. It is kept per thread because hooks capture activations on the
    model's own modules: two threads of one process (``cluster.processes=false``) must not share a model.
    """
    model_cfg = cfg.model if model_cfg is None else model_cfg
    key = json.dumps([OmegaConf.to_container(model_cfg, resolve=True), OmegaConf.to_container(cfg.method, resolve=True)])
    if getattr(_cache, "key", None) != key:
        net = build_model(model_cfg)
        shape = (3, model_cfg.input.clip_len, *model_cfg.input.size)
        _cache.explainer = TubeExplainer(
            net, instantiate(cfg.method), shape, layer=model_cfg.layer, classifier=model_cfg.classifier, layout=model_cfg.get("layout", "auto")
        )
        _cache.key = key
    return _cache.explainer


def _torch_threads(cfg) -> int:
    setting = cfg.extract.torch_threads
    if setting != "auto":
        return int(setting)
    workers = int(cfg.cluster.get("n_workers", 1) or 1)
    return max(1, (os.cpu_count() or 1) // workers)


def run_shard(cfg_dict: dict, run_dir: str, shard: int, rows: pd.DataFrame, classes: list[str], config_hash: str) -> dict:
    """Explain one shard's clips and publish its part file. Runs inside a Dask worker (or in-process)."""
    cfg = OmegaConf.create(cfg_dict)
    torch.set_num_threads(_torch_threads(cfg))
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning's own use of a deprecated torch API
    explainer = build_explainer(cfg)
    rows = rows.reset_index(drop=True)
    rows_hash = shard_digest(rows)
    failures = []
    if cfg.target.mode == "label":
        unlabeled = rows["label"].isna()
        failures = [
            dict(clip_id=r.clip_id, source=r.source, stage="extract", error_type="MissingLabel", message=f"{r.clip_id}: target.mode=label but the clip has no label")
            for r in rows[unlabeled].itertuples()
        ]
        rows = rows[~unlabeled].reset_index(drop=True)
    labels = torch.tensor(rows["label"].fillna(-1).astype(int).to_numpy())
    module = TubeModule(explainer, cfg.model.input.mean, cfg.model.input.std, target=cfg.target.mode, k=cfg.target.k, codec=cfg.store.codec, labels=labels)
    transform = ResizeCrop(int(cfg.model.input.short_side), tuple(cfg.model.input.size))
    loader = DataLoader(
        ClipDataset(rows, transform),
        batch_size=int(cfg.extract.batch_size),
        num_workers=int(cfg.extract.num_workers),
        collate_fn=collate_clips,
        pin_memory=cfg.trainer.accelerator != "cpu",
    )
    writer = TubeWriter(
        run_dir, shard, rows, method=explainer.method.name, layer=explainer.layer_name, class_names=classes,
        metadata={"config_hash": config_hash, "shard_hash": rows_hash},
        failures=failures,
    )
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        callbacks=[writer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=not explainer.method.needs_grad,
    )
    if len(rows) == 0:  # every clip was dropped above: publish an empty part with the failures, run nothing
        writer.on_predict_end(None, None)
        return dict(shard=shard, rows=0, failures=len(writer.failures))
    try:
        trainer.predict(module, loader, return_predictions=False)
    except BaseException:
        writer.abort()
        raise
    return dict(shard=shard, rows=writer.rows_written, failures=len(writer.failures))


def set_aside_stale_parts(run_dir: Path, shards: set[int]) -> None:
    """Move part files of shards the current index no longer has (it was rebuilt smaller) to ``.stale/``,
    so readers never mix them in; nothing is deleted."""
    for folder in ("tubes", "failures"):
        for path in sorted((run_dir / folder).glob("part-*.parquet")):
            if int(path.stem.split("-")[1]) not in shards:
                (run_dir / folder / ".stale").mkdir(exist_ok=True)
                os.replace(path, run_dir / folder / ".stale" / path.name)
                log.warning("%s belongs to no shard of the current index; moved to %s", path, path.parent / ".stale")


def validate(cfg, upstream: tuple[str, ...] = ()) -> None:
    """Settings of this stage that would otherwise fail inside every task. ``upstream``: the stages that run
    before this one in the same invocation (a checkpoint that ``train`` will write is not required yet)."""
    if cfg.target.mode not in TARGET_MODES:
        raise ValueError(f"target.mode must be one of {TARGET_MODES}, got {cfg.target.mode!r}")
    if cfg.target.mode == "topk" and int(cfg.target.k) < 1:
        raise ValueError(f"target.k must be >= 1, got {cfg.target.k}")
    if cfg.store.codec not in CODECS:
        raise ValueError(f"store.codec must be one of {CODECS}, got {cfg.store.codec!r}")
    for key in ("batch_size",):
        if int(cfg.extract[key]) < 1:
            raise ValueError(f"extract.{key} must be >= 1, got {cfg.extract[key]}")
    if int(cfg.extract.num_workers) < 0:
        raise ValueError(f"extract.num_workers must be >= 0, got {cfg.extract.num_workers}")
    model = cfg.model
    if "train" in upstream and not Path(str(model.checkpoint)).is_file():
        model = OmegaConf.merge(model, {"checkpoint": None})  # check layer and classifier on random weights
    build_explainer(cfg, model)


def run(cfg, run_dir: Path, client=None) -> dict:
    index, meta = read_index(run_dir)
    config_hash = fingerprint(cfg)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    shards = {shard: rows for shard, rows in index.groupby("shard", sort=True)}
    set_aside_stale_parts(run_dir, set(shards))
    todo = {s: rows for s, rows in shards.items() if not shard_is_done(run_dir, s, config_hash, shard_digest(rows))}
    done_clips = sum(len(r) for s, r in shards.items() if s not in todo)
    log.info("extract: %d shards, %d already done, %d to run", len(shards), len(shards) - len(todo), len(todo))
    summary = dict(shards=len(shards), skipped=len(shards) - len(todo), failed_shards=[])
    with tqdm(total=len(index), initial=done_clips, desc="extract", unit="clip") as bar:
        if client is None:
            results = []
            for shard, rows in todo.items():
                results.append(_guarded(run_shard, cfg_dict, str(run_dir), shard, rows, meta["classes"], config_hash))
                bar.update(len(rows))
        else:
            futures = {
                client.submit(_guarded, run_shard, cfg_dict, str(run_dir), shard, rows, meta["classes"], config_hash, key=f"extract-{config_hash}-{shard}", pure=False): shard
                for shard, rows in todo.items()
            }
            results = []
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(len(todo[futures[future]]))
    for result in results:
        if "error" in result:
            summary["failed_shards"].append(result["shard"])
            rows = todo[result["shard"]]
            failure_rows = [dict(clip_id=c, source=s, stage="extract", error_type=result["error_type"], message=f"shard {result['shard']}: {result['error']}") for c, s in zip(rows["clip_id"], rows["source"])]
            write_table_atomic(failures_table(failure_rows), run_dir / "failures" / part_name(result["shard"]))
            log.error("shard %d failed: %s", result["shard"], result["error"])
    summary["parts"] = len(tube_files(run_dir))
    return summary


def _guarded(fn, cfg_dict, run_dir, shard, rows, classes, config_hash) -> dict:
    """Run a shard; an exception becomes a result naming it, so one bad shard never stops the others."""
    try:
        return fn(cfg_dict, run_dir, shard, rows, classes, config_hash)
    except Exception as err:  # noqa: BLE001 - reported per shard in failures/ and in the summary
        return dict(shard=shard, error=f"{type(err).__name__}: {err}", error_type=type(err).__name__)
