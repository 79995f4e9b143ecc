"""Clusters from config, retries and killed workers, SLURM, progress, fail_fast and the run fingerprint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.config import make_cfg
from pipeline.__main__ import run
from pipeline.data.clips import ClipDataset, collate_clips, transform_batch
from pipeline.data.resize import ResizeCrop
from pipeline.errors import ConfigError, StageFailed
from pipeline.models import DemoNet3D
from pipeline.runtime import cluster, local, progress
from pipeline.runtime.builders import make_trainer
from pipeline.runtime.job import GPU
from pipeline.runtime.progress import ShardProgress
from pipeline.runtime.resolve import loader_workers, prefetch_factor, resize_on_device, torch_threads
from pipeline.runtime.slurm import slurm_cluster
from pipeline.stages import extract
from pipeline.store import read_failures, read_index, read_tubes
from pipeline.store.ledger import read_ledger

REPO = Path(__file__).resolve().parents[1]


def test_slurm_config_renders_a_job_script(tmp_path):
    cfg = make_cfg(
        tmp_path,
        [
            "cluster=slurm",
            "cluster.queue=gpu",
            "cluster.account=vision",
            "cluster.walltime=02:30:00",
            "cluster.cores=16",
            "cluster.memory=120GB",
            "cluster.gpus_per_job=4",
            "cluster.job_extra_directives=['--constraint=a100','--qos=low']",
            "cluster.job_script_prologue=['source ~/venv/bin/activate']",
        ],
    )
    cluster.validate(cfg.cluster)
    settings = {k: v for k, v in dict(cfg.cluster).items() if k not in ("_target_", "jobs", "adapt_min", "adapt_max")}
    with slurm_cluster(**settings) as slurm:  # no job is submitted: no SLURM needed
        script = slurm.job_script()
    lines = script.splitlines()
    assert lines[0].startswith("#!")
    for directive in (
        "-p gpu",
        "-A vision",
        "-t 02:30:00",
        "--cpus-per-task=16",
        "--gres=gpu:4",
        "--constraint=a100",
        "--qos=low",
    ):
        assert f"#SBATCH {directive}" in lines, directive
    assert "source ~/venv/bin/activate" in lines
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert "--nworkers 4" in worker and "--resources GPU=1" in worker  # one worker per GPU, each offering one


def test_auto_workers_use_every_core_within_the_memory(tmp_path, monkeypatch):
    """``cluster.n_workers=auto`` (the default): a worker per core this process may use, but no more than one per
    2 GiB of memory; each then owns one core (one torch thread per task). A number is taken as it is."""
    cfg = make_cfg(tmp_path, ["cluster.n_workers=auto"])
    cluster.validate(cfg.cluster)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(local.psutil, "virtual_memory", lambda: type("Memory", (), {"total": 64 * 2**30}))
    assert local.local_workers("auto") == 16 and local.local_workers(3) == 3
    assert torch_threads(make_cfg(tmp_path, ["cluster.n_workers=auto", "extract.torch_threads=auto"])) == 1
    assert torch_threads(make_cfg(tmp_path, ["cluster.n_workers=4", "extract.torch_threads=auto"])) == 4
    monkeypatch.setattr(local.psutil, "virtual_memory", lambda: type("Memory", (), {"total": 9 * 2**30}))
    assert local.local_workers("auto") == 4  # 9 GiB: four workers of 2 GiB
    monkeypatch.setattr(local.psutil, "virtual_memory", lambda: type("Memory", (), {"total": 2**30}))
    assert local.local_workers("auto") == 1


def test_bad_cluster_options_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="n_worker.*options: n_workers"):
        cluster.validate(make_cfg(tmp_path, ["+cluster.n_worker=3"]).cluster)
    with pytest.raises(ValueError, match="cluster.n_workers must be 'auto' or >= 1, got 0"):
        cluster.validate(make_cfg(tmp_path, ["cluster.n_workers=0"]).cluster)
    with pytest.raises(ValueError, match="cluster.n_workers must be 'auto' or >= 1, got many"):
        cluster.validate(make_cfg(tmp_path, ["cluster.n_workers=many"]).cluster)
    with pytest.raises(ValueError, match="queu"):
        cluster.validate(make_cfg(tmp_path, ["cluster=slurm", "+cluster.queu=gpu"]).cluster)
    with pytest.raises(ValueError, match="adapt_max"):
        cluster.validate(make_cfg(tmp_path, ["cluster=slurm", "cluster.adapt_min=4", "cluster.adapt_max=2"]).cluster)
    with pytest.raises(ValueError, match="memory_limit"):
        cluster.validate(make_cfg(tmp_path, ["cluster.memory_limit=lots"]).cluster)
    with pytest.raises(ValueError, match="needs GPU workers"):
        extract.validate(make_cfg(tmp_path, ["trainer.accelerator=gpu", "model.checkpoint=null"]))


def test_cli_names_a_missing_scheduler_address_in_one_line(tmp_path):
    args = [sys.executable, "-m", "pipeline", "stage=extract", f"paths.root={tmp_path}", "cluster=address"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "cluster.address must be set" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs" / "demo" / "tubes").exists()


def test_inside_a_slurm_allocation_a_task_uses_one_device(pipeline_overrides, tmp_path, monkeypatch):
    """SLURM's task variables of a 4-task job must not make Lightning join a 4-process world."""
    for key, value in dict(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="saliency",
        SLURM_NTASKS="4",
        SLURM_NTASKS_PER_NODE="4",
        SLURM_PROCID="2",
        SLURM_LOCALID="2",
        SLURM_NODEID="0",
        SLURM_NNODES="1",
    ).items():
        monkeypatch.setenv(key, value)
    seen = []
    monkeypatch.setattr(progress, "EVERY", 0.0)  # every batch (the default sends at most two events a second)
    monkeypatch.setattr(
        ShardProgress,
        "on_event",
        lambda self, event, _on=ShardProgress.on_event: (seen.append(event[1]["done"]), _on(self, event)),
    )
    run(
        make_cfg(
            tmp_path,
            [
                *pipeline_overrides,
                "cluster.processes=false",
                "execution=cluster",
                "index.clips_per_shard=8",
                "run_name=slurm",
                "stage=[index,extract]",
            ],
        )
    )
    tubes = read_tubes(tmp_path / "outputs" / "slurm", columns=["clip_id"])
    assert len(tubes) == 8 and tubes["clip_id"].is_unique
    # progress moves per batch of 2 clips, from inside the worker, before the shard is done
    assert seen == [2, 4, 6, 8]
    log = (tmp_path / "outputs" / "slurm" / "logs" / "shard-00000.log").read_text()
    assert "shard 0: 8 clips" in log and "shard 0 done: 8 rows" in log
    # a task's Trainer is one process, not rank 2 of SLURM's 4, and never installs Lightning's SLURM auto-requeue
    # handler (on SIGUSR1 it would resubmit the job of the Dask worker it runs in)
    trainer = make_trainer(make_cfg(tmp_path, pipeline_overrides), [], inference_mode=True)
    assert trainer.world_size == 1 and trainer.global_rank == 0
    before = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) is before
    finally:
        trainer._signal_connector.teardown()


@pytest.mark.slow  # worker processes die and restart (about 30 s)
def test_retries_killed_workers_and_a_rerun(pipeline_overrides, tmp_path):
    """One forward pass kills its worker process: the shards that worker held (Dask blames every task a dead
    worker held) become failure rows and the run goes on. One raises: Dask retries that shard and it finishes.
    The next run computes only the failed shards."""
    traps = tmp_path / "traps"
    traps.mkdir()
    (traps / "exit-1").touch()
    (traps / "raise-2").touch()
    overrides = [
        *pipeline_overrides,
        "model.net._target_=helpers.traps.TrappedNet",
        f"+model.net.trap={traps}",
        "extract.retries=1",
        "execution=cluster",
        "index.clips_per_shard=2",
        "run_name=traps",
    ]
    run_dir = tmp_path / "outputs" / "traps"
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        pytest.raises(
            StageFailed, match=r"extract: \d of 4 shards done, \d left .*resume; not run: stats$"
        ) as unfinished,
    ):
        run(make_cfg(tmp_path, [*overrides, "stage=[index,extract,stats]"]))
    results = unfinished.value.results
    assert "stats" not in results and not (run_dir / "stats").exists()  # nothing to do while extract is unfinished
    assert not list(traps.iterdir())
    index, _ = read_index(run_dir)
    killed = results["extract"].failed_shards
    lost = index["shard"].isin(killed)
    assert 1 <= len(killed) < index["shard"].nunique() == 4
    assert results["extract"].failures == {"KilledWorker": int(lost.sum())}
    failures = read_failures(run_dir)
    assert (
        set(failures["clip_id"]) == set(index.loc[lost, "clip_id"]) and (failures["error_type"] == "KilledWorker").all()
    )
    tubes = read_tubes(run_dir, columns=["clip_id"])
    assert set(tubes["clip_id"]) == set(index.loc[~lost, "clip_id"])
    logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("*.log")}
    raised = [name for name, text in logs.items() if "trap raise-2 sprang" in text]
    assert (
        len(raised) == 1 and " done: " in logs[raised[0]]
    )  # the raising attempt is logged, and its retry finished the shard
    assert sorted(read_ledger(run_dir, "extract", "failed")) == killed
    assert len(read_ledger(run_dir, "extract", "done")) == 4 - len(killed)

    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "tubes").glob("part-*.parquet")}
    again = run(make_cfg(tmp_path, [*overrides, "stage=extract"]))
    assert again["extract"].skipped == len(before) and again["extract"].failed_shards == []
    assert {
        p.name: p.stat().st_mtime_ns for p in (run_dir / "tubes").glob("part-*.parquet") if p.name in before
    } == before
    tubes = read_tubes(run_dir, columns=["clip_id"])
    assert tubes["clip_id"].is_unique and set(tubes["clip_id"]) == set(index["clip_id"])
    assert read_failures(run_dir).empty


def test_fail_fast_stops_at_the_first_bad_clip(pipeline_overrides, synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    overrides = [*pipeline_overrides, f"dataset.root={data}", "cluster.processes=false"]
    run(make_cfg(tmp_path, [*overrides, "run_name=ff", "stage=index"]))
    index, _ = read_index(tmp_path / "outputs" / "ff")
    bad = Path(index["source"].iloc[-1])
    bad.write_bytes(bad.read_bytes()[:300])  # truncated after indexing
    with pytest.raises(StageFailed, match=f"fail_fast.*{index['clip_id'].iloc[-1]}"):
        run(make_cfg(tmp_path, [*overrides, "run_name=ff", "extract.fail_fast=true", "stage=extract"]))
    # without fail_fast the same data finishes, with the bad clip as a failure row
    results = run(make_cfg(tmp_path, [*overrides, "run_name=ff", "stage=extract"]))
    assert results["extract"].failures == {"VideoError": 1}
    assert len(read_tubes(tmp_path / "outputs" / "ff", columns=["clip_id"])) == 7
    assert len(list((tmp_path / "outputs" / "ff" / "configs").glob("*.yaml"))) == 3  # every invocation's config kept


def test_a_retrained_checkpoint_is_another_configuration(pipeline_overrides, random_checkpoint, tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    shutil.copy(random_checkpoint, checkpoint)
    overrides = [
        *pipeline_overrides,
        f"model.checkpoint={checkpoint}",
        "cluster.processes=false",
        "index.clips_per_shard=8",
        "run_name=ckpt",
    ]
    run(make_cfg(tmp_path, [*overrides, "stage=[index,extract]"]))
    torch.manual_seed(1)  # "retrained" to the same path
    torch.save({"state_dict": {f"net.{k}": v for k, v in DemoNet3D(num_classes=4).state_dict().items()}}, checkpoint)
    with pytest.raises(ConfigError, match="another configuration.*new run_name"):
        run(make_cfg(tmp_path, [*overrides, "stage=extract"]))


@pytest.mark.slow
def test_lightning_ddp_ranks_write_disjoint_parts(pipeline_overrides, tmp_path):
    """strategy=ddp with 2 CPU processes: each rank publishes its share of every shard, no clip twice."""
    overrides = [
        f"paths.root={tmp_path}",
        *pipeline_overrides,
        "cluster.processes=false",
        "store.codec=float32",
        "run_name=ddp",
    ]
    run(make_cfg(tmp_path, [*overrides, "stage=[index,extract]", "run_name=dask"]))
    run(make_cfg(tmp_path, [*overrides, "stage=index"]))
    args = [sys.executable, "-m", "pipeline", "stage=extract", *overrides, "trainer.strategy=ddp", "trainer.devices=2"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "ddp"
    index, _ = read_index(run_dir)
    parts = sorted(p.name for p in (run_dir / "tubes").glob("part-*.parquet"))
    assert parts == [f"part-{s:05d}-rank{r}.parquet" for s in range(3) for r in (0, 1)]
    tubes = read_tubes(run_dir, columns=["clip_id", "volume", "pred"]).set_index("clip_id")
    assert tubes.index.is_unique and set(tubes.index) == set(index["clip_id"])
    dask_tubes = read_tubes(tmp_path / "outputs" / "dask", columns=["clip_id", "volume", "pred"]).set_index("clip_id")
    for clip_id, row in dask_tubes.iterrows():  # other batches than the Dask run's: same tubes up to float rounding
        np.testing.assert_allclose(tubes.loc[clip_id, "volume"], row["volume"], rtol=1e-5, atol=1e-6)
        assert tubes.loc[clip_id, "pred"] == row["pred"]
    assert sum(entry.rows for entry in read_ledger(run_dir, "extract", "done").values()) == 8
    # a rerun finds every shard finished (all ranks' shares present) and computes nothing
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0 and "3 already done, 0 to run" in again.stdout + again.stderr


def test_a_thread_reuses_its_trainer_and_config_while_the_settings_stay(pipeline_overrides, tmp_path):
    """Every shard of a worker thread gets the same Trainer, with that shard's callbacks only, and the same config
    object while the settings dict is unchanged; other settings, another thread or a failed run get new ones."""
    import threading

    from pytorch_lightning.callbacks import Callback

    from pipeline.runtime.builders import forget_trainer
    from pipeline.runtime.resolve import config_of_task

    cfg = make_cfg(tmp_path, pipeline_overrides)
    first, second = Callback(), Callback()
    a = make_trainer(cfg, [first], inference_mode=True)
    b = make_trainer(cfg, [second], inference_mode=True)
    assert a is b and second in b.callbacks and first not in b.callbacks
    gradients = make_trainer(cfg, [], inference_mode=False)
    assert gradients is not a
    forget_trainer()  # after a run that raised
    assert make_trainer(cfg, [], inference_mode=False) is not gradients
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(make_trainer(cfg, [], inference_mode=False)))
    thread.start()
    thread.join()
    assert elsewhere[0] is not make_trainer(cfg, [], inference_mode=False)

    settings = {"extract": {"batch_size": 2}, "model": {"layer": "features"}}
    built = config_of_task(settings)
    assert config_of_task({"extract": {"batch_size": 2}, "model": {"layer": "features"}}) is built
    assert config_of_task({"extract": {"batch_size": 4}, "model": {"layer": "features"}}).extract.batch_size == 4


def test_one_worker_per_gpu_each_offering_one():
    """cluster.gpus=2: two workers, each offering GPU=1, and each task learns its worker's device."""
    from dask.distributed import Client

    with local.local(gpus=2, processes=False, dashboard_address=None) as gpus, Client(gpus) as client:
        workers = client.scheduler_info()["workers"]
        assert sorted(w["resources"][GPU] for w in workers.values()) == [1, 1]
        assert all(w["nthreads"] == 1 for w in workers.values())
        devices = {
            addr: client.submit(cluster.worker_gpu, 2, workers=[addr], resources={GPU: 1}, pure=False).result()
            for addr in workers
        }
        assert sorted(devices.values()) == [0, 1]


def test_gpu_tasks_decode_with_every_core_their_worker_owns_but_one(tmp_path):
    def workers(*overrides):
        return loader_workers(make_cfg(tmp_path, list(overrides)))

    assert workers() == 0  # CPU: decoding shares the model's cores
    assert workers("trainer.accelerator=gpu", "cluster.gpus=1", "extract.num_workers=3") == 3
    cores = len(os.sched_getaffinity(0))
    assert workers("trainer.accelerator=gpu", "cluster.gpus=2") == max(2, cores // 2 - 1)
    # a SLURM job of 32 cores and 4 GPUs: 8 cores per GPU worker, 7 of them decoding
    slurm = ["cluster=slurm", "cluster.cores=32", "cluster.gpus_per_job=4", "trainer.accelerator=gpu"]
    assert workers(*slurm) == 7
    assert workers(*slurm[:2], "cluster.gpus_per_job=16", "trainer.accelerator=gpu") == 2


def test_gpu_loaders_pin_uint8_frames_and_prefetch_eight_batches(tmp_path, synthetic_root):
    gpu = ["trainer.accelerator=gpu", "cluster=slurm", "cluster.cores=32", "cluster.gpus_per_job=4"]
    cpu_cfg, gpu_cfg = make_cfg(tmp_path, []), make_cfg(tmp_path, gpu)
    assert not resize_on_device(cpu_cfg) and resize_on_device(gpu_cfg)
    assert resize_on_device(make_cfg(tmp_path, ["extract.resize=device"]))
    assert not resize_on_device(make_cfg(tmp_path, [*gpu, "extract.resize=loader"]))
    # 7 decode processes: 2 batches each ahead (at least 8 in flight); one process: 8; a fixed setting stays
    assert prefetch_factor(gpu_cfg, 7) == 2 and prefetch_factor(gpu_cfg, 1) == 8 and prefetch_factor(gpu_cfg, 3) == 3
    assert prefetch_factor(make_cfg(tmp_path, ["extract.prefetch_factor=5"]), 7) == 5
    assert prefetch_factor(cpu_cfg, 0) is None
    # a raw batch: uint8 frames as decoded, resized later; the same clip as the loader's own resize
    video = next(iter(synthetic_root.glob("*/*.mp4")))
    rows = pd.DataFrame({"source": [str(video)], "frame_indices": [list(range(8))]})
    transform = ResizeCrop(32, (32, 32))
    raw = collate_clips([ClipDataset(rows, transform, raw=True)[0]])
    done = collate_clips([ClipDataset(rows, transform)[0]])
    assert raw.video is None and raw.frames[0].dtype == torch.uint8 and raw.frames[0].shape[0] == 8
    assert torch.equal(transform_batch(raw, transform), done.video) and torch.equal(raw.crop_box, done.crop_box)


def test_local_workers_keep_glibc_memory_thresholds():
    """Dask's nanny would start every worker with MALLOC_TRIM_THRESHOLD_ set (1.5x the CPU per clip); the
    project's local workers start without it, as the driver does, and without Dask's statistical profiler (a
    callback 100 times a second on the worker's event loop)."""
    from omegaconf import OmegaConf

    settings = OmegaConf.create(
        {
            "_target_": "pipeline.runtime.local.local",
            "n_workers": 1,
            "dashboard_address": None,
            "start_method": "spawn",
        }
    )
    with cluster.open_client(settings) as client:
        environ = next(iter(client.run(lambda: dict(os.environ)).values()))
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert profiling and not any(profiling.values())
    assert "MALLOC_TRIM_THRESHOLD_" not in environ
    assert environ.get("OMP_NUM_THREADS") == "1"  # the nanny's other settings still reach the worker


def test_a_worker_started_with_a_malloc_trim_threshold_gets_glibc_thresholds_back():
    """In a process started with Dask's MALLOC_TRIM_THRESHOLD_ (a SLURM job's worker), every clip-sized array is
    mapped and faulted in afresh; after undo_malloc_trim the heap reuses its memory."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    script = """
import os, resource, numpy as np
from pipeline.runtime.memory import undo_malloc_trim

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        block = np.ones(3 * 16 * 64 * 64, dtype=np.float32)  # one 16x64x64 clip
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
with_trim = faults()
undo_malloc_trim()
faults()
print(with_trim, faults(), "MALLOC_TRIM_THRESHOLD_" in os.environ)
"""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with_trim, after, still_set = done.stdout.split()
    assert int(with_trim) >= 200 * 100  # each array faulted in afresh (192 pages of 4 KiB)
    assert int(after) < 200 and still_set == "False"


def test_slurm_workers_retire_before_the_walltime(tmp_path):
    """The job script starts its workers with Dask's --lifetime: the walltime less a tenth (1 to 15 minutes),
    staggered by a third of that margin, so that each is gone before SLURM kills its job."""
    settings = dict(walltime="02:00:00", cores=2, memory="4GB")
    with slurm_cluster(**settings) as slurm:
        script = slurm.job_script()
    assert "--lifetime 6480s --lifetime-stagger 240s" in script  # 7200 s - 720 s, 720 / 3
    assert "export DASK_DISTRIBUTED__WORKER__DAEMON=False" in script
    with slurm_cluster(**settings, worker_lifetime=None) as slurm:
        assert "--lifetime" not in slurm.job_script()
    with pytest.raises(ConfigError, match=r"cluster.worker_lifetime \(3h\) plus cluster.lifetime_stagger"):
        cluster.validate(
            make_cfg(tmp_path, ["cluster=slurm", "cluster.walltime=02:00:00", "cluster.worker_lifetime=3h"]).cluster
        )
    with pytest.raises(ConfigError, match="cluster.walltime must be SLURM's time format"):
        cluster.validate(make_cfg(tmp_path, ["cluster=slurm", "cluster.walltime=soon"]).cluster)
