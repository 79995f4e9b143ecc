"""The record every dataset reader produces, and the reader interface the index stage uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A dataset layout that cannot be read at all (missing class file, unknown split, ...)."""


@dataclass(frozen=True)
class VideoRecord:
    """One labelled stretch of video: a whole file, or a segment ``[start_frame, end_frame)`` of one.

    ``label`` is the 0-based class index, ``None`` when the dataset gives no label (a test split).
    """

    video_id: str
    source: str
    label: int | None
    label_name: str | None
    split: str
    start_frame: int = 0
    end_frame: int | None = None


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
