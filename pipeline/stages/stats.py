"""Stats stage: ``tubes/*.parquet`` -> ``stats/per_class.parquet``, ``stats/overall.parquet``,
``stats/per_split.parquet`` (the same per split), where the dataset has ground-truth boxes
``stats/pointing.parquet`` (a folder of Parquet parts, one row per clip time step, with its ``step``) and
``stats/pointing_steps.parquet`` (the pointing game per class and time step), and with
``stats.compare_runs`` ``stats/agreement.parquet`` (per clip) and ``stats/agreement_per_class.parquet``.

Per-clip statistics come with each tube; this stage only aggregates them with dask.dataframe over all part
files, never loading a volume (memory does not grow with the dataset). Aggregates use each clip's first target (``target_rank == 0``). List statistics (the temporal
profile, the coarse spatial density map) are averaged element-wise; the distributions of concentration, entropy
and border mass are kept as histograms (``top10_mass_hist`` ...: share of clips in each tenth of [0, 1]).

Agreement between methods: ``stats.compare_runs`` names other runs over the same index (e.g. ``[gradcam]``); for
each clip and target in both, the Spearman correlation of the two tubes (at the layer's resolution, or the
input's when the layers differ), read part file by part file.

Pointing game: per clip time step whose frame has a box, a hit when the tube's peak (in source pixels) lies in the
box grown by ``stats.pointing_tolerance`` pixels; chance: the share of the model's view the box covers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import ConfigError, MissingInput, StageFailed
from pipeline.explain.clipstats import peak_in_box
from pipeline.explain.faithfulness import spearman
from pipeline.explain.upsample import upsample
from pipeline.stages.result import StageResult
from pipeline.store import (
    ALL_LABEL,
    ALL_NAME,
    REPAIR,
    UNLABELLED,
    UNLABELLED_NAME,
    boxes_path,
    decode_column,
    read_boxes,
    read_failures,
    read_index,
    readable,
    replace_folder,
    require_tubes,
    tube_files,
    write_table_atomic,
)
from pipeline.store.provenance import check_tubes_made_by
from pipeline.store.run_dir import RunDir
from pipeline.store.schema import CLIP_STATISTICS

log = logging.getLogger(__name__)

#: where the statistics that were aggregated before they were declared in one place stand in the tables (their
#: column order is part of the files' bytes); statistics declared after them come last, in declaration order
_TABLE_ORDER = ("mass", "top10_mass", "entropy", "centroid_t", "centroid_y", "centroid_x", "peak_t", "border_mass")
_AGGREGATED = sorted(
    (s for s in CLIP_STATISTICS if s.per_class is not None),
    key=lambda s: _TABLE_ORDER.index(s.name) if s.name in _TABLE_ORDER else len(_TABLE_ORDER),
)
SCALAR_STATS = ["target_prob", "pred_prob", *(s.name for s in _AGGREGATED if not s.is_list)]
LIST_STATS = [s.name for s in _AGGREGATED if s.is_list]
#: per-clip statistics in [0, 1] whose distribution per class is kept as a histogram of HIST_BINS equal bins
HISTOGRAMS = [s.name for s in _AGGREGATED if s.per_class == "histogram"]
HIST_BINS = 10
COLUMNS = [
    "clip_id",
    "video_id",
    "label",
    "label_name",
    "split",
    "method",
    "target_rank",
    "pred",
    "model_label",
    "frame_indices",
    "crop_box",
    "frame_peak_x",
    "frame_peak_y",
    *LIST_STATS,
    *SCALAR_STATS,
]
GROUP = ["method", "label", "label_name"]
#: Li et al.'s pointing tolerance: 7 px at a 112 px input, as a share of the model's view
LI2021_TOLERANCE = 7 / 112
POINTING_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("clip_id", pa.string()),
        ("frame", pa.int64()),
        ("step", pa.int64()),
        ("hit", pa.float64()),
        ("hit_li2021", pa.float64()),
        ("chance", pa.float64()),
    ]
)


def _prepare(part: pd.DataFrame, lengths: dict[str, int]) -> pd.DataFrame:
    """Per-partition: first targets only, a correctness flag and each list statistic as one column per element."""
    part = part[part["target_rank"] == 0]
    out = part[GROUP + ["split"] + [c for c in SCALAR_STATS if c in part.columns]].copy()
    out["label"] = out["label"].fillna(UNLABELLED).astype("int64")
    out["label_name"] = out["label_name"].fillna(UNLABELLED_NAME).astype(object)
    out["split"] = out["split"].fillna("(none)").astype(object)
    truth = part["model_label"] if "model_label" in part.columns else part["label"]  # the label as a model class
    out["correct"] = (part["pred"] == truth).astype("float64").where(truth.notna())
    expanded = {}  # built apart and joined once (inserting columns one by one fragments the frame)
    for name, length in lengths.items():
        values = np.stack(part[name].to_numpy()) if len(part) else np.zeros((0, length))
        for i in range(length):
            expanded[f"{name}__{i:03d}"] = values[:, i].astype("float64")
    for name in HISTOGRAMS:  # one-hot bins: their mean per group is the share of clips in each bin
        if name in part.columns:
            bins = np.clip((part[name].to_numpy(dtype="float64") * HIST_BINS).astype(int), 0, HIST_BINS - 1)
            for b in range(HIST_BINS):
                expanded[f"{name}_hist__{b:03d}"] = (bins == b).astype("float64")
    return pd.concat([out, pd.DataFrame(expanded, index=out.index)], axis=1)


def pointing_rows(part: pd.DataFrame, boxes: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """One row per clip time step that has a ground-truth box: hit (0/1) and the chance of a random hit."""
    part = part[part["target_rank"] == 0]
    crop = np.stack(part["crop_box"].to_numpy()) if len(part) else np.zeros((0, 4))
    keep = ["method", "label", "label_name", "split", "clip_id", "video_id"]
    steps = part[[*keep, "frame_indices", "frame_peak_x", "frame_peak_y"]].assign(
        label=part["label"].fillna(UNLABELLED).astype("int64"),
        label_name=part["label_name"].fillna(UNLABELLED_NAME).astype(object),
        split=part["split"].fillna("(none)").astype(object),
        cx0=crop[:, 0],
        cy0=crop[:, 1],
        cx1=crop[:, 2],
        cy1=crop[:, 3],
    )
    steps = steps.explode(["frame_indices", "frame_peak_x", "frame_peak_y"], ignore_index=True)
    steps["step"] = steps.groupby(["method", "clip_id"], sort=False).cumcount()  # the clip's time step
    steps = steps.rename(columns={"frame_indices": "frame", "frame_peak_x": "px", "frame_peak_y": "py"})
    steps = steps.astype({"frame": "int64", "step": "int64", "px": "float64", "py": "float64", "video_id": object})
    merged = steps.merge(boxes, on=["video_id", "frame"], how="inner")
    x0, y0 = merged["x0"] - tolerance, merged["y0"] - tolerance
    x1, y1 = merged["x1"] + tolerance, merged["y1"] + tolerance
    hit = peak_in_box(merged["px"], merged["py"], merged["x0"], merged["y0"], merged["x1"], merged["y1"], tolerance)
    # Li et al. (WACV 2021): the box grown by 7 px at a 112 px input, scaled with the input (7/112 of the model's
    # view on each axis, here in source pixels), bounds included
    tol_x, tol_y = (
        LI2021_TOLERANCE * (merged["cx1"] - merged["cx0"]),
        LI2021_TOLERANCE * (merged["cy1"] - merged["cy0"]),
    )
    hit_li = (
        (merged["px"] >= merged["x0"] - tol_x)
        & (merged["px"] <= merged["x1"] + tol_x)
        & (merged["py"] >= merged["y0"] - tol_y)
        & (merged["py"] <= merged["y1"] + tol_y)
    )
    inter_w = (np.minimum(x1, merged["cx1"]) - np.maximum(x0, merged["cx0"])).clip(lower=0)
    inter_h = (np.minimum(y1, merged["cy1"]) - np.maximum(y0, merged["cy0"])).clip(lower=0)
    chance = inter_w * inter_h / ((merged["cx1"] - merged["cx0"]) * (merged["cy1"] - merged["cy0"]))
    return merged[["method", "label", "label_name", "split", "clip_id", "frame", "step"]].assign(
        hit=hit.astype("float64"), hit_li2021=hit_li.astype("float64"), chance=chance.astype("float64")
    )


#: the four groupings of every table: per class, over all classes, and both per split
GROUPINGS = {
    "per_class": (GROUP, False),
    "overall": (GROUP, True),
    "per_split": (["split", *GROUP], False),
    "split_totals": (["split", *GROUP], True),
}


def _grouped(frame: dd.DataFrame, keys: list[str], everyone: bool):
    return (frame.assign(label=ALL_LABEL, label_name=ALL_NAME) if everyone else frame).groupby(keys, dropna=False)


def aggregate_all(prepared: dd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every grouping of :data:`GROUPINGS` in one Dask computation, so the part files are read once."""
    columns = [c for c in prepared.columns if c not in GROUP + ["split"]]
    lazy = {}
    for name, (keys, everyone) in GROUPINGS.items():
        grouped = _grouped(prepared, keys, everyone)
        lazy[name] = (grouped[columns].mean(), grouped["target_prob"].count())
    computed = dask.compute(lazy)[0]
    tables = {}
    for name, (means, counts) in computed.items():
        table = (
            # copy(): consolidated first. A mean computed on distributed workers comes back with one block per
            # column (hundreds: the expanded list statistics), and reset_index's insert then warns (pandas
            # PerformanceWarning, once per grouping and part) on a highly fragmented frame
            means.join(counts.rename("clips"))
            .copy()
            .reset_index()
            .rename(columns={"correct": "accuracy", "target_prob": "mean_target_prob", "pred_prob": "mean_pred_prob"})
        )
        lists, expanded = {}, []
        for stat in [*LIST_STATS, *(f"{h}_hist" for h in HISTOGRAMS)]:
            cols = sorted(c for c in table.columns if c.startswith(f"{stat}__"))
            if cols:
                lists[stat] = list(table[cols].to_numpy(dtype=np.float32))
                expanded += cols
        tables[name] = table.drop(columns=expanded).assign(**lists)
    return tables


#: the pointing game per clip time step, per class and over all classes (``stats/pointing_steps.parquet``)
STEP_GROUPINGS = {"per_step": ([*GROUP, "step"], False), "step_totals": ([*GROUP, "step"], True)}


def pointing_all(steps: dd.DataFrame) -> dict[str, pd.DataFrame]:
    """Pointing game and chance for every grouping of :data:`GROUPINGS` and :data:`STEP_GROUPINGS`, in one Dask
    computation: ``pointing_game`` (this project's: hits over all boxed frames, ``stats.pointing_tolerance``) and
    ``pointing_game_li2021`` (Li et al.: 7/112 of the view's tolerance; over several classes, the mean of the
    per-class accuracies)."""
    lazy = {
        name: _grouped(steps, keys, everyone).agg({"hit": ["count", "mean"], "hit_li2021": "mean", "chance": "mean"})
        for name, (keys, everyone) in {**GROUPINGS, **STEP_GROUPINGS}.items()
    }
    tables = {}
    for name, agg in dask.compute(lazy)[0].items():
        agg.columns = ["pointing_frames", "pointing_game", "pointing_game_li2021", "pointing_chance"]
        tables[name] = agg.reset_index()
    for total, per_class, keys in (
        ("overall", "per_class", ["method"]),
        ("split_totals", "per_split", ["split", "method"]),
        ("step_totals", "per_step", ["method", "step"]),
    ):
        means = tables[per_class].groupby(keys)["pointing_game_li2021"].mean()
        table = tables[total].drop(columns="pointing_game_li2021")
        tables[total] = table.merge(means.reset_index(), on=keys, how="left")
    return tables


def write_pointing(tubes: dd.DataFrame, boxes: pd.DataFrame, tolerance: float, out: Path) -> dd.DataFrame:
    """Write the per-time-step pointing rows to the folder ``out`` (replaced whole) and return them lazily."""
    rows = tubes.map_partitions(pointing_rows, boxes, tolerance, meta=pointing_rows(tubes._meta, boxes, 0.0))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rows.to_parquet(tmp, write_index=False, compression="zstd", schema=POINTING_SCHEMA)
    replace_folder(tmp, out)
    return dd.read_parquet(out)


def tube_agreement(part_file: Path, other_dir: Path, other_run: str) -> pd.DataFrame:
    """Spearman correlation of each first-target tube of ``part_file`` with the other run's tube of the same
    clip and target class (the other run's part file of the same name, else all of its files)."""
    columns = [
        "clip_id",
        "label",
        "label_name",
        "method",
        "target",
        "input_size",
        "volume",
        "volume_shape",
        "volume_codec",
        "volume_scale",
    ]
    mine = pq.read_table(part_file, columns=columns, filters=[("target_rank", "=", 0)]).to_pandas()
    empty = pd.DataFrame(
        {
            "clip_id": pd.Series(dtype=object),
            "label": pd.Series(dtype="int64"),
            "label_name": pd.Series(dtype=object),
            "method": pd.Series(dtype=object),
            "other_run": pd.Series(dtype=object),
            "other_method": pd.Series(dtype=object),
            "target": pd.Series(dtype="int64"),
            "spearman": pd.Series(dtype="float64"),
        }
    )
    if mine.empty:
        return empty
    same = RunDir(other_dir).tubes / part_file.name
    sources = [same] if same.is_file() else tube_files(other_dir)
    wanted = [("clip_id", "in", mine["clip_id"].tolist())]
    theirs = (
        pq.ParquetDataset(sources, filters=wanted)
        .read(columns=[c for c in columns if c not in ("label", "label_name")])
        .to_pandas()
    )
    if same.is_file() and not set(mine["clip_id"]) <= set(theirs["clip_id"]):  # sharded differently: look everywhere
        theirs = (
            pq.ParquetDataset(tube_files(other_dir), filters=wanted)
            .read(columns=[c for c in columns if c not in ("label", "label_name")])
            .to_pandas()
        )
    pairs = mine.merge(theirs, on=["clip_id", "target"], suffixes=("", "_other"))
    if pairs.empty:
        return empty
    a = decode_column(pairs)
    b = decode_column(
        pd.DataFrame({c: pairs[f"{c}_other"] for c in ("volume", "volume_shape", "volume_codec", "volume_scale")})
    )
    rho = np.empty(len(pairs))
    for i, (va, vb, size) in enumerate(zip(a, b, pairs["input_size"])):
        ta, tb = torch.from_numpy(va)[None], torch.from_numpy(vb)[None]
        if ta.shape != tb.shape:  # different layers: compare at the clip's input size
            size = tuple(int(s) for s in size)
            ta, tb = upsample(ta, size), upsample(tb, size)
        rho[i] = float(spearman(ta, tb)[0])
    return pd.DataFrame(
        dict(
            clip_id=pairs["clip_id"],
            label=pairs["label"].fillna(UNLABELLED).astype("int64"),
            label_name=pairs["label_name"].fillna(UNLABELLED_NAME).astype(object),
            method=pairs["method"],
            other_run=other_run,
            other_method=pairs["method_other"],
            target=pairs["target"].astype("int64"),
            spearman=rho,
        )
    )


def agreement(run_dir: Path, others: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-clip and per-class agreement of this run's tubes with each of the ``others`` runs."""
    frames = []
    for name in others:
        other_dir = run_dir.parent / str(name)
        if not tube_files(other_dir):
            raise MissingInput(
                f"stats.compare_runs: {RunDir(other_dir).tubes} has no tube files; extract run {name!r} first"
            )
        frames += dask.compute(*[dask.delayed(tube_agreement)(f, other_dir, str(name)) for f in tube_files(run_dir)])
    clips = pd.concat(frames, ignore_index=True)
    keys = ["method", "other_run", "other_method", "label", "label_name"]
    both = pd.concat([clips, clips.assign(label=ALL_LABEL, label_name=ALL_NAME)], ignore_index=True)
    per_class = (
        both.groupby(keys, dropna=False)
        .agg(clips=("spearman", "count"), spearman=("spearman", "mean"), spearman_median=("spearman", "median"))
        .reset_index()
    )
    return clips, per_class


def _list_lengths(files: list[Path]) -> dict[str, int]:
    """Length of each list statistic, from the first non-empty part file (absent in runs made before it existed)."""
    for f in files:
        if pq.read_metadata(f).num_rows:
            names = [n for n in LIST_STATS if n in pq.read_schema(f).names]
            row = pq.read_table(f, columns=names).slice(0, 1).to_pylist()[0]
            return {n: len(row[n]) for n in names}
    return {}


def validate(cfg, upstream: tuple[str, ...] = ()) -> None:
    """Settings of this stage, checked before any work starts."""
    if float(cfg.stats.pointing_tolerance) < 0:
        raise ConfigError(f"stats.pointing_tolerance must be >= 0, got {cfg.stats.pointing_tolerance}")
    others = cfg.stats.compare_runs
    if isinstance(others, str) or not all(isinstance(name, str) and name and "/" not in name for name in others):
        raise ConfigError(f"stats.compare_runs must be a list of run names (folders beside this run), got {others!r}")
    if cfg.run_name in others:
        raise ConfigError(f"stats.compare_runs names this run itself ({cfg.run_name!r})")


def run(cfg, run_dir: Path, client=None) -> StageResult:
    """Aggregate the run's tubes into ``stats/``; an unreadable part is named with the command that repairs it."""
    files = require_tubes(run_dir)
    check_tubes_made_by(run_dir, cfg, "stats")
    with readable(files, REPAIR["tubes"]):
        overall = _aggregate(cfg, run_dir, files)
    figures = {
        f"{row['method']}/{name}": float(value)
        for row in overall
        for name, value in row.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    return StageResult("stats", clips=int(sum(row.get("clips", 0) for row in overall)), figures=figures)


def _aggregate(cfg, run_dir: Path, files: list[Path]) -> dict:
    if all(pq.read_metadata(f).num_rows == 0 for f in files):
        failures = read_failures(run_dir)
        reasons = failures["error_type"].value_counts().to_dict() if len(failures) else {}
        raise StageFailed(
            f"{run_dir}: no clip has a tube, so there is nothing to aggregate; failures by reason: {reasons} (see {RunDir(run_dir).failures})"
        )
    lengths = _list_lengths(files)
    present = set(pq.read_schema(files[0]).names)
    tubes = dd.read_parquet([str(f) for f in files], columns=[c for c in COLUMNS if c in present])
    prepared = tubes.map_partitions(_prepare, lengths, meta=_prepare(tubes._meta, lengths))
    tables = aggregate_all(prepared)

    run = RunDir(run_dir)
    out = run.stats
    out.mkdir(parents=True, exist_ok=True)
    _, meta = read_index(run_dir)
    path = boxes_path(cfg, meta)
    if path:
        steps = write_pointing(tubes, read_boxes(path), float(cfg.stats.pointing_tolerance), run.table("pointing"))
        points = pointing_all(steps)
        for name, (keys, _) in GROUPINGS.items():
            tables[name] = tables[name].merge(points[name], on=keys, how="left")
        per_step = pd.concat([points["per_step"], points["step_totals"]], ignore_index=True)
        write_table_atomic(
            pa.Table.from_pandas(per_step.sort_values([*GROUP, "step"]), preserve_index=False),
            run.table("pointing_steps"),
        )
    else:  # a table of an earlier run with boxes must not outlive them
        run.table("pointing_steps").unlink(missing_ok=True)
    per_class, overall = tables["per_class"], tables["overall"]
    per_split = pd.concat([tables["per_split"], tables["split_totals"]], ignore_index=True)

    others = list(cfg.stats.compare_runs)
    if others:
        clips, by_class = agreement(run_dir, others)
        write_table_atomic(pa.Table.from_pandas(clips, preserve_index=False), run.table("agreement"))
        write_table_atomic(pa.Table.from_pandas(by_class, preserve_index=False), run.table("agreement_per_class"))

    write_table_atomic(pa.Table.from_pandas(per_class.sort_values(GROUP), preserve_index=False), run.table("per_class"))
    write_table_atomic(pa.Table.from_pandas(overall, preserve_index=False), run.table("overall"))
    write_table_atomic(
        pa.Table.from_pandas(per_split.sort_values(["split", *GROUP]), preserve_index=False), run.table("per_split")
    )
    log.info("stats: %d classes -> %s", len(per_class), out)
    return json.loads(
        overall.drop(columns=[c for c in overall if isinstance(overall[c].iloc[0], np.ndarray)]).to_json(
            orient="records"
        )
    )
