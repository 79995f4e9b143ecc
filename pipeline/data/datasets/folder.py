"""One's own videos, with no annotation files: ``<root>/<class>/<video>`` or a flat folder of videos.

- ``<root>/<class>/<video>``: every sub-folder holding videos is a class (classes = the folder names, sorted);
- videos directly in ``root`` have no label (``label = None``): a flat folder is the quickest way to try a
  model on a few clips (``target.mode=pred``).

A file is a video when its name ends like one (``.mp4``, ``.mkv``, ``.webm``, ``.avi``, ``.mov``, ...: see
:data:`~pipeline.data.datasets.base.VIDEO_SUFFIXES`); other files and hidden ones are skipped. The video id is
the file name without its extension, prefixed by its class folder (``jump/clip_01``), so that two classes may
hold files of the same name. An empty or unreadable video becomes a failure row when the index probes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.datasets.base import DatasetError, DatasetReader, RecordError, VideoRecord, is_video_file


def _videos(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if is_video_file(e)), key=lambda e: e.name)


class VideoFolder(DatasetReader):
    """Reads a folder of class folders of videos, or a flat folder of videos (see the module notes).

    Args:
        root: the folder.
        split: the ``split`` written in the index rows (the folder has no splits).
    """

    entries = "video files"

    def __init__(self, root: str, split: str = "all"):
        self.root, self.split = Path(root), str(split)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: folder not found (dataset.root)")
        with os.scandir(self.root) as entries:
            folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        self._by_class = {name: videos for name in folders if (videos := _videos(os.path.join(self.root, name)))}
        self._flat = _videos(str(self.root))
        if not self._by_class and not self._flat:
            raise DatasetError(
                f"{self.root}: no video files in it or in its sub-folders (dataset.root; <root>/<class>/<video> or "
                "<root>/<video>)"
            )
        self.classes = list(self._by_class)

    def records(self) -> tuple[list[VideoRecord], list[RecordError]]:
        records = [
            VideoRecord(
                video_id=f"{name}/{Path(entry.name).stem}",
                source=entry.path,
                label=label,
                label_name=name,
                split=self.split,
            )
            for label, (name, videos) in enumerate(self._by_class.items())
            for entry in videos
        ]
        records += [
            VideoRecord(video_id=Path(e.name).stem, source=e.path, label=None, label_name=None, split=self.split)
            for e in self._flat
        ]
        return records, []
