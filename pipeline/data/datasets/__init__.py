"""Dataset readers: each lists the videos (or segments) of one on-disk layout as :class:`VideoRecord` rows."""

from pipeline.data.datasets.base import DatasetError, DatasetReader, VideoRecord

__all__ = ["DatasetError", "DatasetReader", "VideoRecord"]
