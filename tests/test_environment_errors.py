"""Environment errors (a full disk, a read-only folder, a vanished file) are one line naming the path, exit 2,
with the last good output kept: on a real tmpfs mounted for the test (skipped where mounting is not permitted)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers.config import make_cfg
from pipeline.__main__ import run as run_all
from pipeline.errors import environment_problem

REPO = Path(__file__).resolve().parents[1]


def test_environment_problems_name_the_path_and_what_to_do():
    full = environment_problem(OSError(errno.ENOSPC, "No space left on device"), "/runs/demo")
    assert full.startswith("/runs/demo: no space left on the device; free some space")
    ro = environment_problem(OSError(errno.EROFS, "Read-only file system", "/runs/demo/config.yaml"), "/x")
    assert ro.startswith("/runs/demo/config.yaml: read-only file system")
    gone = environment_problem(
        FileNotFoundError(errno.ENOENT, "No such file", "/runs/demo/tubes/part-00000.parquet"), "/x"
    )
    assert gone.startswith("/runs/demo/tubes/part-00000.parquet: vanished")
    arrow = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert environment_problem(arrow, "/runs/demo").startswith("/runs/demo: no space left")
    assert environment_problem(OSError(errno.EINVAL, "Invalid argument"), "/x") is None  # a bug keeps its traceback


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MB tmpfs of its own; skipped when this process may not mount one."""
    point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def _cli(root: Path, *args: str):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", f"paths.root={root}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.returncode, [
        line for line in (done.stdout + done.stderr).splitlines() if "[ERROR]" in line or "Traceback" in line
    ]


@pytest.mark.slow
def test_full_disk_during_report_and_read_only_stats_keep_the_last_good_output(tmp_path, tmpfs, pipeline_overrides):
    run_all(make_cfg(tmp_path, ["stage=all", "run_name=env", *pipeline_overrides]))  # the outputs to keep
    run = tmpfs / "outputs" / "env"
    shutil.copytree(tmp_path / "outputs" / "env", run)
    report = (run / "report" / "index.html").read_bytes()
    stats = (run / "stats" / "per_class.parquet").read_bytes()
    filler = tmpfs / "filler"
    with open(
        filler, "wb", buffering=0
    ) as out:  # fill the disk up to 48 KB: the command's config fits, the report does not
        for block in (65536, 4096):
            try:
                while True:
                    out.write(b"\0" * block)
            except OSError:
                pass
    os.truncate(filler, filler.stat().st_size - 48 * 1024)

    status, lines = _cli(tmpfs, "stage=report", "run_name=env", *pipeline_overrides)
    assert status == 2 and len(lines) == 1 and "no space left on the device" in lines[0], lines
    assert (run / "report" / "index.html").read_bytes() == report  # the last good report is kept
    assert not list(run.glob(".report.*"))

    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    status, lines = _cli(tmpfs, "stage=stats", "run_name=env", *pipeline_overrides)
    assert status == 2 and len(lines) == 1 and "read-only file system" in lines[0] and str(run) in lines[0], lines
    assert (run / "stats" / "per_class.parquet").read_bytes() == stats
