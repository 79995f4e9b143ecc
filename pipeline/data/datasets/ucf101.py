"""UCF-101 layout: ``<Class>/v_<Class>_gGG_cCC.<ext>`` with ``classInd.txt`` and train/test lists.

``classInd.txt`` numbers classes from 1 (``1 ApplyEyeMakeup``); labels here are 0-based (``label = number - 1``).
``trainlist0N.txt`` lines are ``Class/file.avi <number>``, ``testlist0N.txt`` lines the path only: the class is
always the folder's, and a train line whose number disagrees with its folder is a failure row.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.datasets.base import DatasetError, DatasetReader, RecordError, VideoRecord


class UCF101(DatasetReader):
    """Reads a UCF-101 style dataset.

    Args:
        root: folder holding the ``<Class>/`` video folders.
        split: ``train``, ``test`` or ``all`` (both lists of the fold).
        fold: which of ``trainlist0N.txt`` / ``testlist0N.txt`` to use.
        splits_dir: folder of ``classInd.txt`` and the lists; defaults to ``root``.
    """

    def __init__(self, root: str, split: str = "test", fold: int = 1, splits_dir: str | None = None):
        if split not in ("train", "test", "all"):
            raise DatasetError(f"dataset.split must be train, test or all, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.fold = int(fold)
        self.splits_dir = Path(splits_dir) if splits_dir else self.root
        self.classes = self._read_classes()

    def _read_classes(self) -> list[str]:
        path = self.splits_dir / "classInd.txt"
        if not path.is_file():
            raise DatasetError(f"{path}: class index file not found (dataset.root / dataset.splits_dir)")
        names: dict[int, str] = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise DatasetError(f"{path}:{number}: expected '<index> <ClassName>', got {line!r}")
            names[int(parts[0])] = parts[1]
        if sorted(names) != list(range(1, len(names) + 1)):
            raise DatasetError(f"{path}: class indices must run 1..N without gaps")
        return [names[i] for i in range(1, len(names) + 1)]

    def records(self) -> tuple[list[VideoRecord], list[RecordError]]:
        splits = ["train", "test"] if self.split == "all" else [self.split]
        records: list[VideoRecord] = []
        errors: list[RecordError] = []
        lookup = {name: index for index, name in enumerate(self.classes)}
        for split in splits:
            path = self.splits_dir / f"{split}list{self.fold:02d}.txt"
            if not path.is_file():
                raise DatasetError(f"{path}: split list not found")
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path.name}:{number}"
                relative = line.split()[0]
                class_name = relative.split("/")[0] if "/" in relative else None
                if class_name not in lookup:
                    errors.append(
                        RecordError(
                            where,
                            "UnknownClass",
                            f"{where}: class {class_name!r} of {relative!r} is not in classInd.txt",
                        )
                    )
                    continue
                number = line.split()[1] if len(line.split()) > 1 else None
                if number is not None and number != str(lookup[class_name] + 1):
                    errors.append(
                        RecordError(
                            where,
                            "MalformedRow",
                            f"{where}: label {number!r} of {relative!r} is not its folder's class {class_name} ({lookup[class_name] + 1})",
                        )
                    )
                    continue
                records.append(
                    VideoRecord(
                        video_id=Path(relative).stem,
                        source=str(self.root / relative),
                        label=lookup[class_name],
                        label_name=class_name,
                        split=split,
                    )
                )
        return records, errors
