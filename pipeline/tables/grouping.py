"""The groupings every per-class table of ``stage=stats`` is computed over: per class, over all classes, and both
per split (``stats/per_class.parquet``, ``overall``, ``per_split``)."""

from __future__ import annotations

import dask.dataframe as dd

from pipeline.store import ALL_LABEL, ALL_NAME

GROUP = ["method", "label", "label_name"]

#: the four groupings of every table: per class, over all classes, and both per split
GROUPINGS = {
    "per_class": (GROUP, False),
    "overall": (GROUP, True),
    "per_split": (["split", *GROUP], False),
    "split_totals": (["split", *GROUP], True),
}


def grouped(frame: dd.DataFrame, keys: list[str], everyone: bool):
    """``frame`` grouped by ``keys``; with ``everyone``, all classes as one (label :data:`ALL_LABEL`)."""
    return (frame.assign(label=ALL_LABEL, label_name=ALL_NAME) if everyone else frame).groupby(keys, dropna=False)
