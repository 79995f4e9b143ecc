"""Which clips a report shows: per method and class, the most and least confident, the most confident mistakes and
those right for the wrong reasons, picked from a projection of a few small columns (and, with boxes, each clip's
share of missed steps from ``stats/pointing.parquet``, one part at a time). Nothing here reads a volume or a
frame: the picking costs the same whatever the clips' size, and memory holds one row per clip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.store import UNLABELLED_NAME, tube_files

SUMMARY_COLUMNS = ["clip_id", "method", "label", "label_name", "model_label", "pred", "pred_prob", "border_mass"]
ROLES = {
    "confident": "Most confident clips",
    "unsure": "Least confident clips",
    "misclassified": "Misclassified clips",
    "wrong_reasons": "Right for the wrong reasons",
}
#: a correct clip is right for the wrong reasons when its tube's peak is off the box in more than this share of its
#: boxed steps, or, without a box, when more than this share of its mass lies in the frame's border band
MISS_LIMIT, BORDER_LIMIT = 0.5, 0.5


def read_summary(run_dir: Path) -> pd.DataFrame:
    """The first-target rows of a run, a few small columns only (bounded even for 100,000s of clips)."""
    table = pq.ParquetDataset(tube_files(run_dir), filters=[("target_rank", "=", 0)]).read(columns=SUMMARY_COLUMNS)
    frame = table.to_pandas()
    frame["label_name"] = frame["label_name"].fillna(UNLABELLED_NAME)
    return frame


def read_clip_pointing(folder: Path) -> pd.DataFrame:
    """Per method and clip, the share of its boxed time steps whose peak missed the box (``pointing_miss``), from
    the stats stage's per-step table (``stats/pointing.parquet``), read one part at a time: memory holds one part's
    steps and one row per clip."""
    columns = ["method", "clip_id", "hit"]
    parts = [
        fragment.to_table(columns=columns).group_by(["method", "clip_id"]).aggregate([("hit", "sum"), ("hit", "count")])
        for fragment in ds.dataset(folder, format="parquet").get_fragments()
    ]
    if not parts:
        return pd.DataFrame({"method": [], "clip_id": [], "pointing_miss": []}).astype({"pointing_miss": "float64"})
    sums = pd.concat([p.to_pandas() for p in parts]).groupby(["method", "clip_id"], sort=False).sum()
    return (1 - sums["hit_sum"] / sums["hit_count"]).rename("pointing_miss").reset_index()


def wrong_reasons(summary: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """Per method and class, up to ``per_class`` clips predicted right whose tube misses the actor.

    With a ground-truth box (``pointing_miss`` not null: the share of the clip's boxed steps whose peak is off the
    box), a clip qualifies when that share is above ``MISS_LIMIT``; without one, when its ``border_mass`` (share
    of the mass in the frame's outer band; a uniform tube has 43.75%) is above ``BORDER_LIMIT``. Clips with a box
    rank first, by ``pointing_miss`` then ``border_mass``, both descending; clips without one follow, by
    ``border_mass``. Clips without a label the model knows are never correct, so never picked."""
    if "pointing_miss" not in summary:
        summary = summary.assign(pointing_miss=np.nan)
    correct = summary["model_label"].notna() & (summary["pred"] == summary["model_label"])
    boxed = summary["pointing_miss"].notna()
    off = np.where(boxed, summary["pointing_miss"] > MISS_LIMIT, summary["border_mass"] > BORDER_LIMIT)
    picked = summary[correct & off].assign(boxed=boxed)
    picked = picked.sort_values(
        ["boxed", "pointing_miss", "border_mass", "clip_id"], ascending=[False, False, False, True], na_position="last"
    )
    return picked.groupby(["method", "label_name"], sort=True).head(per_class).drop(columns="boxed")


def pick_gallery(summary: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """Per method and class, the ``per_class`` most and least confident clips, the ``per_class`` most confident
    mistakes and the first ``per_class`` clips right for the wrong reasons (:func:`wrong_reasons`); ``role`` says
    which (a clip may hold several roles)."""
    ranked = summary.sort_values(["pred_prob", "clip_id"], ascending=[False, True])
    groups = ranked.groupby(["method", "label_name"], sort=True)
    confident = groups.head(per_class).assign(role="confident")
    unsure = groups.tail(per_class)
    unsure = unsure[~unsure["clip_id"].isin(confident["clip_id"])].iloc[::-1].assign(role="unsure")
    wrong = ranked[ranked["model_label"].notna() & (ranked["pred"] != ranked["model_label"])]
    wrong = wrong.groupby(["method", "label_name"], sort=True).head(per_class).assign(role="misclassified")
    reasons = wrong_reasons(summary, per_class).assign(role="wrong_reasons")
    return pd.concat([confident, unsure, wrong, reasons], ignore_index=True)
