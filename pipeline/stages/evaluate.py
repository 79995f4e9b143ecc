"""Evaluate stage (opt-in): how faithful the run's tubes are -> ``evaluate/part-NNNNN.parquet`` per shard and
``stats/faithfulness.parquet`` per class.

For each evaluated clip (the first target's tube, as stored): deletion and insertion curves and their AUC, the
same curves for a random tube of the same resolution (the baseline a tube has to beat), the Spearman
correlation between the stored tube and the tube of the same network with re-initialised weights (the
randomisation sanity check), and, where the dataset has ground-truth boxes, the tube's IoU with them.

The stage reuses the extractor's pieces: the explainer of :func:`pipeline.runtime.shard.build_explainer`
(trained and randomised), :class:`pipeline.data.clips.ClipDataset` to decode clips and
:func:`pipeline.store.read_tubes` for the stored tubes. Like extract it runs one Dask task per shard, batched
on the device, and a finished shard is not recomputed.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from pipeline.errors import ConfigError, StageFailed
from pipeline.explain import faithfulness as fm
from pipeline.explain.protocols import protocol_from, protocol_setting
from pipeline.explain.upsample import upsample
from pipeline.models.inputs import Normalise
from pipeline.runtime.builders import build_explainer, clip_loader
from pipeline.runtime.cluster import is_local, offers_gpus, worker_gpu
from pipeline.runtime.engine import attempts, left_message, run_plan
from pipeline.runtime.inprocess import in_process_setting, in_this_process
from pipeline.runtime.job import GPU, ShardResult
from pipeline.runtime.local import driver_threads, local_workers
from pipeline.runtime.planning import Published, ShardWork, plan, shards_of
from pipeline.runtime.resolve import config_of_task, task_config, torch_threads
from pipeline.runtime.tasks import Task
from pipeline.stages.result import StageResult
from pipeline.store import (
    ALL_LABEL,
    ALL_NAME,
    UNLABELLED,
    UNLABELLED_NAME,
    Failure,
    boxes_path,
    decode_column,
    failures_table,
    file_metadata,
    read_boxes,
    read_index,
    read_tubes,
    write_table_atomic,
)
from pipeline.store.provenance import digest, fingerprint
from pipeline.store.run_dir import RunDir

log = logging.getLogger(__name__)

CLIP_COLUMNS = [
    "clip_id",
    "video_id",
    "source",
    "label",
    "label_name",
    "split",
    "frame_indices",
    "crop_box",
    "method",
    "target",
    "shard",
]
METRICS = [
    "deletion_auc",
    "insertion_auc",
    "random_deletion_auc",
    "random_insertion_auc",
    "randomisation_spearman",
    "tube_iou",
]
CURVES = ["deletion_curve", "insertion_curve", "random_deletion_curve", "random_insertion_curve"]
GROUP = ["method", "label", "label_name"]
#: the deletion / insertion protocol of a row (evaluate.protocol), kept with every row and aggregate
PROTOCOL = "protocol"
VOLUME_COLUMNS = ["volume", "volume_shape", "volume_codec", "volume_scale"]


def validate(cfg, upstream: tuple[str, ...] = ()) -> None:
    """Settings of this stage, checked before any work starts."""
    ev = cfg.evaluate
    if ev.baseline not in fm.BASELINES:
        raise ConfigError(f"evaluate.baseline must be one of {fm.BASELINES}, got {ev.baseline!r}")
    protocol, _, cells = protocol_setting(ev)
    if int(ev.batch_size) < 1:
        raise ConfigError(f"evaluate.batch_size must be >= 1, got {ev.batch_size}")
    if cells is not None and cells > min(int(s) for s in cfg.model.input.size):
        raise ConfigError(
            f"evaluate.cells={cells} is more cells than input pixels ({protocol}: model.input.size={list(cfg.model.input.size)})"
        )
    if float(ev.blur_sigma) <= 0:
        raise ConfigError(f"evaluate.blur_sigma must be > 0, got {ev.blur_sigma}")
    if ev.clips_per_class is not None and int(ev.clips_per_class) < 1:
        raise ConfigError(f"evaluate.clips_per_class must be >= 1 or null (all clips), got {ev.clips_per_class}")
    if not 0 < float(ev.iou_level) <= 1:
        raise ConfigError(f"evaluate.iou_level must be in (0, 1], got {ev.iou_level}")
    if int(ev.retries) < 0:
        raise ConfigError(f"evaluate.retries must be >= 0, got {ev.retries}")
    if ev.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"evaluate.device must be auto, cpu or cuda, got {ev.device!r}")
    if not cfg.model.get("checkpoint"):
        raise ConfigError(
            "stage=evaluate needs trained weights (model.checkpoint): the randomisation check compares them with random ones"
        )


def on_driver_threads(cfg, client) -> bool:
    """Whether the shards run on threads of this process (``execution``): ``auto`` = on the CPU, with a
    local cluster this command has not started yet (a cluster an extract started is used, being up)."""
    setting = in_process_setting(cfg)
    if setting != "auto":
        return bool(setting)
    on_cpu = str(cfg.trainer.accelerator) == "cpu" and cfg.evaluate.device != "cuda"
    return on_cpu and client is not None and not getattr(client, "started", True) and is_local(cfg.cluster)


@contextlib.contextmanager
def _runner(cfg, client, threads: bool):
    """Where the shards run: ``client``'s cluster or, with ``threads``, a cluster of threads of this process (as
    many as the local cluster's workers), this process's torch thread count restored afterwards."""
    if not threads:
        yield client
        return
    count = local_workers(cfg.cluster.get("n_workers", "auto"))
    log.info("evaluate: on %d thread(s) of this process (execution)", count)
    with in_this_process(), driver_threads(count) as runner:
        yield runner


def pick_clips(run_dir: Path, per_class: int | None, seed: int) -> pd.DataFrame:
    """The first-target tube rows to evaluate: all, or ``per_class`` clips per class drawn at random."""
    rows = read_tubes(run_dir, columns=CLIP_COLUMNS, filters=[("target_rank", "=", 0)])
    if per_class is not None:
        rows = (
            rows.sample(frac=1.0, random_state=seed)
            .groupby(rows["label_name"].fillna(UNLABELLED_NAME), sort=False)
            .head(per_class)
        )
    return rows.sort_values("clip_id").reset_index(drop=True)


def _device(setting: str) -> torch.device:
    """The task's device: on a GPU cluster, the GPU of the Dask worker running it (one worker per GPU)."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", worker_gpu(torch.cuda.device_count()))
    return torch.device("cpu")


def _randomised(cfg):
    """The model config with no checkpoint: the same network with freshly initialised weights (seeded by
    ``evaluate.seed``, so the check is reproducible)."""
    return OmegaConf.merge(
        OmegaConf.to_container(cfg.model, resolve=True), {"checkpoint": None, "init_seed": int(cfg.evaluate.seed) + 1}
    )


def clip_boxes(rows: pd.DataFrame, boxes: pd.DataFrame | None) -> torch.Tensor:
    """``(N, T, 4)`` ground-truth boxes of each clip time step (NaN where the frame has none)."""
    steps = max(len(f) for f in rows["frame_indices"])
    out = np.full((len(rows), steps, 4), np.nan, dtype=np.float32)
    if boxes is not None:
        lookup = boxes.set_index(["video_id", "frame"])[["x0", "y0", "x1", "y1"]]
        lookup = lookup[~lookup.index.duplicated()]
        for i, (video, frames) in enumerate(zip(rows["video_id"], rows["frame_indices"])):
            keys = pd.MultiIndex.from_arrays([[str(video)] * len(frames), [int(f) for f in frames]])
            out[i, : len(frames)] = lookup.reindex(keys).to_numpy(dtype=np.float32)
    return torch.from_numpy(out)


def evaluate_batch(
    net, x, tubes, native, random_native, targets, boxes, crop_box, ev, generator
) -> dict[str, torch.Tensor]:
    """All metrics of one batch (tensors on one device).

    Args:
        net: the trained model. x: normalised clips ``(N, C, T, H, W)``.
        tubes: stored tubes at input size ``(N, T, H, W)``; native: the same at the layer's size.
        random_native: tubes of the randomised model at the layer's size.
        targets: ``(N,)``; boxes: ``(N, T, 4)`` (NaN = none); crop_box: ``(N, 4)``.
    """
    protocol = protocol_from(ev)
    random_tubes = protocol.random_tubes(native, tubes.shape[1:], generator)
    out = {}
    for prefix, saliency in (("", tubes), ("random_", random_tubes)):
        deletion, insertion = protocol.curves(net, x, saliency, targets, generator)
        out.update(
            {
                f"{prefix}deletion_curve": deletion,
                f"{prefix}insertion_curve": insertion,
                f"{prefix}deletion_auc": protocol.auc(deletion),
                f"{prefix}insertion_auc": protocol.auc(insertion),
            }
        )
    out["randomisation_spearman"] = fm.spearman(native, random_native)
    has_box = ~torch.isnan(boxes).any(2)
    masks = fm.box_masks(torch.nan_to_num(boxes), crop_box, tubes.shape[2:])
    out["tube_iou"] = fm.tube_iou(tubes, masks, has_box, float(ev.iou_level))
    return out


def evaluate_task(
    cfg_dict: dict, run_dir: str, shard: int, rows: pd.DataFrame, boxes: pd.DataFrame | None, settings_hash: str
) -> ShardResult:
    """The evaluate task of one shard, up to ``1 + evaluate.retries`` attempts, each logged in the shard's log
    (:func:`pipeline.runtime.engine.attempts`)."""
    cfg = config_of_task(cfg_dict)
    path = RunDir(run_dir).shard_log("evaluate", shard)
    work = lambda slog: evaluate_shard(cfg, RunDir(run_dir), shard, rows, boxes, settings_hash)
    return attempts(work, shard, len(rows), path, 1 + int(cfg.evaluate.retries))


def evaluate_shard(
    cfg, run: RunDir, shard: int, rows: pd.DataFrame, boxes: pd.DataFrame | None, settings_hash: str
) -> ShardResult:
    """Evaluate one shard's clips and publish ``evaluate/part-NNNNN.parquet``. Runs in a Dask worker."""
    torch.set_num_threads(torch_threads(cfg))  # as the extractor: a fixed count per task, no oversubscription
    ev = cfg.evaluate
    device = _device(ev.device)
    rows = rows.reset_index(drop=True)
    # the shard's own part file(s) (one per DDP rank) hold its tubes: no scan of the whole run per shard
    wanted = [("clip_id", "in", rows["clip_id"].tolist()), ("target_rank", "=", 0)]
    stored = (
        pq.ParquetDataset(run.parts("extract", shard), filters=wanted)
        .read(columns=["clip_id", *VOLUME_COLUMNS])
        .to_pandas()
    )
    native = dict(zip(stored["clip_id"], decode_column(stored)))
    # the randomised network is seeded by its own config (init_seed): this task leaves torch's default generator,
    # which the threads of one process share (execution), alone
    random_explainer = build_explainer(cfg, _randomised(cfg)).to(device)
    random_tubes = {}
    loader = clip_loader(cfg, rows, int(ev.batch_size))
    normalise = Normalise(cfg.model.input.mean, cfg.model.input.std).to(device)
    for batch in loader:  # pass 1: the randomised model's tubes (the explainer cache holds one model)
        if batch.video is not None:  # (no inference_mode: a gradient method needs autograd)
            x = normalise(batch.video.to(device))
            targets = torch.tensor(rows["target"].to_numpy()[batch.positions.numpy()], device=device)
            tubes = random_explainer(x, lambda logits, t=targets: t[:, None]).tubes[:, 0].detach().cpu()
            random_tubes.update(zip(batch.positions.tolist(), tubes))
    explainer = build_explainer(cfg).to(device)
    generator = torch.Generator().manual_seed(int(ev.seed) + shard)
    all_boxes = clip_boxes(rows, boxes)
    results, failures = [], []
    with torch.inference_mode():
        for batch in loader:
            for position, error_type, message in batch.failures:
                failures.append(Failure(rows.clip_id[position], rows.source[position], "evaluate", error_type, message))
            if batch.video is None:
                continue
            pos = batch.positions.numpy()
            x = normalise(batch.video.to(device))
            nat = torch.stack([torch.from_numpy(native[c]) for c in rows["clip_id"].to_numpy()[pos]]).to(device)
            metrics = evaluate_batch(
                explainer.net,
                x,
                upsample(nat, x.shape[2:]),
                nat,
                torch.stack([random_tubes[p] for p in pos]).to(device),
                torch.tensor(rows["target"].to_numpy()[pos], device=device),
                all_boxes[pos].to(device),
                batch.crop_box.to(device),
                ev,
                generator,
            )
            part = rows.iloc[pos][["clip_id", "video_id", "label", "label_name", "split", "method", "target"]].copy()
            part[PROTOCOL] = protocol_from(ev).name
            for name, value in metrics.items():
                value = value.cpu().numpy()
                part[name] = list(value.astype(np.float32)) if value.ndim == 2 else value.astype(np.float64)
            results.append(part)
    table = (
        pd.concat(results, ignore_index=True)
        if results
        else pd.DataFrame(columns=[*CLIP_COLUMNS[:6], "method", "target", PROTOCOL, *METRICS, *CURVES])
    )
    failure_path = run.failure_part("evaluate", shard)
    if failures:
        write_table_atomic(failures_table(failures), failure_path)
    else:
        failure_path.unlink(missing_ok=True)
    out = run.part("evaluate", shard)
    write_table_atomic(pa.Table.from_pandas(table, preserve_index=False), out, {"evaluate_hash": settings_hash})
    return ShardResult(
        shard, rows=len(table), clips=len(table) + len(failures), failures=len(failures), bytes=out.stat().st_size
    )


def inspect_part(parts: list[Path]) -> Published:
    """What a published evaluate part was made for: the digest of the settings and clips in its metadata."""
    try:
        return Published(file_metadata(parts[0]).get("evaluate_hash"), rows=pq.read_metadata(parts[0]).num_rows)
    except (pa.ArrowException, OSError) as err:
        return Published(None, why=f"{parts[0].name} cannot be read ({type(err).__name__}: {err})")


def aggregate(run_dir: Path) -> pd.DataFrame:
    """Per method and class (and ``(all)``, label -1): clips and mean of each metric and curve, with the
    deletion / insertion protocol that made them (``protocol``).

    The per-clip tables are small (a few numbers per clip), so they are read whole: 100,000 clips are a few
    tens of megabytes.
    """
    files = sorted(RunDir(run_dir).parts_folder("evaluate").glob("part-*.parquet"))
    keys = [*GROUP, PROTOCOL]
    clips = pd.concat([pd.read_parquet(f, columns=[*keys, *METRICS, *CURVES]) for f in files], ignore_index=True)
    clips["label"] = clips["label"].fillna(UNLABELLED).astype("int64")
    clips["label_name"] = clips["label_name"].fillna(UNLABELLED_NAME).astype(object)
    tables = []
    for data in (clips, clips.assign(label=ALL_LABEL, label_name=ALL_NAME)):
        grouped = data.groupby(keys, dropna=False)
        table = grouped[METRICS].mean().join(grouped.size().rename("clips"))
        for curve in CURVES:
            table[curve] = grouped[curve].apply(lambda c: np.stack(c.to_numpy()).mean(0).astype(np.float32))
        tables.append(table.reset_index())
    return pd.concat(tables, ignore_index=True).sort_values(keys).reset_index(drop=True)


def run(cfg, run_dir: Path, client=None) -> StageResult:
    ev = cfg.evaluate
    run = RunDir(run_dir)
    _, meta = read_index(run_dir)
    rows = pick_clips(run_dir, None if ev.clips_per_class is None else int(ev.clips_per_class), int(ev.seed))
    path = boxes_path(cfg, meta)
    boxes = read_boxes(path) if path else None
    settings = dict(evaluate=OmegaConf.to_container(ev, resolve=True), tubes=fingerprint(cfg))
    cfg_dict = task_config(cfg)
    shards = shards_of(rows, lambda clip_ids, _: digest([settings, clip_ids]))

    def shard_boxes(part):
        return None if boxes is None else boxes[boxes["video_id"].isin(set(part["video_id"]))]

    work = ShardWork(
        stage="evaluate",
        task=Task("pipeline.stages.evaluate", "evaluate_task"),
        job=lambda s: (cfg_dict, str(run_dir), s.number, s.rows, shard_boxes(s.rows), s.digest),
        inspect=inspect_part,
    )
    p = plan(work, run, shards, share=None)
    log.info("evaluate: %d clips in %d shards, %d to run", len(rows), len(shards), len(p.todo))
    # as the extractor: on GPU workers each task holds one worker's GPU=1 resource, so tasks never share a device
    threads = bool(p.todo) and on_driver_threads(cfg, client)
    gpu = (
        not threads
        and client is not None
        and ev.device != "cpu"
        and str(cfg.trainer.accelerator) != "cpu"
        and offers_gpus(cfg.cluster)
    )
    work.resources = {GPU: 1} if gpu else None
    left_clips = sum(s.clips for s in p.todo.values())
    with (
        p.ledger,
        _runner(cfg, client, threads) as runner,
        tqdm(total=len(rows), initial=len(rows) - left_clips, desc="evaluate", unit="clip") as bar,
    ):
        failed = run_plan(work, run, p.todo, p.ledger, runner, lambda s, _: bar.update(p.todo[s].clips)).failed
    if not list(run.parts_folder("evaluate").glob("part-*.parquet")):
        raise StageFailed(f"{run_dir}: no clip could be evaluated; see {run.failures} and {run.logs}")
    table = aggregate(run)
    write_table_atomic(pa.Table.from_pandas(table, preserve_index=False), run.table("faithfulness"))
    overall = table[table["label"] == -1]
    for row in overall.itertuples():
        log.info(
            "evaluate %s (%s protocol): deletion AUC %.3f (random %.3f), insertion AUC %.3f (random %.3f), "
            "randomisation spearman %.3f",
            row.method,
            row.protocol,
            row.deletion_auc,
            row.random_deletion_auc,
            row.insertion_auc,
            row.random_insertion_auc,
            row.randomisation_spearman,
        )
    figures = {}
    for row in overall.itertuples():
        figures.update({f"{row.method}/{name}": float(getattr(row, name)) for name in METRICS})
    return StageResult(
        "evaluate",
        left=left_message("evaluate", run, p),
        shards=len(shards),
        skipped=p.skipped,
        failed_shards=sorted(failed),
        clips=len(rows),
        figures=figures,
    )
