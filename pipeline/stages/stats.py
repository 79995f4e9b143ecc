"""Stats stage: ``tubes/*.parquet`` -> ``stats/per_class.parquet``, ``stats/overall.parquet``,
``stats/per_split.parquet`` (the same per split), where the dataset has ground-truth boxes
``stats/pointing.parquet`` (a folder of Parquet parts, one row per clip time step, with its ``step``) and
``stats/pointing_steps.parquet`` (the pointing game per class and time step), and with
``stats.compare_runs`` ``stats/agreement.parquet`` (per clip) and ``stats/agreement_per_class.parquet``.

Per-clip statistics come with each tube; this stage only aggregates them with dask.dataframe over all part
files, never loading a volume (memory does not grow with the dataset). Aggregates use each clip's first target
(``target_rank == 0``). List statistics (the temporal profile, the coarse spatial density map) are averaged
element-wise; the distributions of concentration, entropy and border mass are kept as histograms
(``top10_mass_hist`` ...: share of clips in each tenth of [0, 1]). The pointing game
(:mod:`pipeline.tables.pointing`) and the agreement between runs (:mod:`pipeline.tables.agreement`) are computed
beside them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, StageFailed
from pipeline.stages.result import StageResult
from pipeline.store import (
    REPAIR,
    UNLABELLED,
    UNLABELLED_NAME,
    boxes_path,
    read_boxes,
    read_failures,
    read_index,
    readable,
    require_tubes,
    write_table_atomic,
)
from pipeline.store.provenance import check_tubes_made_by
from pipeline.store.run_dir import RunDir
from pipeline.store.schema import CLIP_STATISTICS
from pipeline.tables.agreement import agreement
from pipeline.tables.grouping import GROUP, GROUPINGS, grouped
from pipeline.tables.pointing import pointing_all, write_pointing

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


def aggregate_all(prepared: dd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every grouping of :data:`GROUPINGS` in one Dask computation, so the part files are read once."""
    columns = [c for c in prepared.columns if c not in GROUP + ["split"]]
    lazy = {}
    for name, (keys, everyone) in GROUPINGS.items():
        groups = grouped(prepared, keys, everyone)
        lazy[name] = (groups[columns].mean(), groups["target_prob"].count())
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
    else:  # the tables of an earlier run with boxes must not outlive them
        run.table("pointing_steps").unlink(missing_ok=True)
        shutil.rmtree(run.table("pointing"), ignore_errors=True)
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
