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
from pipeline.runtime.builders import build_explainer, clip_loader, torch_threads
from pipeline.runtime.cluster import is_local, offers_gpus, worker_gpu
from pipeline.runtime.inprocess import in_process_setting, in_this_process
from pipeline.runtime.job import GPU
from pipeline.runtime.local import driver_threads, local_workers
from pipeline.runtime.tasks import follow
from pipeline.store import (
    ALL_LABEL,
    ALL_NAME,
    UNLABELLED,
    UNLABELLED_NAME,
    boxes_path,
    decode_column,
    failure_row,
    failures_table,
    file_metadata,
    part_name,
    read_boxes,
    read_index,
    read_tubes,
    shard_failure_rows,
    shard_parts,
    write_table_atomic,
)
from pipeline.store.provenance import digest, fingerprint

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
    if ev.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"evaluate.device must be auto, cpu or cuda, got {ev.device!r}")
    in_process_setting(cfg, "evaluate")
    if not cfg.model.get("checkpoint"):
        raise ConfigError(
            "stage=evaluate needs trained weights (model.checkpoint): the randomisation check compares them with random ones"
        )


def on_driver_threads(cfg, client) -> bool:
    """Whether the shards run on threads of this process (``evaluate.in_process``): ``auto`` = on the CPU, with a
    local cluster this command has not started yet (a cluster an extract started is used, being up)."""
    setting = in_process_setting(cfg, "evaluate")
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
    log.info("evaluate: on %d thread(s) of this process (evaluate.in_process)", count)
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


def evaluate_shard(
    cfg_dict: dict, run_dir: str, shard: int, rows: pd.DataFrame, boxes: pd.DataFrame | None, settings_hash: str
) -> dict:
    """Evaluate one shard's clips and publish ``evaluate/part-NNNNN.parquet``. Runs in a Dask worker."""
    cfg = OmegaConf.create(cfg_dict)
    torch.set_num_threads(torch_threads(cfg))  # as the extractor: a fixed count per task, no oversubscription
    ev = cfg.evaluate
    device = _device(ev.device)
    rows = rows.reset_index(drop=True)
    # the shard's own part file(s) (one per DDP rank) hold its tubes: no scan of the whole run per shard
    wanted = [("clip_id", "in", rows["clip_id"].tolist()), ("target_rank", "=", 0)]
    stored = (
        pq.ParquetDataset(shard_parts(Path(run_dir) / "tubes", shard), filters=wanted)
        .read(columns=["clip_id", *VOLUME_COLUMNS])
        .to_pandas()
    )
    native = dict(zip(stored["clip_id"], decode_column(stored)))
    # the randomised network is seeded by its own config (init_seed): this task leaves torch's default generator,
    # which the threads of one process share (evaluate.in_process), alone
    random_explainer = build_explainer(cfg, _randomised(cfg)).to(device)
    random_tubes = {}
    loader = clip_loader(cfg, rows, int(ev.batch_size))
    normalise = Normalise(cfg.model.input.mean, cfg.model.input.std).to(device)
    for batch in loader:  # pass 1: the randomised model's tubes (the explainer cache holds one model)
        if batch["video"] is not None:  # (no inference_mode: a gradient method needs autograd)
            x = normalise(batch["video"].to(device))
            targets = torch.tensor(rows["target"].to_numpy()[batch["positions"].numpy()], device=device)
            tubes = random_explainer(x, lambda logits, t=targets: t[:, None]).tubes[:, 0].detach().cpu()
            random_tubes.update(zip(batch["positions"].tolist(), tubes))
    explainer = build_explainer(cfg).to(device)
    generator = torch.Generator().manual_seed(int(ev.seed) + shard)
    all_boxes = clip_boxes(rows, boxes)
    results, failures = [], []
    with torch.inference_mode():
        for batch in loader:
            for position, error_type, message in batch["failures"]:
                failures.append(
                    failure_row(rows.clip_id[position], rows.source[position], "evaluate", error_type, message)
                )
            if batch["video"] is None:
                continue
            pos = batch["positions"].numpy()
            x = normalise(batch["video"].to(device))
            nat = torch.stack([torch.from_numpy(native[c]) for c in rows["clip_id"].to_numpy()[pos]]).to(device)
            metrics = evaluate_batch(
                explainer.net,
                x,
                upsample(nat, x.shape[2:]),
                nat,
                torch.stack([random_tubes[p] for p in pos]).to(device),
                torch.tensor(rows["target"].to_numpy()[pos], device=device),
                all_boxes[pos].to(device),
                batch["crop_box"].to(device),
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
    write_table_atomic(
        pa.Table.from_pandas(table, preserve_index=False),
        Path(run_dir) / "evaluate" / part_name(shard),
        {"evaluate_hash": settings_hash},
    )
    failure_path = Path(run_dir) / "failures" / f"evaluate-{shard:05d}.parquet"
    if failures:
        write_table_atomic(failures_table(failures), failure_path)
    else:
        failure_path.unlink(missing_ok=True)
    return dict(shard=shard, clips=len(table), failures=len(failures))


def aggregate(run_dir: Path) -> pd.DataFrame:
    """Per method and class (and ``(all)``, label -1): clips and mean of each metric and curve, with the
    deletion / insertion protocol that made them (``protocol``).

    The per-clip tables are small (a few numbers per clip), so they are read whole: 100,000 clips are a few
    tens of megabytes.
    """
    files = sorted((run_dir / "evaluate").glob("part-*.parquet"))
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


def run(cfg, run_dir: Path, client=None) -> dict:
    ev = cfg.evaluate
    _, meta = read_index(run_dir)
    rows = pick_clips(run_dir, None if ev.clips_per_class is None else int(ev.clips_per_class), int(ev.seed))
    path = boxes_path(cfg, meta)
    boxes = read_boxes(path) if path else None
    settings = dict(evaluate=OmegaConf.to_container(ev, resolve=True), tubes=fingerprint(cfg))
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    todo, shards = {}, {}
    for shard, part in rows.groupby("shard", sort=True):
        settings_hash = digest([settings, part["clip_id"].tolist()])
        shards[shard] = part
        out = run_dir / "evaluate" / part_name(shard)
        if not (out.is_file() and file_metadata(out).get("evaluate_hash") == settings_hash):
            todo[shard] = (part, settings_hash)
    for stale in (run_dir / "evaluate").glob("part-*.parquet"):  # shards with no evaluated clip any more
        if int(stale.stem.split("-")[1]) not in shards:
            stale.unlink()
            (run_dir / "failures" / f"evaluate-{stale.stem.split('-')[1]}.parquet").unlink(missing_ok=True)
    for shard in todo:  # results of older settings must not outlive a rerun that fails
        (run_dir / "evaluate" / part_name(shard)).unlink(missing_ok=True)
    log.info("evaluate: %d clips in %d shards, %d to run", len(rows), len(shards), len(todo))

    def shard_boxes(part):
        return None if boxes is None else boxes[boxes["video_id"].isin(set(part["video_id"]))]

    # as the extractor: on GPU workers each task holds one worker's GPU=1 resource, so tasks never share a device
    threads = bool(todo) and on_driver_threads(cfg, client)
    gpu = (
        not threads
        and client is not None
        and ev.device != "cpu"
        and str(cfg.trainer.accelerator) != "cpu"
        and offers_gpus(cfg.cluster)
    )
    jobs = {shard: (cfg_dict, str(run_dir), shard, part, shard_boxes(part), d) for shard, (part, d) in todo.items()}
    errors = []
    with (
        _runner(cfg, client, threads) as runner,
        tqdm(
            total=len(rows), initial=len(rows) - sum(len(p) for p, _ in todo.values()), desc="evaluate", unit="clip"
        ) as bar,
    ):
        for shard, _, error in follow(
            runner, evaluate_shard, jobs, name="evaluate", resources={GPU: 1} if gpu else None
        ):
            bar.update(len(todo[shard][0]))
            if error is None:
                continue
            errors.append(shard)
            message = f"shard {shard}: {type(error).__name__}: {error}"
            failures = shard_failure_rows(todo[shard][0], "evaluate", type(error).__name__, message)
            write_table_atomic(failures_table(failures), run_dir / "failures" / f"evaluate-{shard:05d}.parquet")
            trace = run_dir / "logs" / f"evaluate-{shard:05d}.log"
            trace.parent.mkdir(parents=True, exist_ok=True)
            trace.write_text(error.remote_traceback)
            log.error("evaluate %s (%s)", message, trace)
    if not list((run_dir / "evaluate").glob("part-*.parquet")):
        raise StageFailed(f"{run_dir}: no clip could be evaluated; see {run_dir / 'failures'}")
    table = aggregate(run_dir)
    write_table_atomic(pa.Table.from_pandas(table, preserve_index=False), run_dir / "stats" / "faithfulness.parquet")
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
    summary = dict(
        clips=len(rows),
        failed_shards=sorted(errors),
        overall=overall.drop(columns=CURVES).to_dict("records"),
    )
    if errors:  # the command's exit status says so (pipeline.__main__)
        summary["left"] = (
            f"evaluate: {len(shards) - len(errors)} of {len(shards)} shards done, {len(errors)} failed "
            f"(shards {sorted(errors)}); see {run_dir / 'logs'}, fix the cause and rerun the same command to resume"
        )
    return summary
