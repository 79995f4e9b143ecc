"""The pointing game: per clip time step whose frame has a ground-truth box, whether the tube's peak lies in the box.

Two definitions side by side: this project's (the box grown by ``stats.pointing_tolerance`` source pixels, hits
over all boxed frames) and Li et al.'s (WACV 2021: the box grown by 7/112 of the model's view, and over several
classes the mean of the per-class accuracies). The chance of a hit is the share of the model's view the grown box
covers. :func:`write_pointing` stores one row per time step (``stats/pointing.parquet``); :func:`pointing_all`
aggregates them per class, per split and per time step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.explain.clipstats import peak_in_box
from pipeline.store import UNLABELLED, UNLABELLED_NAME, replace_folder
from pipeline.tables.grouping import GROUP, GROUPINGS, grouped

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


#: the pointing game per clip time step, per class and over all classes (``stats/pointing_steps.parquet``)
STEP_GROUPINGS = {"per_step": ([*GROUP, "step"], False), "step_totals": ([*GROUP, "step"], True)}


def pointing_all(steps: dd.DataFrame) -> dict[str, pd.DataFrame]:
    """Pointing game and chance for every grouping of :data:`GROUPINGS` and :data:`STEP_GROUPINGS`, in one Dask
    computation: ``pointing_game`` (this project's: hits over all boxed frames, ``stats.pointing_tolerance``) and
    ``pointing_game_li2021`` (Li et al.: 7/112 of the view's tolerance; over several classes, the mean of the
    per-class accuracies)."""
    lazy = {
        name: grouped(steps, keys, everyone).agg({"hit": ["count", "mean"], "hit_li2021": "mean", "chance": "mean"})
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
