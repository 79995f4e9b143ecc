"""The sharded-stage engine: shares of a SLURM array on one run folder, evaluate's retries and resume, the claim."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from helpers.config import make_cfg, small_run
from pipeline.__main__ import run
from pipeline.errors import ConfigError
from pipeline.runtime.planning import Share, claim, parse_share
from pipeline.store import RunDir, read_failures, read_index, read_tubes
from pipeline.store.ledger import read_ledger

ARRAY = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "6"}


def test_the_share_count_is_fixed_when_shares_first_run(tmp_path):
    """Task 7 of an array 6-8 is share 1 of 3; resubmitted alone (its environment says one task, first 7), it keeps
    share 1 of 3; an explicit i/n must name the recorded count."""
    run_dir = RunDir(tmp_path)
    assert claim(run_dir, "extract", None) is None
    assert claim(run_dir, "extract", "auto", ARRAY) == Share(1, 3)
    resubmitted = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "7"}
    assert claim(run_dir, "extract", "auto", resubmitted) == Share(1, 3)
    assert claim(run_dir, "extract", "2/3") == Share(2, 3) and Share(2, 3).owns(5) and not Share(2, 3).owns(6)
    with pytest.raises(ConfigError, match=r"split into 3 shares .*use i/3"):
        claim(run_dir, "extract", "0/4")
    with pytest.raises(ConfigError, match=r"array task 9 is outside the 3 shares .*tasks 6-8"):
        claim(run_dir, "extract", "auto", {**ARRAY, "SLURM_ARRAY_TASK_ID": "9"})


@pytest.mark.parametrize("bad", ["3/3", "1/0", "half", "-1/2"])
def test_a_bad_share_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"extract.share must be null, auto or 'i/n'"):
        parse_share(bad)
    with pytest.raises(ConfigError, match=r"not a SLURM array task"):
        parse_share("auto", {})


def _extract(root, overrides, share: str, env=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", f"paths.root={root}", *overrides, "stage=extract"]
    return subprocess.Popen(
        [*command, f"extract.share={share}"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_three_shares_at_once_on_one_folder_then_a_killed_one_resumed(synthetic_root, random_checkpoint, tmp_path):
    """Three array tasks run at once on one run folder, each its own driver; one is killed mid-run and resubmitted
    (its environment says one task): every clip exactly once, no ledger entry lost, the others' parts untouched,
    and stats sees every part."""
    overrides = [*small_run(synthetic_root, random_checkpoint), "index.clips_per_shard=1", "execution=driver"]
    run(make_cfg(tmp_path, [*overrides, "stage=index"]))
    run_dir = tmp_path / "outputs" / "demo"
    index, _ = read_index(run_dir)
    shards = sorted(index["shard"].unique())
    tasks = [_extract(tmp_path, overrides, "auto", {**ARRAY, "SLURM_ARRAY_TASK_ID": str(6 + i)}) for i in range(3)]
    victim = tasks[1]
    deadline = time.monotonic() + 120
    while not list((run_dir / "tubes").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.kill()
    for task in (tasks[0], tasks[2]):
        out, _ = task.communicate(timeout=300)
        assert task.returncode == 0, out
        assert "Traceback" not in out and "Warning" not in out
    victim.communicate()
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "tubes").glob("part-*.parquet")}
    again = _extract(tmp_path, overrides, "auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "1",
                                                   "SLURM_ARRAY_TASK_MIN": "7"})  # fmt: skip
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "share-1-of-3" in out
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "tubes").glob("part-*.parquet")}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing published was redone
    assert sorted(read_ledger(run_dir, "extract", "done")) == shards
    journals = sorted(p.name for p in (run_dir / "ledger" / "extract").glob("*.jsonl"))
    assert journals == ["share-0-of-3.jsonl", "share-1-of-3.jsonl", "share-2-of-3.jsonl"]
    tubes = read_tubes(run_dir, columns=["clip_id"])
    assert tubes["clip_id"].is_unique and set(tubes["clip_id"]) == set(index["clip_id"])
    result = run(make_cfg(tmp_path, [*overrides, "stage=stats"]))
    assert result["stats"].clips == len(index)


@pytest.mark.slow
def test_evaluate_retries_a_failing_shard_and_resumes(synthetic_root, random_checkpoint, tmp_path):
    """A model that fails once during evaluate: its shard is retried inside the task (both attempts in the shard's
    log), every clip is evaluated; a rerun finds every shard done through the ledger."""
    overrides = [*small_run(synthetic_root, random_checkpoint), "evaluate.steps=2", "evaluate.batch_size=4"]
    run(make_cfg(tmp_path, [*overrides, "stage=[index,extract]"]))
    traps = tmp_path / "traps"
    traps.mkdir()
    (traps / "raise-1").touch()
    trapped = [*overrides, "model.net._target_=helpers.traps.TrappedNet", f"+model.net.trap={traps}"]
    results = run(make_cfg(tmp_path, [*trapped, "stage=evaluate"]))
    run_dir = RunDir(tmp_path / "outputs" / "demo")
    assert not list(traps.iterdir()) and results["evaluate"].failed_shards == [] and results["evaluate"].left is None
    clips = pd.concat([pd.read_parquet(p) for p in sorted(run_dir.parts_folder("evaluate").glob("part-*.parquet"))])
    index, _ = read_index(run_dir)
    assert sorted(clips["clip_id"]) == sorted(index["clip_id"])
    logs = {p.name: p.read_text() for p in run_dir.logs.glob("evaluate-*.log")}
    retried = [name for name, text in logs.items() if "trap raise-1 sprang" in text]
    assert len(retried) == 1 and "attempt 2 of 3" in logs[retried[0]] and "Traceback" in logs[retried[0]]
    assert sorted(read_ledger(run_dir, "evaluate", "done")) == sorted(index["shard"].unique())
    assert read_failures(run_dir).query("stage == 'evaluate'").empty
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.parts_folder("evaluate").glob("part-*.parquet")}
    again = run(make_cfg(tmp_path, [*trapped, "stage=evaluate"]))
    assert again["evaluate"].skipped == again["evaluate"].shards == len(mtimes)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_auto_settings_are_resolved_once_for_the_tasks(tmp_path):
    """A task is sent numbers, not ``auto``, and no cluster section (it never reads the cluster's config)."""
    from pipeline.runtime.resolve import task_config

    sent = task_config(make_cfg(tmp_path, ["cluster.n_workers=2", "extract.torch_threads=auto"]))
    assert "cluster" not in sent
    assert sent["extract"]["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert sent["extract"]["num_workers"] == 0 and sent["extract"]["resize"] == "loader"
    gpu = task_config(
        make_cfg(
            tmp_path,
            [
                "cluster=slurm",
                "cluster.gpus_per_job=4",
                "cluster.cores=16",
                "trainer.accelerator=gpu",
                "extract.torch_threads=auto",
            ],
        )
    )
    assert gpu["extract"]["torch_threads"] == 4 and gpu["extract"]["num_workers"] == 3
    assert gpu["extract"]["prefetch_factor"] == 3 and gpu["extract"]["resize"] == "device"
