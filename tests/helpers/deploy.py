"""Real deployments for the cluster tests: the one-node SLURM of ``make slurm-up``, and a Dask scheduler with
workers as separate processes (``dask scheduler`` / ``dask worker``, the venv's own executables), and the
pipeline's command line run as a subprocess whose console is checked."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: what a skipped SLURM test says
SLURM_HINT = "no responding SLURM controller on this machine: `make slurm-up` starts a one-node SLURM"
#: console words that mean something went wrong, whatever the run's exit status
NOISE = re.compile(r"Traceback|Warning|WARNING|Error|ERROR")


def slurm_answers() -> str | None:
    """None when ``sbatch`` exists and the controller answers with a usable node, else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch not found"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo: {err}"
    if states.returncode != 0 or not {"idle", "mix", "alloc"} & set(states.stdout.split()):
        return f"sinfo: {(states.stderr or states.stdout).strip() or 'no idle node'}"
    return None


@pytest.fixture(scope="session")
def slurm():
    """The machine's SLURM (skipped, saying how to start it, when none answers)."""
    why = slurm_answers()
    if why:
        pytest.skip(f"{SLURM_HINT} ({why})")


def env() -> dict:
    """The environment of every process the tests start: this checkout's package and the test helpers."""
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
        DASK_DISTRIBUTED__WORKER__DAEMON="False",
        PYTHONUNBUFFERED="1",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DaskDeployment:
    """A scheduler and worker processes on the loopback interface; :meth:`stop` ends every one of them."""

    folder: Path
    port: int = field(default_factory=free_port)
    scheduler: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        return subprocess.Popen(
            [str(BIN / "dask"), *args], stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True
        )

    def start_scheduler(self) -> None:
        self.scheduler = self._start(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--dashboard-address", ":0", "--no-show"],
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"dask scheduler did not listen on {self.address}: see {self.folder / 'scheduler.log'}")

    def start_workers(self, count: int = 1) -> None:
        """``count`` worker processes of one thread each, with no nanny (a killed one stays dead: its shard
        is rerun on another worker, not on a fresh process still importing torch)."""
        for _ in range(count):
            self.workers.append(
                self._start(
                    f"worker-{len(self.workers)}",
                    [
                        "worker",
                        self.address,
                        "--no-nanny",
                        "--nthreads",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--memory-limit",
                        "4GB",
                        "--death-timeout",
                        "30",
                    ],
                )  # fmt: skip
            )

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        from dask.distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(n, timeout=timeout)

    def kill_scheduler(self) -> None:
        _kill_group(self.scheduler)

    def stop(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the process and any it started
    proc.wait(timeout=30)


@pytest.fixture
def dask_deployment(tmp_path):
    """A started ``dask scheduler`` (no workers yet: call ``start_workers``), killed with its workers at teardown."""
    deployment = DaskDeployment(tmp_path / "dask")
    deployment.folder.mkdir()
    deployment.start_scheduler()
    try:
        yield deployment
    finally:
        deployment.stop()


def pipeline(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.Popen:
    """The command line ``python -m pipeline ARGS`` started in ``cwd`` (its console: ``.stdout`` after ``.wait``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for a pipeline command; its exit status and console."""
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(path: Path, timeout: float = 120) -> str:
    """The text of ``path`` once it exists (a held trap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear within {timeout} s")


def shard_attempts(run_dir: Path) -> dict[int, list[str]]:
    """Each shard's attempts, from its log: the worker each ran on."""
    found = {}
    for log in sorted((run_dir / "logs").glob("shard-*.log")):
        shard = int(log.stem.split("-")[1])
        found[shard] = re.findall(r"attempt \d+ of \d+, worker (\S+), pid", log.read_text())
    return found
