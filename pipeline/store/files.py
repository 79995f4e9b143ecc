"""Writing the run's files: atomic Parquet writes, part file names, failure rows."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.schema import COMPRESSION, FAILURE_SCHEMA


def temp_path(path: str | Path) -> Path:
    """The hidden temporary file beside ``path`` that a writer fills before :func:`publish` (``.NAME.tmp-PID``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def publish(tmp: Path, path: str | Path) -> None:
    """Make a finished temporary file the real one: fsync, then an atomic rename (complete or not at all)."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write to the yielded temporary path; on success it becomes ``path`` (:func:`publish`), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table_atomic(table: pa.Table, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``table`` to ``path`` so that the file appears complete or not at all."""
    if metadata:
        merged = {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}}
        table = table.replace_schema_metadata(merged)
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression=COMPRESSION)


def replace_folder(built: str | Path, path: str | Path) -> None:
    """Put the complete folder ``built`` in the place of ``path`` (a folder, a file or nothing): the old one is
    renamed away and removed only once the new one is in place, so a reader sees the old or the new, whole."""
    built, path = Path(built), Path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(built, path)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def file_metadata(path: str | Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW") and k != b"pandas"}


@dataclass(frozen=True)
class Failure:
    """One row of ``failures/*.parquet``: what failed (a clip, or the source when no clip exists), where and why.

    Example:
        >>> Failure("v1:000000", "v1.mp4", "extract", "VideoError", "v1.mp4: no such file").error_type
        'VideoError'
    """

    clip_id: str
    source: str | None
    stage: str
    error_type: str
    message: str


def failures_table(rows: list[Failure]) -> pa.Table:
    """Failure rows as a table of the contract's schema."""
    return pa.Table.from_pylist([vars(row) for row in rows], schema=FAILURE_SCHEMA)


def shard_failure_rows(rows, stage: str, error_type: str, message: str) -> list[Failure]:
    """One failure row per clip of ``rows`` (index rows) for a whole shard that failed."""
    return [Failure(c, s, stage, error_type, message) for c, s in zip(rows["clip_id"], rows["source"])]
