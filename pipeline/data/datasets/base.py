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
    """A line of a dataset's files that names no usable video; it becomes a failure row of the index."""

    where: str
    error_type: str
    message: str


class DatasetReader(ABC):
    """Lists a dataset's videos. Subclasses are thin: they parse one layout's files and nothing else."""

    #: class names, index = label
    classes: list[str]

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

    def __init__(self, where: str, error_type: str, message: str):
        super().__init__(f"{where}: {message}")
        self.error = RecordError(where, error_type, f"{where}: {message}")


def malformed(where: str, message: str) -> RowError:
    """The error for a row that cannot be parsed."""
    return RowError(where, "MalformedRow", message)
