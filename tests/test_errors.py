"""What the console shows when things go wrong: a user error is one line, a failing shard is one line (its
tracebacks go to the shard's log), a genuine bug keeps its traceback. Each runs the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.store import read_index, read_tubes

REPO = Path(__file__).resolve().parents[1]


def _command(args: list[str], tmp_path: Path) -> dict:
    """How the tests start the command line: its arguments, folder and environment (``subprocess`` keywords)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    return dict(args=[sys.executable, "-m", "pipeline", f"paths.root={tmp_path}", *args], cwd=REPO, env=env)


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(**_command(args, tmp_path), capture_output=True, text=True, timeout=300)


def test_a_bad_setting_is_one_line_without_traceback(tmp_path):
    done = _run(["stage=extract", "store.codec=float8"], tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() + done.stdout.splitlines() if "store.codec" in line]
    assert len(errors) == 1 and "float8" in errors[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_a_failing_shard_is_one_console_line_and_its_tracebacks_are_in_its_log(pipeline_overrides, tmp_path):
    traps = tmp_path / "traps"
    traps.mkdir()
    for name in ("raise-1", "raise-2"):  # one worker thread: the first shard's two attempts spring both
        (traps / name).touch()
    overrides = [
        *pipeline_overrides,
        "model.net._target_=helpers.traps.TrappedNet",
        f"+model.net.trap={traps}",
        "extract.retries=1",
        "execution=cluster",  # the traps spring inside a Dask worker only
        "cluster.n_workers=1",
        "run_name=trapped",
        "stage=[index,extract]",
    ]
    done = _run(overrides, tmp_path)
    console = done.stdout + done.stderr
    failed = [line for line in console.splitlines() if "failed after" in line]
    assert len(failed) == 1, console[-3000:]
    assert "shard 0 failed after 2 attempt(s): RuntimeError: trap raise-" in failed[0]
    assert "logs/shard-00000.log" in failed[0]
    assert "Traceback" not in console and "Compute Failed" not in console
    # the command did not finish its work: a non-zero exit and one line saying what is left and how to resume;
    # the progress bar counted the failed shard's clips apart
    run_dir = tmp_path / "outputs" / "trapped"
    assert done.returncode == 2
    last = done.stdout.strip().splitlines()[-1]
    assert last.endswith(
        f"extract: 2 of 3 shards done, 1 left (shards 0); see {run_dir / 'failures'} and {run_dir / 'logs'}, "
        "fix the cause and rerun the same command to resume"
    )
    assert "failed=3" in done.stderr and "failed=" not in done.stderr.split("failed=3")[0]
    log = (tmp_path / "outputs" / "trapped" / "logs" / "shard-00000.log").read_text()
    assert log.count("Traceback (most recent call last)") == 2 and "trap raise-1 sprang" in log
    assert "trap raise-2 sprang" in log


def test_a_genuine_bug_keeps_its_traceback(tmp_path):
    done = _run(["stage=index", "dataset._target_=helpers.traps.BrokenReader", "run_name=bug"], tmp_path)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ZeroDivisionError" in done.stderr


def test_leaving_runs_the_exit_handlers_and_flushes_then_exits_with_the_status():
    """The command ends with leave(): exit handlers (Dask's, multiprocessing's) and every buffered line still
    happen, only the module-by-module unloading is skipped."""
    script = (
        "import atexit, logging\n"
        "from pipeline.__main__ import leave\n"
        "atexit.register(print, 'handler ran')\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "logging.getLogger('x').info('logged')\n"
        "print('buffered', end='')\n"
        "leave(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "bufferedhandler ran\n" and "INFO:x:logged" in done.stderr


def test_the_forkserver_leaves_without_unloading_its_modules():
    """A process that imported pipeline.runtime.server_exit (only the workers' forkserver does) ends at its exit
    handlers: those registered before it, and the interpreter's teardown, are skipped."""
    script = "import atexit\natexit.register(print, 'torn down')\nimport pipeline.runtime.server_exit\nprint('bye')\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "bye\n", (done.stdout, done.stderr)


def test_a_wrapped_instantiation_error_reads_as_one_line():
    """Hydra's instantiate wraps what a dataset or method raises; the command shows the project's own message, or
    the wrapped lines joined into one."""
    from hydra.errors import InstantiationException

    from pipeline.__main__ import one_line
    from pipeline.errors import DatasetError

    try:
        try:
            raise DatasetError("/data/val.csv: file not found")
        except DatasetError as cause:
            raise InstantiationException(
                "Error in call to target 'K':\nDatasetError('x')\nfull_key: dataset"
            ) from cause
    except InstantiationException as err:
        assert one_line(err) == "/data/val.csv: file not found"
    bare = InstantiationException("Error in call to target 'x.Y':\nTypeError('bad')\nfull_key: model.net")
    assert one_line(bare) == "Error in call to target 'x.Y': TypeError('bad') (full_key: model.net)"


def test_the_work_goes_on_when_the_console_is_gone(pipeline_overrides, tmp_path):
    """A console that closes (``... | head -1``, a terminal gone) costs only what the command would have printed:
    the run finishes and exits 0. (When a progress bar's write failed, tqdm kept its lock, and the next update of
    the bar, from the thread that follows the shards' events, waited for it for ever.)"""
    overrides = [*pipeline_overrides, "execution=cluster", "run_name=headless", "stage=[index,extract]"]
    proc = subprocess.Popen(
        **_command(overrides, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout.readline()  # the first line, as `| head -1` reads it; then the reader is gone
        proc.stdout.close()
        assert proc.wait(timeout=240) == 0
    finally:
        proc.kill()
    run_dir = tmp_path / "outputs" / "headless"
    index, _ = read_index(run_dir)
    assert sorted(read_tubes(run_dir, columns=["clip_id"])["clip_id"]) == sorted(index["clip_id"])
