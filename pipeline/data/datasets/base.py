"""The record every dataset reader produces, and the reader interface the index stage uses."""

from __future__ import annotations

import csv
import difflib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoRecord:
    """One labelled stretch of video: a whole file, or a segment ``[start_frame, end_frame)`` of one.

    ``label`` is the 0-based class index, ``None`` when the dataset gives no label (a test split). Frame
    numbers are 0-based positions in the video (or frame folder); ``end_frame=None`` means the end of the
    video. A segment may instead be given in seconds (``start_sec``, ``end_sec``): the index stage turns it
    into the frames whose timestamps ``i / fps`` lie in ``[start_sec, end_sec)`` once the video's fps is known.
    ``segment_id`` names a segment (e.g. an EPIC-Kitchens narration id) and prefixes its clip ids; ``fps`` is
    the frame rate when the source cannot tell it (a frame folder).
    """

    video_id: str
    source: str
    label: int | None
    label_name: str | None
    split: str
    start_frame: int = 0
    end_frame: int | None = None
    segment_id: str | None = None
    fps: float | None = None
    start_sec: float | None = None
    end_sec: float | None = None


@dataclass(frozen=True)
class RecordError:
    """A line of a dataset's files that names no usable video; it becomes a failure row of the index.

    ``entry_id`` names the entry (a Kinetics youtube id, an SSv2 video id) and becomes the failure row's
    ``clip_id``; without one the row is named by ``where`` (``"<file>:<line>"``).
    """

    where: str
    error_type: str
    message: str
    entry_id: str | None = None


class DatasetReader(ABC):
    """Lists a dataset's videos. Subclasses are thin: they parse one layout's files and nothing else."""

    #: class names, index = label
    classes: list[str]
    #: what one entry of the dataset's files is, for the index's log line ("12 of 14 CSV rows have a video")
    entries: str = "entries"

    @abstractmethod
    def records(self) -> tuple[list[VideoRecord], list[RecordError]]:
        """The videos of the configured split, and the entries that could not be turned into one."""

    @property
    def boxes_path(self) -> Path | None:
        """A CSV of ground-truth boxes (``video_id, frame, x0, y0, x1, y1`` in source pixels), if any."""
        return None


def read_csv_rows(
    path: Path, required: list[str], known: list[str] | None = None
) -> Iterator[tuple[str, dict[str, str]]]:
    """The rows of a CSV file as ``(where, row)``, ``where`` = ``"<file name>:<line>"``.

    Raises :class:`DatasetError` when the file is missing or lacks a ``required`` column. A row with more
    fields than the header is yielded with the extra values under the key ``None`` (callers report it). With
    ``known`` (every column the caller reads), a column of the header it does not know is a warning that names
    the known columns and, for a likely typo, the one meant (``lable``: did you mean ``label``?).
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}")
        if known is not None:
            warn_unknown_columns(path, reader.fieldnames or [], known)
        for row in reader:
            if not any((v or "").strip() for k, v in row.items() if k is not None):
                continue  # a blank line
            yield f"{path.name}:{reader.line_num}", row


def warn_unknown_columns(path: Path, header: list[str], known: list[str]) -> None:
    """Log one warning per column of ``header`` that is not in ``known`` (it is ignored)."""
    for column in header:
        if column in known:
            continue
        close = difflib.get_close_matches(column, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        log.warning("%s: column %r is not read and is ignored (%sknown columns: %s)", path, column, hint, known)


class RowError(Exception):
    """Raised while turning one row into a record; :attr:`error` is the row's failure."""

    def __init__(self, where: str, error_type: str, message: str, entry_id: str | None = None):
        super().__init__(f"{where}: {message}")
        self.error = RecordError(where, error_type, f"{where}: {message}", entry_id)


def malformed(where: str, message: str) -> RowError:
    """The error for a row that cannot be parsed."""
    return RowError(where, "MalformedRow", message)


def records_of_rows(rows, split: str, record) -> tuple[list[VideoRecord], list[RecordError]]:
    """The records of CSV ``rows`` (``(where, row)`` pairs) whose ``split`` column is ``split`` (``all``: every row;
    an empty column counts as ``all``), made by ``record(where, row, split)``; a row it raises
    :class:`RowError` for becomes that row's error."""
    records: list[VideoRecord] = []
    errors: list[RecordError] = []
    for where, row in rows:
        row_split = (row.get("split") or "").strip() or "all"
        if split != "all" and row_split != split:
            continue
        try:
            records.append(record(where, row, row_split))
        except RowError as err:
            errors.append(err.error)
    return records, errors


#: file name endings of the video files a folder-based reader lists (lower case)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts")


def is_video_file(entry) -> bool:
    """A visible regular file (an ``os.DirEntry`` or a ``Path``) whose name ends like a video."""
    return not entry.name.startswith(".") and entry.is_file() and Path(entry.name).suffix.lower() in VIDEO_SUFFIXES


def read_class_file(path: Path, setting: str = "dataset.classes") -> list[str]:
    """Class names, one per line (index = line order); blank lines are skipped.

    Raises:
        DatasetError: the file is missing, or lists a name twice.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: class file not found ({setting})")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DatasetError(f"{path}: class names listed twice: {duplicated}")
    return names
