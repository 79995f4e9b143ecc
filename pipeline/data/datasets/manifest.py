"""A CSV manifest for any other dataset (Kinetics, Something-Something exports, one's own videos).

Columns (only ``path`` is required; an empty cell means the column is not given for that row):
    ``path``                     a video file or frame folder, absolute or relative to ``root`` (default: the
                                 CSV's folder).
    ``label``                    a class name, or a 0-based class index into ``classes`` when a class file is
                                 given and no class has that name.
    ``start_frame``, ``end_frame``  a segment, 0-based, ``end_frame`` excluded (either may be left empty:
                                 the video's start or end).
    ``start_sec``, ``end_sec``     a segment in seconds instead: the frames whose timestamps ``i / fps`` lie in
                                 ``[start_sec, end_sec)``; a row gives frames or seconds, not both.
    ``video_id``                 default: the file name without extension.
    ``split``                    rows are kept when it equals ``dataset.split`` (``all`` keeps every row).

Classes: the lines of the ``classes`` file (one name per line) when given, else the distinct labels of the
whole CSV sorted (numerically when every label is an integer), so a class index is the same for every split.
A row with a segment gets the segment id ``<video_id>/<start>-<end>`` as written (e.g. ``abc/2.5s-4s`` or
``abc/100-164``), which prefixes its clip ids.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.data.datasets.base import (
    DatasetReader,
    RecordError,
    RowError,
    VideoRecord,
    malformed,
    read_class_file,
    read_csv_rows,
    records_of_rows,
)

#: the columns a manifest may have (see the module notes)
COLUMNS = ["path", "label", "start_frame", "end_frame", "start_sec", "end_sec", "video_id", "split"]


class Manifest(DatasetReader):
    """Reads a manifest CSV (see the module notes).

    Args:
        csv: the manifest file.
        root: folder relative paths start from; default the CSV's folder.
        split: keep rows whose ``split`` column equals this; ``all`` keeps every row.
        classes: a text file of class names, one per line (index = line order).
        fps: frame rate of frame folders (which cannot tell it); needed with ``start_sec``/``end_sec`` or a
            ``target_fps`` sampler on frame folders.
    """

    entries = "CSV rows"

    def __init__(
        self,
        csv: str,
        root: str | None = None,
        split: str = "all",
        classes: str | None = None,
        fps: float | None = None,
    ):
        self.csv = Path(csv)
        self.root = Path(root) if root else self.csv.parent
        self.split = split
        self.fps = float(fps) if fps is not None else None
        self.rows = list(read_csv_rows(self.csv, ["path"], known=COLUMNS))
        self.classes = read_class_file(Path(classes)) if classes else self._labels_in_csv()
        self._lookup = {name: i for i, name in enumerate(self.classes)}

    def _labels_in_csv(self) -> list[str]:
        labels = {(row.get("label") or "").strip() for _, row in self.rows} - {""}
        if all(_is_int(label) for label in labels):
            return sorted(labels, key=int)
        return sorted(labels)

    def records(self) -> tuple[list[VideoRecord], list[RecordError]]:
        return records_of_rows(self.rows, self.split, self._record)

    def _record(self, where: str, row: dict, split: str) -> VideoRecord:
        if None in row:
            raise malformed(where, f"{len(row[None])} more field(s) than the header")
        relative = (row["path"] or "").strip()
        if not relative:
            raise malformed(where, "empty path")
        source = self.root / relative
        video_id = (row.get("video_id") or "").strip() or Path(relative).stem
        label, label_name = self._label(where, (row.get("label") or "").strip())
        frames = [_number(where, row, c, int) for c in ("start_frame", "end_frame")]
        seconds = [_number(where, row, c, float) for c in ("start_sec", "end_sec")]
        if any(v is not None for v in frames) and any(v is not None for v in seconds):
            raise malformed(where, "give start_frame/end_frame or start_sec/end_sec, not both")
        bounds, unit = (seconds, "s") if any(v is not None for v in seconds) else (frames, "")
        start, end = bounds
        if start is not None and start < 0:
            raise RowError(where, "FrameRangeError", f"{source}: negative start {start}{unit}")
        if start is not None and end is not None and end <= start:
            raise RowError(
                where, "FrameRangeError", f"{source}: segment ends ({end}{unit}) at or before its start ({start}{unit})"
            )
        segment_id = None
        if start is not None or end is not None:
            segment_id = f"{video_id}/{_text(start, 0)}{unit}-{_text(end, 'end')}{unit}"
        common = dict(
            video_id=video_id,
            source=str(source),
            label=label,
            label_name=label_name,
            split=split,
            segment_id=segment_id,
            fps=self.fps,
        )
        if unit:
            return VideoRecord(**common, start_sec=start or 0.0, end_sec=end)
        return VideoRecord(**common, start_frame=start or 0, end_frame=end)

    def _label(self, where: str, name: str) -> tuple[int | None, str | None]:
        if not name:
            return None, None
        if name in self._lookup:
            return self._lookup[name], name
        if _is_int(name) and 0 <= int(name) < len(self.classes):
            return int(name), self.classes[int(name)]
        raise RowError(
            where, "UnknownClass", f"label {name!r} is not a class of the dataset ({len(self.classes)} classes)"
        )


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _number(where: str, row: dict, column: str, kind):
    text = (row.get(column) or "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise malformed(
            where, f"{column} must be {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if not math.isfinite(value):
        raise malformed(where, f"{column} must be finite, got {text!r}")
    return value


def _text(value, default) -> str:
    return default if value is None else f"{value:g}" if isinstance(value, float) else str(value)
