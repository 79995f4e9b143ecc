"""Stats stage: ``tubes/*.parquet`` -> ``stats/per_class.parquet``, ``stats/overall.parquet`` (and, where the
dataset has ground-truth boxes, ``stats/pointing.parquet`` with one row per clip time step).

Per-clip statistics were computed by the extractor and stored with each tube; this stage only aggregates
them, with dask.dataframe over all part files, so it never loads a volume and its memory does not grow with
the dataset. Aggregates use each clip's first target (``target_rank == 0``).

Pointing game: for each clip time step whose source frame has a box, a hit when the tube's peak in that frame
(mapped to source pixels) lies inside the box grown by ``stats.pointing_tolerance`` pixels. Its chance level
is the share of the model's view (the crop box) the box covers: a peak placed at random hits that often.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stages.index import read_index
from pipeline.store import tube_files, write_table_atomic

log = logging.getLogger(__name__)

SCALAR_STATS = ["target_prob", "pred_prob", "mass", "top10_mass", "entropy", "centroid_t", "centroid_y", "centroid_x", "peak_t"]
COLUMNS = ["clip_id", "video_id", "label", "label_name", "method", "target_rank", "pred", "frame_indices", "crop_box", "temporal_profile", "frame_peak_x", "frame_peak_y", *SCALAR_STATS]
GROUP = ["method", "label", "label_name"]


def _prepare(part: pd.DataFrame, steps: int) -> pd.DataFrame:
    """Per-partition: first targets only, a correctness flag and the temporal profile as ``steps`` columns."""
    part = part[part["target_rank"] == 0]
    out = part[GROUP + SCALAR_STATS].copy()
    out["label"] = out["label"].fillna(-1).astype("int64")
    out["label_name"] = out["label_name"].fillna("(unlabelled)").astype(object)
    out["correct"] = (part["pred"] == part["label"]).astype("float64").where(part["label"].notna())
    profiles = np.stack(part["temporal_profile"].to_numpy()) if len(part) else np.zeros((0, steps))
    for t in range(steps):
        out[f"profile_{t:03d}"] = profiles[:, t]
    return out


def pointing_rows(part: pd.DataFrame, boxes: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """One row per clip time step that has a ground-truth box: hit (0/1) and the chance of a random hit."""
    part = part[part["target_rank"] == 0]
    crop = np.stack(part["crop_box"].to_numpy()) if len(part) else np.zeros((0, 4))
    steps = part[["method", "label", "label_name", "clip_id", "video_id", "frame_indices", "frame_peak_x", "frame_peak_y"]].assign(
        label=part["label"].fillna(-1).astype("int64"), label_name=part["label_name"].fillna("(unlabelled)").astype(object),
        cx0=crop[:, 0], cy0=crop[:, 1], cx1=crop[:, 2], cy1=crop[:, 3],
    )
    steps = steps.explode(["frame_indices", "frame_peak_x", "frame_peak_y"], ignore_index=True)
    steps = steps.rename(columns={"frame_indices": "frame", "frame_peak_x": "px", "frame_peak_y": "py"})
    steps = steps.astype({"frame": "int64", "px": "float64", "py": "float64", "video_id": object})
    merged = steps.merge(boxes, on=["video_id", "frame"], how="inner")
    x0, y0 = merged["x0"] - tolerance, merged["y0"] - tolerance
    x1, y1 = merged["x1"] + tolerance, merged["y1"] + tolerance
    hit = (merged["px"] >= x0) & (merged["px"] < x1) & (merged["py"] >= y0) & (merged["py"] < y1)
    inter_w = (np.minimum(x1, merged["cx1"]) - np.maximum(x0, merged["cx0"])).clip(lower=0)
    inter_h = (np.minimum(y1, merged["cy1"]) - np.maximum(y0, merged["cy0"])).clip(lower=0)
    chance = inter_w * inter_h / ((merged["cx1"] - merged["cx0"]) * (merged["cy1"] - merged["cy0"]))
    return merged[["method", "label", "label_name", "clip_id", "frame"]].assign(hit=hit.astype("float64"), chance=chance.astype("float64"))


def boxes_path(cfg, meta: dict) -> Path | None:
    """The ground-truth boxes CSV of a run: ``stats.boxes``, else the dataset's own; None when there is none."""
    path = cfg.stats.get("boxes") or meta.get("boxes")
    if path and not Path(path).is_file():
        log.warning("boxes: %s does not exist; no pointing game or tube IoU", path)
        return None
    return Path(path) if path else None


def read_boxes(path: str | Path) -> pd.DataFrame:
    """A boxes CSV (``video_id, frame, x0, y0, x1, y1`` in source pixels), checked."""
    boxes = pd.read_csv(path, dtype={"video_id": str})
    missing = {"video_id", "frame", "x0", "y0", "x1", "y1"} - set(boxes.columns)
    if missing:
        raise ValueError(f"{path}: boxes CSV lacks columns {sorted(missing)}")
    return boxes.astype({"video_id": object, "frame": "int64", "x0": "float64", "y0": "float64", "x1": "float64", "y1": "float64"})


def _aggregate(prepared: dd.DataFrame, keys: list[str]) -> pd.DataFrame:
    columns = [c for c in prepared.columns if c not in GROUP]
    grouped = prepared.groupby(keys, dropna=False)
    means = grouped[columns].mean().compute()
    counts = grouped["target_prob"].count().compute().rename("clips")
    table = means.join(counts).reset_index().rename(columns={"correct": "accuracy", "target_prob": "mean_target_prob", "pred_prob": "mean_pred_prob"})
    profile_cols = sorted(c for c in table.columns if c.startswith("profile_"))
    table["temporal_profile"] = list(table[profile_cols].to_numpy(dtype=np.float32)) if profile_cols else [[] for _ in range(len(table))]
    return table.drop(columns=profile_cols)


def _with_pointing(table: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    agg = steps.groupby(GROUP).agg(pointing_frames=("hit", "size"), pointing_game=("hit", "mean"), pointing_chance=("chance", "mean"))
    return table.merge(agg.reset_index(), on=GROUP, how="left")


def run(cfg, run_dir: Path, client=None) -> dict:
    files = tube_files(run_dir)
    if not files:
        raise FileNotFoundError(f"{run_dir / 'tubes'}: no tube files; run the extract stage first")
    tubes = dd.read_parquet([str(f) for f in files], columns=COLUMNS)
    filled = [f for f in files if pq.read_metadata(f).num_rows]  # a shard whose clips all failed has 0 rows
    steps = int(pq.read_table(filled[0], columns=["input_size"]).column(0)[0][0].as_py()) if filled else 0
    prepared = tubes.map_partitions(_prepare, steps, meta=_prepare(tubes._meta, steps))
    per_class = _aggregate(prepared, GROUP)
    overall = _aggregate(prepared.assign(label=-1, label_name="(all)"), GROUP)

    _, meta = read_index(run_dir)
    path = boxes_path(cfg, meta)
    if path:
        boxes = read_boxes(path)
        steps = tubes.map_partitions(pointing_rows, boxes, float(cfg.stats.pointing_tolerance), meta=pointing_rows(tubes._meta, boxes, 0.0)).compute()
        write_table_atomic(pa.Table.from_pandas(steps, preserve_index=False), run_dir / "stats" / "pointing.parquet")
        per_class = _with_pointing(per_class, steps)
        overall = _with_pointing(overall, steps.assign(label=-1, label_name="(all)"))

    out = run_dir / "stats"
    write_table_atomic(pa.Table.from_pandas(per_class.sort_values(GROUP), preserve_index=False), out / "per_class.parquet")
    write_table_atomic(pa.Table.from_pandas(overall, preserve_index=False), out / "overall.parquet")
    log.info("stats: %d classes -> %s", len(per_class), out)
    return json.loads(overall.drop(columns=["temporal_profile"]).to_json(orient="records"))
