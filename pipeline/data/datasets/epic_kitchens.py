"""EPIC-Kitchens-100 and EPIC-Kitchens-55: action segments of long kitchen videos, read from the official CSVs.

Media, under ``root`` (both layouts of the published dataset; the patterns are settings):
    ``videos``  ``PXX/videos/PXX_YY.MP4``
    ``frames``  ``PXX/rgb_frames/PXX_YY/frame_%010d.jpg`` (frames numbered from 1)

Every CSV row is one segment of a video. Its ``start_frame`` and ``stop_frame`` are 1-based frame numbers and
both frames belong to the segment, so the segment is the 0-based range ``[start_frame - 1, stop_frame)``; the
0-based frame index ``i`` is the JPEG ``frame_{i + 1:010d}.jpg`` or the ``i``-th picture of the video.

Labels (``label``):
    ``verb``    ``verb_class`` with the names (``key``) of the verb class CSV.
    ``noun``    ``noun_class`` with the names of the noun class CSV.
    ``action``  a (verb_class, noun_class) pair. The class list is every pair that occurs in the train CSV,
                sorted by verb class then noun class, named ``"<verb key> <noun key>"`` (e.g. ``"take cup"``).
                A segment of another split whose pair never occurs in training keeps that name but has no
                label index (the model cannot score it).
The test-timestamps CSVs carry no labels: their segments have ``label = None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.datasets.base import (
    DatasetError,
    DatasetReader,
    RecordError,
    RowError,
    VideoRecord,
    malformed,
    read_csv_rows,
)

LABELS = ("verb", "noun", "action")
MEDIA = ("videos", "frames")


@dataclass(frozen=True)
class EpicRelease:
    """File and column names of one EPIC-Kitchens release."""

    segment_column: str
    split_files: dict[str, str]
    class_files: dict[str, str]
    class_columns: tuple[str, str]  # (id, name) columns of the class CSVs; {kind} is verb or noun
    video_info_file: str
    video_info_columns: tuple[str, str]  # (video id, fps)


EPIC_100 = EpicRelease(
    segment_column="narration_id",
    split_files=dict(
        train="EPIC_100_train.csv", validation="EPIC_100_validation.csv", test="EPIC_100_test_timestamps.csv"
    ),
    class_files=dict(verb="EPIC_100_verb_classes.csv", noun="EPIC_100_noun_classes.csv"),
    class_columns=("id", "key"),
    video_info_file="EPIC_100_video_info.csv",
    video_info_columns=("video_id", "fps"),
)

EPIC_55 = EpicRelease(
    segment_column="uid",
    split_files=dict(
        train="EPIC_train_action_labels.csv",
        test_s1="EPIC_test_s1_timestamps.csv",
        test_s2="EPIC_test_s2_timestamps.csv",
    ),
    class_files=dict(verb="EPIC_verb_classes.csv", noun="EPIC_noun_classes.csv"),
    class_columns=("{kind}_id", "class_key"),
    video_info_file="EPIC_video_info.csv",
    video_info_columns=("video", "fps"),
)

SEGMENT_COLUMNS = ["participant_id", "video_id", "start_frame", "stop_frame"]


class EpicKitchens(DatasetReader):
    """Reads the segments of one EPIC-Kitchens split.

    Args:
        root: folder holding the ``PXX/`` participant folders.
        annotations_dir: folder of the annotation CSVs (a checkout of the annotations repository).
        split: a split of the release (EPIC-100: ``train``, ``validation``, ``test``; EPIC-55: ``train``,
            ``test_s1``, ``test_s2``).
        label: ``verb``, ``noun`` or ``action`` (see the module notes).
        media: ``videos`` or ``frames``.
        videos: path of a video under ``root``, formatted with ``participant_id`` and ``video_id``.
        frames: path of a frame folder under ``root``, formatted the same way.
        fps: frame rate of every video when the video info CSV is absent (it matters for frame folders with a
            ``target_fps`` sampler); ``None``: from the video info CSV, or unknown.
    """

    release: EpicRelease

    def __init__(
        self,
        root: str,
        annotations_dir: str,
        split: str = "validation",
        label: str = "verb",
        media: str = "videos",
        videos: str = "{participant_id}/videos/{video_id}.MP4",
        frames: str = "{participant_id}/rgb_frames/{video_id}",
        fps: float | None = None,
    ):
        if split not in self.release.split_files:
            raise DatasetError(f"dataset.split must be one of {list(self.release.split_files)}, got {split!r}")
        if label not in LABELS:
            raise DatasetError(f"dataset.label must be one of {list(LABELS)}, got {label!r}")
        if media not in MEDIA:
            raise DatasetError(f"dataset.media must be one of {list(MEDIA)}, got {media!r}")
        self.root, self.annotations = Path(root), Path(annotations_dir)
        self.split, self.label, self.media = split, label, media
        self.pattern = videos if media == "videos" else frames
        self.default_fps = float(fps) if fps is not None else None
        self.verbs = self._read_classes("verb")
        self.nouns = self._read_classes("noun")
        self.actions = self._read_actions() if label == "action" else []
        self.classes = {
            "verb": self.verbs,
            "noun": self.nouns,
            "action": [self._action_name(*a) for a in self.actions],
        }[label]
        self.fps = self._read_video_fps()

    # ------------------------------------------------------------------------------------------- class lists
    def _read_classes(self, kind: str) -> list[str]:
        path = self.annotations / self.release.class_files[kind]
        id_column, name_column = (c.format(kind=kind) for c in self.release.class_columns)
        names: dict[int, str] = {}
        for where, row in read_csv_rows(path, [id_column, name_column]):
            try:
                names[int(row[id_column])] = row[name_column].strip()
            except (TypeError, ValueError) as err:
                raise DatasetError(f"{where}: {id_column} must be an integer, got {row[id_column]!r}") from err
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{path}: class ids must run 0..N-1 without gaps")
        return [names[i] for i in range(len(names))]

    def _read_actions(self) -> list[tuple[int, int]]:
        path = self.annotations / self.release.split_files["train"]
        pairs = set()
        for _, row in read_csv_rows(path, ["verb_class", "noun_class"]):
            try:
                pair = int(row["verb_class"]), int(row["noun_class"])
            except (TypeError, ValueError):
                continue  # reported when that split is read
            if pair[0] < len(self.verbs) and pair[1] < len(self.nouns):
                pairs.add(pair)
        return sorted(pairs)

    def _action_name(self, verb: int, noun: int) -> str:
        return f"{self.verbs[verb]} {self.nouns[noun]}"

    def _read_video_fps(self) -> dict[str, float]:
        path = self.annotations / self.release.video_info_file
        if not path.is_file():
            return {}
        id_column, fps_column = self.release.video_info_columns
        rates = {}
        for where, row in read_csv_rows(path, [id_column, fps_column]):
            try:
                rates[row[id_column].strip()] = float(row[fps_column])
            except (TypeError, ValueError) as err:
                raise DatasetError(f"{where}: fps must be a number, got {row[fps_column]!r}") from err
        return rates

    # ------------------------------------------------------------------------------------------- segments
    def records(self) -> tuple[list[VideoRecord], list[RecordError]]:
        path = self.annotations / self.release.split_files[self.split]
        records: list[VideoRecord] = []
        errors: list[RecordError] = []
        for where, row in read_csv_rows(path, [self.release.segment_column, *SEGMENT_COLUMNS]):
            try:
                records.append(self._record(where, row))
            except RowError as err:
                errors.append(err.error)
        return records, errors

    def _record(self, where: str, row: dict) -> VideoRecord:
        if None in row:
            raise malformed(where, f"{len(row[None])} more field(s) than the header")
        segment_id = (row[self.release.segment_column] or "").strip()
        participant, video_id = (row["participant_id"] or "").strip(), (row["video_id"] or "").strip()
        if not segment_id or not participant or not video_id:
            raise malformed(where, f"empty {self.release.segment_column}, participant_id or video_id")
        start, stop = _integer(where, row, "start_frame"), _integer(where, row, "stop_frame")
        if start < 1:
            raise RowError(
                where, "FrameRangeError", f"{segment_id}: start_frame {start} < 1 (frames are numbered from 1)"
            )
        if stop < start:
            raise RowError(where, "FrameRangeError", f"{segment_id}: stop_frame {stop} is before start_frame {start}")
        label, label_name = self._label(where, row, segment_id)
        source = self.root / self.pattern.format(participant_id=participant, video_id=video_id)
        return VideoRecord(
            video_id=video_id,
            source=str(source),
            label=label,
            label_name=label_name,
            split=self.split,
            start_frame=start - 1,
            end_frame=stop,
            segment_id=segment_id,
            fps=self.fps.get(video_id, self.default_fps),
        )

    def _label(self, where: str, row: dict, segment_id: str) -> tuple[int | None, str | None]:
        if "verb_class" not in row:  # a test-timestamps CSV
            return None, None
        verb, noun = _integer(where, row, "verb_class"), _integer(where, row, "noun_class")
        for kind, value, names in (("verb", verb, self.verbs), ("noun", noun, self.nouns)):
            if not 0 <= value < len(names):
                raise RowError(
                    where,
                    "UnknownClass",
                    f"{segment_id}: {kind}_class {value} is not in {self.release.class_files[kind]}",
                )
        if self.label == "verb":
            return verb, self.verbs[verb]
        if self.label == "noun":
            return noun, self.nouns[noun]
        name = self._action_name(verb, noun)
        return (self.actions.index((verb, noun)) if (verb, noun) in self.actions else None), name


def _integer(where: str, row: dict, column: str) -> int:
    value = (row.get(column) or "").strip()
    try:
        return int(value)
    except ValueError:
        raise malformed(where, f"{column} must be an integer, got {value!r}") from None


class Epic100(EpicKitchens):
    """EPIC-Kitchens-100 (``EPIC_100_*.csv``); splits ``train``, ``validation``, ``test``."""

    release = EPIC_100


class Epic55(EpicKitchens):
    """EPIC-Kitchens-55 (``EPIC_train_action_labels.csv``, ``EPIC_test_s{1,2}_timestamps.csv``); splits
    ``train``, ``test_s1``, ``test_s2``. Its class CSVs are ``EPIC_{verb,noun}_classes.csv`` with columns
    ``{verb,noun}_id, class_key, ...``."""

    release = EPIC_55

    def __init__(self, root: str, annotations_dir: str, split: str = "train", **kwargs):
        super().__init__(root, annotations_dir, split=split, **kwargs)
