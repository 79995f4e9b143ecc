"""Kinetics-400 / 600 / 700: the annotation CSV as released, and the clips as the common downloaders name them.

CSV (``dataset.csv``, e.g. ``kinetics400/validate.csv``): columns ``label, youtube_id, time_start, time_end,
split``; other columns (``is_cc``) are ignored, and a test CSV without ``label`` gives unlabelled rows.
A row's video is the file ``<youtube_id>_<time_start:06d>_<time_end:06d>.<mp4|mkv|webm>`` (the clip already
cut to ``[time_start, time_end)``), found in ``root`` itself or in a folder per label, named as the label is
written (``air drumming/``) or with ``_`` for spaces (``air_drumming/``).

Classes: the lines of ``dataset.classes`` when given, else the CSV's labels sorted, so that Kinetics-400's 400
names (``abseiling``, ``air drumming``, ...) match a Kinetics-400 model's (``model.classes=kinetics400``).
A row without a video file is a failure row named by its youtube id; an empty or undecodable file becomes one
when the index probes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.datasets.base import (
    DatasetError,
    DatasetReader,
    RecordError,
    RowError,
    VideoRecord,
    malformed,
    read_class_file,
    read_csv_rows,
    records_of_rows,
)

#: the containers the downloaders write, in the order a name is looked for
SUFFIXES = (".mp4", ".mkv", ".webm")
REQUIRED = ["youtube_id", "time_start", "time_end"]


def clip_name(youtube_id: str, time_start: int, time_end: int) -> str:
    """The downloaders' file name of a clip, without its extension: ``abc_000010_000020``."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


class Kinetics(DatasetReader):
    """Reads a Kinetics annotation CSV (see the module notes).

    Args:
        csv: the annotation CSV as released (``train.csv``, ``validate.csv``, ``test.csv``).
        root: folder of the videos (flat, or one folder per label).
        split: keep rows whose ``split`` column equals this (``train``, ``val``, ``test``); ``all`` keeps every
            row (a released CSV holds one split).
        classes: a text file of class names, one per line; ``None``: the CSV's labels, sorted.
    """

    entries = "CSV rows"

    def __init__(self, csv: str, root: str, split: str = "all", classes: str | None = None):
        self.csv, self.root, self.split = Path(csv), Path(root), str(split)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: video folder not found (dataset.root)")
        self.rows = list(read_csv_rows(self.csv, REQUIRED))
        labels = {(row.get("label") or "").strip() for _, row in self.rows} - {""}
        self.classes = read_class_file(Path(classes)) if classes else sorted(labels)
        self._lookup = {name: i for i, name in enumerate(self.classes)}
        self._files = _video_files(self.root)

    def records(self) -> tuple[list[VideoRecord], list[RecordError]]:
        return records_of_rows(self.rows, self.split, self._record)

    def _record(self, where: str, row: dict, split: str) -> VideoRecord:
        youtube_id = (row["youtube_id"] or "").strip()
        if not youtube_id:
            raise malformed(where, "empty youtube_id")
        if None in row:
            raise RowError(
                where, "MalformedRow", f"{youtube_id}: {len(row[None])} more field(s) than the header", youtube_id
            )
        start, end = (_seconds(where, youtube_id, row, c) for c in ("time_start", "time_end"))
        if end <= start:
            raise RowError(
                where, "FrameRangeError", f"{youtube_id}: time_end {end} is not after time_start {start}", youtube_id
            )
        label_name = (row.get("label") or "").strip() or None
        if label_name is not None and label_name not in self._lookup:
            raise RowError(
                where,
                "UnknownClass",
                f"{youtube_id}: label {label_name!r} is not a class of the dataset ({len(self.classes)} classes)",
                youtube_id,
            )
        name = clip_name(youtube_id, start, end)
        source = self._find(name, label_name)
        if source is None:
            folders = " or ".join(f"{f}/" for f in _label_folders(label_name))
            raise RowError(
                where,
                "MissingVideo",
                f"{youtube_id}: no video {name}.{{mp4,mkv,webm}} in {self.root}"
                + (f" nor in its sub-folder {folders}" if folders else ""),
                youtube_id,
            )
        return VideoRecord(
            video_id=youtube_id,
            source=str(source),
            label=self._lookup.get(label_name) if label_name else None,
            label_name=label_name,
            split=split,
        )

    def _find(self, name: str, label_name: str | None) -> Path | None:
        for folder in ("", *_label_folders(label_name)):
            for suffix in SUFFIXES:
                found = self._files.get((folder, name + suffix))
                if found is not None:
                    return found
        return None


def _label_folders(label_name: str | None) -> list[str]:
    """The folder names a label's videos may be in: as written, and with ``_`` for spaces."""
    if not label_name:
        return []
    return list(dict.fromkeys([label_name, label_name.replace(" ", "_")]))


def _video_files(root: Path) -> dict[tuple[str, str], Path]:
    """``(folder, file name) -> path`` of every file in ``root`` (folder ``""``) and its sub-folders (one listing
    of the tree, so that a CSV of 250,000 rows costs no file-system query per row)."""
    files: dict[tuple[str, str], Path] = {}
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_file():
                files[("", entry.name)] = Path(entry.path)
            elif entry.is_dir():
                with os.scandir(entry.path) as inner:
                    files.update({(entry.name, e.name): Path(e.path) for e in inner if e.is_file()})
    return files


def _seconds(where: str, youtube_id: str, row: dict, column: str) -> int:
    """A whole number of seconds (the release writes ``14``; a float ``14.0`` is accepted)."""
    text = (row.get(column) or "").strip()
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < 0:
        raise RowError(
            where, "MalformedRow", f"{youtube_id}: {column} must be a whole number of seconds, got {text!r}", youtube_id
        )
    return int(value)
