"""Writing the run's files: atomic Parquet writes, part file names, failure rows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.schema import COMPRESSION, FAILURE_SCHEMA


def write_table_atomic(table: pa.Table, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``table`` to ``path`` so that the file appears complete or not at all (temp + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}}
        )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression=COMPRESSION)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` so that the file appears complete or not at all (temp + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def failures_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)


def failure_row(clip_id: str, source: str | None, stage: str, error_type: str, message: str) -> dict:
    """One row of ``failures/*.parquet``: what failed (a clip, or the source when no clip exists), where and why."""
    return dict(clip_id=clip_id, source=source, stage=stage, error_type=error_type, message=message)


def part_name(shard: int, rank: int | None = None) -> str:
    """``part-NNNNN.parquet``, or ``part-NNNNN-rankR.parquet`` for one rank's share of a shard (Lightning DDP)."""
    return f"part-{shard:05d}.parquet" if rank is None else f"part-{shard:05d}-rank{rank}.parquet"


def shard_parts(folder: Path, shard: int) -> list[Path]:
    """The part files of one shard in ``folder`` (one, or one per DDP rank)."""
    return sorted(Path(folder).glob(f"part-{shard:05d}.parquet")) + sorted(
        Path(folder).glob(f"part-{shard:05d}-rank*.parquet")
    )
