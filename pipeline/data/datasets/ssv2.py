"""Something-Something v2: the JSON annotations as released, videos ``<id>.webm`` (VP9) in one folder.

Annotations (``dataset.annotations_dir``):
    ``labels.json``                            class name -> class index as a string
                                               (``{"Approaching something with your camera": "0", ...}``)
    ``something-something-v2-train.json``      ``[{"id": "78687", "label": "holding potato next to vicks
    ``something-something-v2-validation.json``   vaporub bottle", "template": "Holding [something] next to
                                               [something]", "placeholders": ["potato", "vicks vaporub bottle"]},
                                               ...]``
    ``something-something-v2-test.json``       ``[{"id": "1420"}, ...]`` (no labels)

The class of an entry is its ``template`` with the brackets removed (``"Holding something next to
something"``), looked up in ``labels.json``; ``label`` is the template filled with the objects and is kept out of
the class. An entry whose template is not in ``labels.json`` is a failure row named by its id; a missing or
truncated video becomes one when the index probes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.datasets.base import DatasetError, DatasetReader, RecordError, VideoRecord

SPLITS = ("train", "validation", "test")
LABELS_FILE = "labels.json"
SPLIT_FILE = "something-something-v2-{split}.json"


def template_class(template: str) -> str:
    """The class name of a template: ``"Putting [something] on [something]"`` -> ``"Putting something on
    something"``."""
    return template.replace("[", "").replace("]", "").strip()


def _read_json(path: Path):
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (dataset.annotations_dir)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err


class SomethingSomethingV2(DatasetReader):
    """Reads one split of Something-Something v2 (see the module notes).

    Args:
        root: folder of the ``<id>.webm`` videos.
        annotations_dir: folder of ``labels.json`` and the split files.
        split: ``train``, ``validation`` or ``test``.
        suffix: the videos' file name ending (``.webm`` as released; ``.mp4`` for a re-encoded copy).
    """

    entries = "JSON entries"

    def __init__(self, root: str, annotations_dir: str, split: str = "validation", suffix: str = ".webm"):
        if split not in SPLITS:
            raise DatasetError(f"dataset.split must be one of {list(SPLITS)}, got {split!r}")
        self.root, self.annotations, self.split, self.suffix = Path(root), Path(annotations_dir), split, str(suffix)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: video folder not found (dataset.root)")
        self.classes = self._read_classes()
        self._lookup = {name: i for i, name in enumerate(self.classes)}

    def _read_classes(self) -> list[str]:
        path = self.annotations / LABELS_FILE
        mapping = _read_json(path)
        if not isinstance(mapping, dict):
            raise DatasetError(f"{path}: expected an object of class name -> index, got {type(mapping).__name__}")
        names: dict[int, str] = {}
        for name, index in mapping.items():
            if not str(index).isdigit() or int(index) in names:
                raise DatasetError(f"{path}: class {name!r} has index {index!r}; indices must be distinct integers")
            names[int(index)] = name
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{path}: class indices must run 0..N-1 without gaps")
        return [names[i] for i in range(len(names))]

    def records(self) -> tuple[list[VideoRecord], list[RecordError]]:
        path = self.annotations / SPLIT_FILE.format(split=self.split)
        entries = _read_json(path)
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: expected a list of entries, got {type(entries).__name__}")
        records: list[VideoRecord] = []
        errors: list[RecordError] = []
        for number, entry in enumerate(entries):
            where = f"{path.name}[{number}]"
            video_id = str(entry.get("id", "")).strip() if isinstance(entry, dict) else ""
            if not video_id:
                errors.append(RecordError(where, "MalformedRow", f"{where}: entry without an id: {entry!r:.80}"))
                continue
            label = label_name = None
            if self.split != "test":
                template = entry.get("template")
                label_name = template_class(template) if isinstance(template, str) else None
                if label_name not in self._lookup:
                    errors.append(
                        RecordError(
                            where,
                            "UnknownClass",
                            f"{where}: video {video_id}: template {template!r} is not a class of {LABELS_FILE}",
                            video_id,
                        )
                    )
                    continue
                label = self._lookup[label_name]
            records.append(
                VideoRecord(
                    video_id=video_id,
                    source=str(self.root / f"{video_id}{self.suffix}"),
                    label=label,
                    label_name=label_name,
                    split=self.split,
                )
            )
        return records, errors
