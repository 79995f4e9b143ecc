"""No work done twice: two extract drivers on one run directory compute every shard once; a killed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.config import make_cfg
from pipeline.__main__ import run
from pipeline.runtime.lock import LOCK_NAME, RunDirectoryBusy, run_lock
from pipeline.store import read_index, read_tubes

REPO = Path(__file__).resolve().parents[1]


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow  # two extract processes (about 25 s on 2 cores)
def test_two_drivers_on_one_run_dir_compute_every_shard_once(pipeline_overrides, tmp_path):
    overrides = [*pipeline_overrides, "cluster.processes=false", "index.clips_per_shard=2", "run_name=twice"]
    run(make_cfg(tmp_path, [*overrides, "stage=index"]))
    run_dir = tmp_path / "outputs" / "twice"
    index, _ = read_index(run_dir)
    consoles = [tmp_path / f"driver-{i}.log" for i in range(2)]
    # the test holds the lock until both drivers are waiting for it, so they surely overlap
    with run_lock(run_dir):
        procs = []
        for console in consoles:
            with open(console, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pipeline", "stage=extract", f"paths.root={tmp_path}", *overrides],
                        cwd=REPO,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        _wait_for(lambda: all("waiting for it to finish" in c.read_text() for c in consoles), "both drivers to wait")
        assert not (run_dir / "tubes").exists()  # nothing computed while the lock is held
    for proc in procs:
        assert proc.wait(timeout=300) == 0, [c.read_text()[-2000:] for c in consoles]
    texts = [c.read_text() for c in consoles]
    shards = index["shard"].nunique()
    # one driver computed every shard; the other found them all finished
    assert sorted(f"{shards} skipped as finished" in t for t in texts) == [False, True], texts
    logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("shard-*.log")}
    assert len(logs) == shards and all(text.count(" done: ") == 1 for text in logs.values())
    tubes = read_tubes(run_dir, columns=["clip_id"])
    assert tubes["clip_id"].is_unique and set(tubes["clip_id"]) == set(index["clip_id"])


def test_refuse_names_the_run_dir_before_any_work(pipeline_overrides, tmp_path):
    overrides = [*pipeline_overrides, "cluster.processes=false", "run_name=busy"]
    run(make_cfg(tmp_path, [*overrides, "stage=index"]))
    run_dir = tmp_path / "outputs" / "busy"
    busy = r"busy is being extracted by pid \d+ on .*extract.concurrent=wait"
    with run_lock(run_dir), pytest.raises(RunDirectoryBusy, match=busy):
        run(make_cfg(tmp_path, [*overrides, "stage=extract", "extract.concurrent=refuse"]))
    assert not (run_dir / "tubes").exists()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.runtime.lock import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryBusy, match=f"pid {holder.pid} "), run_lock(tmp_path, "refuse"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock with the process
    with run_lock(tmp_path, "refuse") as path:
        assert path.read_text().startswith(f"pid {os.getpid()} ")


def test_unknown_policy_is_a_setting_error(pipeline_overrides, tmp_path):
    with pytest.raises(
        ValueError, match="extract.concurrent=maybe: not allowed; extract.concurrent takes wait \\| refuse"
    ):
        run(make_cfg(tmp_path, [*pipeline_overrides, "stage=extract", "extract.concurrent=maybe"]))
