"""A killed extract stage resumes: SIGKILL at several points, rerun, every clip exactly once, nothing recomputed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers.config import make_cfg
from pipeline.__main__ import run
from pipeline.store import read_failures, read_index, read_tubes
from pipeline.store.ledger import read_ledger

REPO = Path(__file__).resolve().parents[1]


def _published(run_dir: Path) -> dict[str, tuple]:
    """Published parts with what would change if they were rewritten: inode, mtime and bytes."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted((run_dir / "tubes").glob("part-*.parquet"))
    }


def _logs(run_dir: Path) -> dict[str, str]:
    return (
        {p.name: p.read_text() for p in sorted((run_dir / "logs").glob("shard-*.log"))}
        if (run_dir / "logs").is_dir()
        else {}
    )


def _extract(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "stage=extract", *args],
            cwd=REPO,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def _kill_when(proc: subprocess.Popen, condition, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition()`` and SIGKILL the whole process group the moment it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"extract finished before the kill point ({what}) was reached")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"kill point not reached in {timeout} s: {what}")
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _interrupted_run(root: Path, synthetic_root: Path, checkpoint: Path, *extra: str) -> list[str]:
    """The extract command the kill tests interrupt: 12 shards of 2 clips, one clip per batch, one worker; the
    first override is ``paths.root`` (the tests build the index in-process from the rest)."""
    return [
        f"paths.root={root}",
        f"dataset.root={synthetic_root}",
        "dataset.generate_if_missing=false",
        f"model.checkpoint={checkpoint}",
        "sampler=uniform",
        "sampler.num_clips=3",
        "index.clips_per_shard=2",
        "extract.batch_size=1",
        "cluster.n_workers=1",
        *extra,
    ]


def _resume(overrides: list[str], run_dir: Path, finished: dict[str, tuple]) -> dict[str, tuple]:
    """Rerun the extract command to its end: it succeeds, leaves the ``finished`` parts as they were (not
    recomputed), publishes all 12 and leaves no temporary file. Returns the published parts."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "stage=extract", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    final = _published(run_dir)
    assert {k: final[k] for k in finished} == finished  # finished shards were not recomputed
    assert len(final) == 12 and not list((run_dir / "tubes").glob(".*tmp*"))
    return final


@pytest.mark.slow  # four runs of the extract command (about 45 s)
def test_sigkill_at_any_point_then_resume(synthetic_root, random_checkpoint, tmp_path):
    overrides = _interrupted_run(
        tmp_path, synthetic_root, random_checkpoint, "cluster.processes=false", "run_name=killed"
    )
    run(make_cfg(tmp_path, [*overrides[1:], "stage=index"]))
    run_dir = tmp_path / "outputs" / "killed"
    index, _ = read_index(run_dir)
    assert len(index) == 24 and index["shard"].nunique() == 12
    console = tmp_path / "extract.log"

    def partial_part():  # a shard is half written: its temporary part file is open
        return any((run_dir / "tubes").glob(".part-*.tmp-*")) if (run_dir / "tubes").is_dir() else False

    def new_part(seen):  # a shard was just published: between two shards
        return lambda: len(list((run_dir / "tubes").glob("part-*.parquet"))) > len(seen)

    def model_running(seen):  # an unfinished shard has logged its first batch: mid-shard
        def check():
            return any(
                re.search(r"batch 0:", text) and f"part-{name[6:11]}.parquet" not in seen
                for name, text in _logs(run_dir).items()
            )

        return check

    finished: dict[str, tuple] = {}
    for point in ("during a write", "between shards", "mid-shard"):
        proc = _extract(overrides, console)
        condition = {
            "during a write": partial_part,
            "between shards": new_part(finished),
            "mid-shard": model_running(finished),
        }[point]
        _kill_when(proc, condition, point)
        now = _published(run_dir)
        print(
            f"killed {point}: {len(now)} parts published, partial: {[p.name for p in (run_dir / 'tubes').glob('.part-*')]}"
        )
        assert {k: now[k] for k in finished} == finished, f"a finished shard was rewritten by the run killed {point}"
        finished = now

    assert len(finished) < 12, "the kills left no work for the final run"
    final = _resume(overrides, run_dir, finished)

    tubes = read_tubes(run_dir, columns=["clip_id", "shard"])
    assert tubes["clip_id"].is_unique and set(tubes["clip_id"]) == set(index["clip_id"])
    assert read_failures(run_dir).empty
    assert sum(pq.ParquetFile(run_dir / "tubes" / name).metadata.num_rows for name in final) == 24
    # each shard's log: at most one completed computation, however often the run was killed
    for name, text in _logs(run_dir).items():
        assert text.count(" done: ") <= 1, name
    done = read_ledger(run_dir, "extract", "done")
    assert sorted(done) == list(range(12)) and all(entry.rows == 2 for entry in done.values())


@pytest.mark.slow  # two runs of the extract command (about 40 s)
def test_ctrl_c_mid_extract_is_one_line_then_resume(synthetic_root, random_checkpoint, tmp_path):
    """SIGINT to the command's whole process group, as Ctrl-C in a terminal sends it, while shards are running on
    worker processes: one line saying how far it got, exit 130, no traceback from the driver or the workers, no
    half-written part published; the same command then finishes the rest, every clip once."""
    overrides = _interrupted_run(
        tmp_path,
        synthetic_root,
        random_checkpoint,
        "extract.in_process=false",  # shards on worker processes, as the test says (24 clips would run in the driver)
        "run_name=interrupted",
    )
    run(make_cfg(tmp_path, [*overrides[1:], "cluster.processes=false", "stage=index"]))
    run_dir = tmp_path / "outputs" / "interrupted"
    console = tmp_path / "extract.log"
    proc = _extract(overrides, console)
    deadline = time.monotonic() + 120
    while len(list((run_dir / "tubes").glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, "extract finished before the interrupt"
        assert time.monotonic() < deadline, "no shard finished in 120 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    text = console.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    published = _published(run_dir)
    last = text.strip().splitlines()[-1]
    assert last.endswith(f"interrupted: {len(published)} of 12 shards done; rerun the same command to resume"), last
    for name in published:  # every published part is whole
        pq.read_table(run_dir / "tubes" / name)
    assert 2 <= len(published) < 12

    _resume(overrides, run_dir, published)
    tubes = read_tubes(run_dir, columns=["clip_id"])
    index, _ = read_index(run_dir)
    assert len(tubes) == 24 and tubes["clip_id"].is_unique and set(tubes["clip_id"]) == set(index["clip_id"])
