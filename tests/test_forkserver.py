"""The workers' forkserver the command line starts at its first line: which commands start it, and that one
the settings do not claim is gone before the command goes on, or exits."""

import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from helpers.config import make_cfg
from helpers.deploy import pipeline
from pipeline.__main__ import run
from pipeline.runtime.forkserver import likely_wanted
from pipeline.runtime.inprocess import AUTO_MAX_CLIPS, EARLY_MAX_CLIPS
from pipeline.store.readers import read_index

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["stage=extract"], True),
        (["stage=[extract,stats]", "cluster=local", "run_name=a"], True),
        (["stage=extract", "stage=stats"], False),  # the last value wins, as in Hydra
        (["stage=all"], False),  # its first stage, index, starts the cluster when it needs one
        (["run_name=a"], False),
        (["stage=extract", "cluster=slurm"], False),
        (["stage=extract", "execution=driver"], False),
        (["stage=extract", "trainer.strategy=ddp_spawn"], False),
        (["stage=extract", "execution=cluster", "trainer.strategy=auto"], True),
        (["stage=extract", "--cfg", "job"], False),
        (["-m", "stage=extract"], False),
        (["--config-dir", "/my/conf", "--config-name=mine", "stage=extract"], True),  # where the config comes from
        (["-cn", "stage=all", "stage=extract"], True),  # "stage=all" is -cn's value here, not an override
        (["-cd", "/my/conf", "--info", "stage=extract"], False),
    ],
)
def test_the_commands_that_start_the_forkserver_early(args, wanted):
    assert likely_wanted(args) is wanted


def _forkservers(tag: str) -> list[psutil.Process]:
    """The forkservers started by a command whose environment carries ``tag``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (
                "multiprocessing.forkserver" in " ".join(proc.info["cmdline"] or [])
                and proc.environ().get("TAG") == tag
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _start(args: list[str], tmp_path: Path, tag: str, monkeypatch) -> subprocess.Popen:
    """``python -m pipeline ARGS`` under ``tmp_path``, its environment (and its forkserver's) carrying ``tag``."""
    monkeypatch.setenv("TAG", tag)
    return pipeline([f"paths.root={tmp_path}", *args], REPO)


def test_a_command_refused_by_its_settings_leaves_no_forkserver(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex
    proc = _start(["stage=extract", "store.codec=float8"], tmp_path, tag, monkeypatch)
    seen = False
    while proc.poll() is None:
        seen = seen or bool(_forkservers(tag))
        time.sleep(0.05)
    assert proc.returncode == 2, proc.stdout.read()
    assert seen, "the command line did not start the forkserver early"
    assert _forkservers(tag) == []


def test_a_run_in_this_process_stops_the_forkserver_before_its_shards(pipeline_overrides, tmp_path, monkeypatch):
    """A small extract runs in the driver (``execution=auto``): the forkserver started early is killed once that is
    known, not left importing torch beside the shards."""
    run(make_cfg(tmp_path, [*pipeline_overrides, "stage=index"]))
    tag = uuid.uuid4().hex
    proc = _start([*pipeline_overrides, "stage=extract"], tmp_path, tag, monkeypatch)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "run in this process" in line:
            assert _forkservers(tag) == [], "".join(lines)
    assert proc.wait(timeout=300) == 0, "".join(lines)
    assert any("run in this process" in line for line in lines), "".join(lines)


def test_a_command_line_extract_of_a_few_dozen_clips_runs_on_the_workers_it_started_early(
    pipeline_overrides, tmp_path, monkeypatch
):
    """``execution=auto`` keeps up to 256 CPU clips in the driver, except from a command line that started the
    forkserver early: there the workers' imports were made meanwhile, and more than ``EARLY_MAX_CLIPS`` clips go
    to the cluster. The command is stopped once it said where its shards run (Ctrl-C: nothing is lost)."""
    overrides = [*pipeline_overrides, "dataset.split=all", "sampler=uniform", "sampler.num_clips=2"]
    run(make_cfg(tmp_path, [*overrides, "stage=index"]))
    clips = len(read_index(tmp_path / "outputs" / "demo")[0])
    assert EARLY_MAX_CLIPS < clips <= AUTO_MAX_CLIPS
    proc = _start([*overrides, "stage=extract"], tmp_path, uuid.uuid4().hex, monkeypatch)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Dask cluster:" in line or "run in this process" in line:
            break
    proc.send_signal(signal.SIGINT)
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) in (0, 130), "".join(lines)
    assert any("Dask cluster: 1 local worker(s)" in line for line in lines), "".join(lines)
    assert not any("run in this process" in line for line in lines), "".join(lines)
