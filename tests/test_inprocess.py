"""A small CPU extract runs in the driver: no cluster starts, a failing shard is retried, then becomes failure rows."""

from __future__ import annotations

import dask
import pytest
import torch
from omegaconf import OmegaConf

import pipeline.runtime.cluster as cluster
import pipeline.runtime.shard as shard_task
from helpers.config import make_cfg
from pipeline.__main__ import run
from pipeline.errors import ConfigError, StageFailed
from pipeline.runtime.cluster import LazyClient
from pipeline.runtime.tasks import follow
from pipeline.store import read_failures, read_index, read_tubes
from pipeline.store.ledger import read_ledger


@pytest.fixture
def indexed(pipeline_overrides, tmp_path):
    overrides = [*pipeline_overrides, "cluster.processes=false", "index.clips_per_shard=2", "run_name=here"]
    run(make_cfg(tmp_path, [*overrides, "stage=index"]))
    index, _ = read_index(tmp_path / "outputs" / "here")
    return overrides, tmp_path / "outputs" / "here", index


def _failing_once(monkeypatch, shard: int, times: int) -> list[int]:
    """An attempt at ``shard`` raises the first ``times`` times; returns the shards attempted, in order."""
    real, calls = shard_task._explain_shard, []

    def flaky(cfg, job, slog):
        calls.append(job.shard)
        if job.shard == shard and calls.count(shard) <= times:
            raise RuntimeError(f"shard {shard} broke")
        return real(cfg, job, slog)

    monkeypatch.setattr(shard_task, "_explain_shard", flaky)
    return calls


def test_a_small_run_starts_no_cluster_and_retries_a_failing_shard(indexed, tmp_path, monkeypatch):
    overrides, run_dir, index = indexed
    calls = _failing_once(monkeypatch, shard=1, times=1)
    monkeypatch.setattr(LazyClient, "_client", lambda self: pytest.fail("a Dask cluster was started"))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        results = run(make_cfg(tmp_path, [*overrides, "stage=extract", "extract.retries=1"]))
        assert torch.get_num_threads() == 3  # the shards ran on extract.torch_threads=1; the driver's count is back
    finally:
        torch.set_num_threads(threads)
    shards = index["shard"].nunique()
    assert sorted(calls) == sorted([*range(shards), 1]) and results["extract"].failed_shards == []
    tubes = read_tubes(run_dir, columns=["clip_id"])
    assert tubes["clip_id"].is_unique and set(tubes["clip_id"]) == set(index["clip_id"])
    assert sorted(read_ledger(run_dir, "extract", "done")) == list(range(shards))


def test_a_shard_failing_every_attempt_becomes_failure_rows(indexed, tmp_path, monkeypatch):
    overrides, run_dir, index = indexed
    _failing_once(monkeypatch, shard=0, times=2)
    with pytest.raises(StageFailed, match="3 of 4 shards done, 1 left") as unfinished:  # the command fails
        run(make_cfg(tmp_path, [*overrides, "stage=extract", "extract.retries=1"]))
    assert unfinished.value.results["extract"].failed_shards == [0]
    failures = read_failures(run_dir)
    lost = index.loc[index["shard"] == 0, "clip_id"]
    assert set(failures["clip_id"]) == set(lost) and (failures["error_type"] == "RuntimeError").all()
    assert set(read_tubes(run_dir, columns=["clip_id"])["clip_id"]) == set(index["clip_id"]) - set(lost)
    with pytest.raises(StageFailed, match="fail_fast.*shard 0: RuntimeError: shard 0 broke"):
        _failing_once(monkeypatch, shard=0, times=1)
        run(make_cfg(tmp_path, [*overrides, "stage=extract", "extract.fail_fast=true"]))


def test_nothing_to_run_starts_no_cluster(pipeline_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(LazyClient, "_client", lambda self: pytest.fail("a Dask cluster was started"))
    lazy = LazyClient(make_cfg(tmp_path, pipeline_overrides).cluster)
    assert list(follow(lazy, print, {})) == [] and not lazy.started


def test_an_extract_on_workers_starts_its_cluster_before_its_checks(indexed, tmp_path, monkeypatch):
    """When the first stage is an extract whose clips left will run on Dask workers, the cluster starts once its
    settings passed and before the model checks (build and probe), to start while they run; with a bad setting,
    nothing left, or few enough clips for the driver, no cluster starts early."""
    from pipeline.runtime.inprocess import cluster_pays_off
    from pipeline.stages import extract as extract_stage

    overrides, run_dir, index = indexed
    events = []
    real_start, real_validate = LazyClient.start_soon, extract_stage.validate

    def start_soon(self):
        events.append("cluster")
        real_start(self)

    def validate(*args, **kwargs):
        events.append("checks")
        real_validate(*args, **kwargs)

    monkeypatch.setattr(LazyClient, "start_soon", start_soon)
    monkeypatch.setattr(extract_stage, "validate", validate)
    small = make_cfg(tmp_path, [*overrides, "stage=extract"])
    on_workers = make_cfg(tmp_path, [*overrides, "stage=extract", "execution=cluster"])
    assert not cluster_pays_off(small, run_dir) and cluster_pays_off(on_workers, run_dir)
    with pytest.raises(ConfigError, match="extract.batch_size=0: not allowed"):  # a bad setting: nothing started
        run(make_cfg(tmp_path, [*overrides, "stage=extract", "execution=cluster", "extract.batch_size=0"]))
    assert events == []
    run(on_workers)
    assert events == ["cluster", "checks"]
    tubes = read_tubes(run_dir, columns=["clip_id"])
    assert tubes["clip_id"].is_unique and set(tubes["clip_id"]) == set(index["clip_id"])
    events.clear()
    run(on_workers)  # every shard done: nothing to start a cluster for
    assert events == ["checks"] and not cluster_pays_off(on_workers, run_dir)


def test_a_cluster_that_fails_to_start_in_the_background_fails_where_it_is_used(tmp_path, monkeypatch):
    """An early start's error (an address nobody listens at) is raised by the client's first use, as a cluster
    started on first use would raise it."""
    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 2)  # not the 30 s a real scheduler is given to answer
    settings = OmegaConf.create(
        {"_target_": "pipeline.runtime.cluster.address", "address": "tcp://127.0.0.1:9"}  # discard port: closed
    )
    lazy = LazyClient(settings)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        lazy.start_soon()
        assert lazy.started
        with pytest.raises(ConfigError, match="no Dask scheduler answers there"):
            lazy.scheduler_info()
    lazy.close()


def test_a_small_dataset_is_probed_in_the_driver(pipeline_overrides, tmp_path, monkeypatch):
    """``execution=auto`` probes a few videos in the driver, no cluster started; ``cluster`` probes them on the
    cluster; the two indexes are the same. A value other than auto, driver or cluster is one line."""
    overrides = [*pipeline_overrides, "cluster.processes=false", "stage=index"]
    with monkeypatch.context() as patch:
        patch.setattr(LazyClient, "_client", lambda self: pytest.fail("a Dask cluster was started"))
        run(make_cfg(tmp_path, [*overrides, "run_name=driver"]))
    submitted = []
    real_client = LazyClient._client
    monkeypatch.setattr(LazyClient, "_client", lambda self: submitted.append(1) or real_client(self))
    run(make_cfg(tmp_path, [*overrides, "run_name=cluster", "execution=cluster"]))
    assert submitted  # the probes went to the cluster
    here, _ = read_index(tmp_path / "outputs" / "driver")
    there, _ = read_index(tmp_path / "outputs" / "cluster")
    assert len(here) > 0 and here.equals(there)
    with pytest.raises(
        ConfigError, match=r"execution=sometimes: not allowed; execution takes auto \| driver \| cluster"
    ):
        run(make_cfg(tmp_path, [*overrides, "run_name=bad", "execution=sometimes"]))
