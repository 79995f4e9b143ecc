"""Probing many videos: in batches on a Dask cluster, with a cache of results keyed by file size and mtime.

A probe reads frame count, fps, size, codec and duration from the container (:func:`pipeline.data.video.probe`);
errors come back as :class:`~pipeline.data.video.VideoError` values, so one bad file never fails the Dask graph.
The cache is a Parquet file (one row per source); an entry is reused while the file's size and modification
time are unchanged (a frame folder's modification time changes when frames are added or removed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.data.video import VideoError, VideoInfo, probe
from pipeline.runtime.tasks import follow
from pipeline.store import write_table_atomic

log = logging.getLogger(__name__)

PROBE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("num_frames", pa.int32()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("codec", pa.string()),
        ("duration", pa.float64()),
        ("error", pa.string()),
    ]
)


def _stamp(source: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a file or folder, ``None`` when it does not exist."""
    try:
        stat = os.stat(source)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _probe(source: str):
    """Probe one video; errors come back as values so that one bad file never fails the Dask graph."""
    try:
        return probe(source)
    except VideoError as err:
        return err
    except Exception as err:
        return VideoError(f"{source}: {type(err).__name__}: {err}")


def _probe_many(sources: list[str]) -> list:
    return [_probe(s) for s in sources]


def read_probe_cache(path: Path | None) -> dict[str, tuple[tuple[int, int], object]]:
    """``source -> ((size, mtime_ns), VideoInfo or VideoError)`` from an earlier index run."""
    if path is None or not path.is_file():
        return {}
    cache = {}
    for row in pq.read_table(path, schema=PROBE_SCHEMA).to_pylist():
        result = (
            VideoError(row["error"])
            if row["error"] is not None
            else VideoInfo(
                num_frames=row["num_frames"],
                fps=row["fps"],
                width=row["width"],
                height=row["height"],
                codec=row["codec"],
                duration=row["duration"],
            )
        )
        cache[row["source"]] = ((row["size"], row["mtime_ns"]), result)
    return cache


def write_probe_cache(path: Path, probes: dict[str, object], stamps: dict[str, tuple[int, int] | None]) -> None:
    rows = []
    for source, result in probes.items():
        if stamps.get(source) is None:
            continue  # a missing file is looked at again next time
        size, mtime = stamps[source]
        if isinstance(result, Exception):
            rows.append(dict(source=source, size=size, mtime_ns=mtime, error=str(result)))
        else:
            rows.append(dict(source=source, size=size, mtime_ns=mtime, error=None, **asdict(result)))
    write_table_atomic(pa.Table.from_pylist(rows, schema=PROBE_SCHEMA), path)


#: ``execution=auto``: at most this many videos left to probe are probed in the driver. One process probed
#: 2,200 synthetic videos a second (files in the page cache) on this project's 2-core machine, where starting the
#: default cluster takes about 5 s; files on a network file system take longer to open, hence the margin.
DRIVER_MAX_VIDEOS = 1000


def probe_all(
    sources: list[str],
    client=None,
    progress: bool = True,
    cache: Path | None = None,
    batch_size: int = 32,
    driver_max: float = 0,
) -> dict[str, object]:
    """Probe every distinct source (in batches of ``batch_size`` per Dask task when ``client`` is given).

    With ``cache`` (a Parquet file), sources whose size and modification time are unchanged since the cache
    was written are not probed again, and the cache is rewritten with this run's results. When at most
    ``driver_max`` sources are left to probe, they are probed in this process: a cluster is not started for them.
    """
    unique = list(dict.fromkeys(sources))
    stamps = {s: _stamp(s) for s in unique}
    known = read_probe_cache(cache)
    results = {s: known[s][1] for s in unique if s in known and known[s][0] == stamps[s]}
    todo = [s for s in unique if s not in results]
    if len(results):
        log.info("probe: %d of %d sources unchanged since %s", len(results), len(unique), cache)
    if client is not None and 0 < len(todo) <= driver_max:
        log.info("probe: %d sources, probed in this process (execution)", len(todo))
        client = None
    batches = {i: todo[i : i + batch_size] for i in range(0, len(todo), batch_size)}
    with tqdm(total=len(todo), desc="probe", unit="video", disable=not progress) as bar:
        jobs = {start: (batch,) for start, batch in batches.items()}
        for start, found, error in follow(client, _probe_many, jobs, name="probe"):
            if error is not None:  # a probe never raises (errors are values): only a lost worker gets here
                found = [VideoError(f"{s}: probing failed: {type(error).__name__}: {error}") for s in batches[start]]
                stamps.update(dict.fromkeys(batches[start]))  # not cached: the next index run probes them again
            results.update(zip(batches[start], found))
            bar.update(len(batches[start]))
    if cache is not None:
        write_probe_cache(cache, results, stamps)
    return {s: results[s] for s in unique}
