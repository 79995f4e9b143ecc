"""HMDB-51: videos ``<class>/<name>.avi`` and the official split files ``<class>_test_split<N>.txt``.

Each of the 3 splits has one file per class (``testTrainMulti_7030_splits/brush_hair_test_split1.txt``) whose
lines are ``<video file name> <1|2|0>``: 1 = training, 2 = testing, 0 = in neither (left out). The class of a
video is its file's class; classes are the class names of the split files, sorted (``brush_hair``,
``cartwheel``, ...: the usual 0-based order). A malformed line is a failure row; a missing or unreadable video
becomes one when the index probes it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.data.datasets.base import DatasetError, DatasetReader, RecordError, VideoRecord

SPLITS = {"train": "1", "test": "2"}
_SPLIT_FILE = re.compile(r"^(?P<name>.+)_test_split(?P<id>[1-9])\.txt$")


class HMDB51(DatasetReader):
    """Reads one split of HMDB-51 (see the module notes).

    Args:
        root: folder holding the ``<class>/`` video folders.
        split: ``train``, ``test`` or ``all`` (both).
        split_id: which official split (1, 2 or 3).
        splits_dir: folder of the split files; defaults to ``root``.
    """

    entries = "split-file lines"

    def __init__(self, root: str, split: str = "test", split_id: int = 1, splits_dir: str | None = None):
        if split not in (*SPLITS, "all"):
            raise DatasetError(f"dataset.split must be train, test or all, got {split!r}")
        if str(split_id) not in ("1", "2", "3"):
            raise DatasetError(f"dataset.split_id must be 1, 2 or 3, got {split_id!r}")
        self.root, self.split, self.split_id = Path(root), split, int(split_id)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: video folder not found (dataset.root)")
        self.splits_dir = Path(splits_dir) if splits_dir else self.root
        if not self.splits_dir.is_dir():
            raise DatasetError(f"{self.splits_dir}: folder of the split files not found (dataset.splits_dir)")
        self.files = {
            m["name"]: self.splits_dir / name
            for name in sorted(p.name for p in self.splits_dir.iterdir())
            if (m := _SPLIT_FILE.match(name)) and m["id"] == str(self.split_id)
        }
        if not self.files:
            raise DatasetError(
                f"{self.splits_dir}: no <class>_test_split{self.split_id}.txt files (dataset.splits_dir, dataset.split_id)"
            )
        self.classes = sorted(self.files)

    def records(self) -> tuple[list[VideoRecord], list[RecordError]]:
        keep = set(SPLITS.values()) if self.split == "all" else {SPLITS[self.split]}
        names = {number: split for split, number in SPLITS.items()}
        records: list[VideoRecord] = []
        errors: list[RecordError] = []
        for label, class_name in enumerate(self.classes):
            path = self.files[class_name]
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path.name}:{number}"
                parts = line.strip().rsplit(None, 1)  # a name may hold spaces, the number none
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    errors.append(
                        RecordError(where, "MalformedRow", f"{where}: expected '<video> <0|1|2>', got {line.strip()!r}")
                    )
                    continue
                if parts[1] not in keep:
                    continue
                records.append(
                    VideoRecord(
                        video_id=Path(parts[0]).stem,
                        source=str(self.root / class_name / parts[0]),
                        label=label,
                        label_name=class_name,
                        split=names[parts[1]],
                    )
                )
        return records, errors
