"""The cluster commands run for real: a Dask scheduler and workers as processes (``cluster=address``) and the
one-node SLURM of ``make slurm-up`` (``cluster=slurm``, adaptive), each with its fault, through the command
line, whose console must show no warning and no traceback.

Each fault strikes a shard in flight: :class:`helpers.traps.HeldNet` holds the first forward pass inside a worker
until the test has done its damage, so the test knows which worker (and SLURM job) holds which shard. Nothing
may be lost: every clip of the index is in the tubes exactly once, and only the shard in flight ran twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from helpers.config import make_cfg
from helpers.deploy import NOISE, env, finish, pipeline, shard_attempts, wait_for
from pipeline.__main__ import run
from pipeline.store import read_index, read_tubes

pytestmark = pytest.mark.slow


@pytest.fixture
def held_run(pipeline_overrides, tmp_path):
    """Overrides of a run of 4 shards of 2 clips whose first shard on a worker is held; its index is made."""
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "hold").touch()
    overrides = [
        *(o for o in pipeline_overrides if not o.startswith("cluster.")),
        f"paths.root={tmp_path}",
        "index.clips_per_shard=2",
        "model.net._target_=helpers.traps.HeldNet",
        f"+model.net.trap={trap}",
        "run_name=held",
    ]
    run(make_cfg(tmp_path, [*overrides, "stage=index"]))
    return overrides, trap, tmp_path / "outputs" / "held"


def check_every_clip_once(run_dir, console: str) -> dict[int, list[str]]:
    """Every clip of the index once in the tubes, a quiet console; each shard's attempts (the workers)."""
    assert not NOISE.search(console), console
    index, _ = read_index(run_dir)
    tubes = read_tubes(run_dir, columns=["clip_id"])
    assert len(tubes) == len(index) and sorted(tubes["clip_id"]) == sorted(index["clip_id"])
    attempts = shard_attempts(run_dir)
    assert sorted(attempts) == sorted(index["shard"].unique())
    return attempts


def test_address_survives_a_worker_killed_mid_shard(held_run, dask_deployment):
    overrides, trap, run_dir = held_run
    dask_deployment.start_workers(2)
    dask_deployment.wait_for_workers(2)
    started = time.monotonic()
    proc = pipeline(
        [*overrides, "stage=extract", "cluster=address", f"cluster.address={dask_deployment.address}"], run_dir.parent
    )
    pid = int(wait_for(trap / "held").split()[1])
    os.kill(pid, signal.SIGKILL)  # the worker process holding a shard; its nanny starts another
    killed = time.monotonic()
    (trap / "release").touch()
    status, console = finish(proc)
    assert status == 0, console
    attempts = check_every_clip_once(run_dir, console)
    rerun = {shard: workers for shard, workers in attempts.items() if len(workers) > 1}
    assert len(rerun) == 1 and all(len(w) == 2 for w in rerun.values())  # the shard in flight, once more
    print(f"\naddress, worker SIGKILLed: shards rerun {sorted(rerun)}, {killed - started:.1f} s to the kill, "
          f"{time.monotonic() - killed:.1f} s from the kill to the end")  # fmt: skip


def test_address_scheduler_gone_is_one_line_and_the_rerun_resumes(held_run, dask_deployment):
    overrides, trap, run_dir = held_run
    dask_deployment.start_workers(2)
    dask_deployment.wait_for_workers(2)
    command = [*overrides, "stage=extract", "cluster=address", f"cluster.address={dask_deployment.address}"]
    proc = pipeline(command, run_dir.parent)
    wait_for(trap / "held")
    while not list((run_dir / "tubes").glob("part-*.parquet")):  # one shard published, one held
        time.sleep(0.05)
    dask_deployment.stop()
    status, console = finish(proc)
    assert status == 2, console
    lines = [line for line in console.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and f"lost the Dask scheduler at {dask_deployment.address}" in lines[0], console
    assert "Traceback" not in console, console
    published = {p.name for p in (run_dir / "tubes").glob("part-*.parquet")}
    assert published

    (trap / "release").touch()
    dask_deployment.start_scheduler()  # the same address
    dask_deployment.start_workers(1)
    status, console = finish(pipeline(command, run_dir.parent))
    assert status == 0, console
    assert f"{len(published)} already done" in console
    check_every_clip_once(run_dir, console)


def squeue_jobs(folder) -> list[str]:
    """Running SLURM jobs submitted from ``folder`` (the driver's working directory)."""
    out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %Z"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == [str(folder)]]


@pytest.mark.slurm
def test_slurm_two_jobs_one_cancelled_mid_shard(slurm, held_run):
    overrides, trap, run_dir = held_run
    slurm_job = [
        "cluster=slurm",
        "cluster.jobs=2",
        "cluster.cores=1",
        "cluster.memory=2GB",
        "cluster.walltime=00:10:00",
    ]
    started = time.monotonic()
    proc = pipeline([*overrides, "stage=extract", *slurm_job], run_dir.parent)
    job = wait_for(trap / "held").split()[3]
    assert job in squeue_jobs(run_dir.parent)
    subprocess.run(["scancel", job], check=True)
    cancelled = time.monotonic()
    (trap / "release").touch()
    status, console = finish(proc)
    assert status == 0, console
    attempts = check_every_clip_once(run_dir, console)
    rerun = {shard: workers for shard, workers in attempts.items() if len(workers) > 1}
    assert len(rerun) == 1 and all(len(set(w)) == 2 for w in rerun.values())  # on the other job's worker
    print(f"\nslurm, job {job} scancelled: shards rerun {sorted(rerun)}, {cancelled - started:.1f} s to the "
          f"cancel, {time.monotonic() - cancelled:.1f} s from the cancel to the end")  # fmt: skip


def wait_jobs(jobs: list[str], timeout: float = 240) -> None:
    """Until none of the SLURM jobs (or array tasks) is pending or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i"], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(0.5)
    raise TimeoutError(f"SLURM jobs {jobs} still queued after {timeout} s")


@pytest.mark.slurm
def test_slurm_array_task_cancelled_and_resubmitted(slurm, pipeline_overrides, tmp_path, monkeypatch):
    from pipeline.runtime import slurm_array

    overrides = [
        *(o for o in pipeline_overrides if not o.startswith("cluster.")),
        f"paths.root={tmp_path}",
        "index.clips_per_shard=2",
        "run_name=array",
    ]
    run(make_cfg(tmp_path, [*overrides, "stage=index"]))  # the index job is skipped: the folder has one
    run_dir = tmp_path / "outputs" / "array"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    started = time.monotonic()
    jobs = slurm_array.launch(overrides, ["--array=0-2", "-c", "1", "--mem=2G"])
    assert set(jobs) == {"extract", "stats"}
    subprocess.run(["scancel", f"{jobs['extract']}_1"], check=True)  # task 1, pending or running
    wait_jobs([jobs["extract"], jobs["stats"]])
    shares = {int(p.stem.split("-")[1]) % 3 for p in (run_dir / "tubes").glob("part-*.parquet")}
    assert 1 not in shares  # shard 1 (share 1 of 3) was cancelled with its task; the stats job never ran
    resubmitted = subprocess.run(
        ["sbatch", "--parsable", "--array=1", "-c", "1", "--mem=2G", str(run_dir / "slurm" / "extract.sh")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    wait_jobs([resubmitted])
    status, console = finish(pipeline([*overrides, "stage=stats"], tmp_path))
    assert status == 0, console
    check_every_clip_once(run_dir, console)
    for log in (run_dir / "logs").glob("slurm-extract-*.out"):
        assert not NOISE.search(log.read_text()), log.read_text()
    assert f"{resubmitted}_1" in " ".join(p.name for p in (run_dir / "logs").glob("*.out"))
    print(f"\nslurm array: task 1 cancelled and resubmitted, {time.monotonic() - started:.1f} s in all")


@pytest.mark.slurm
def test_slurm_adaptive_stage_all_with_workers_retiring(slurm, pipeline_overrides, tmp_path):
    """``stage=all`` on an adaptive SLURM cluster whose workers retire after 15 +/- 3 s (Dask's --lifetime):
    jobs come while shards are left and go with their workers; nothing is lost, the console is quiet."""
    overrides = [
        *(o for o in pipeline_overrides if not o.startswith("cluster.")),
        f"paths.root={tmp_path}",
        "index.clips_per_shard=1",
        "run_name=adaptive",
        "cluster=slurm",
        "cluster.adapt_min=0",
        "cluster.adapt_max=2",
        "cluster.cores=1",
        "cluster.memory=2GB",
        "cluster.walltime=00:05:00",
        "cluster.worker_lifetime=15s",
        "cluster.lifetime_stagger=3s",
    ]
    started = time.monotonic()
    status, console = finish(pipeline([*overrides, "stage=all"], tmp_path))
    assert status == 0, console
    run_dir = tmp_path / "outputs" / "adaptive"
    check_every_clip_once(run_dir, console)
    assert (run_dir / "stats" / "per_class.parquet").is_file() and (run_dir / "report" / "index.html").is_file()
    job_logs = list((run_dir / "logs").glob("dask-worker-*.out"))  # cluster.log_directory's default
    assert job_logs and not list(tmp_path.glob("*.out")), "the SLURM jobs' output belongs in the run's logs/"
    script = " ".join(p.read_text() for p in job_logs)
    print(f"\nslurm adaptive, stage=all: {time.monotonic() - started:.1f} s, {len(job_logs)} jobs, "
          f"{script.count('worker-lifetime-reached')} worker(s) retired at their lifetime")  # fmt: skip
