"""Agreement between methods (``stats.compare_runs``): for each clip and target in this run and another run over the
same index, the Spearman correlation of the two tubes, at the layer's resolution, or at the input's when the layers
differ. Read part file by part file: memory does not grow with the dataset.
"""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from pipeline.errors import MissingInput
from pipeline.explain.faithfulness import spearman
from pipeline.explain.upsample import upsample
from pipeline.store import ALL_LABEL, ALL_NAME, UNLABELLED, UNLABELLED_NAME, decode_column, tube_files
from pipeline.store.run_dir import RunDir


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
