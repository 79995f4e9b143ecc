"""One extract driver per run directory: a second one waits for the first or refuses, never computes twice.

The lock is an advisory ``flock`` on ``outputs/<run>/.extract.lock``, held by the driver process for the whole
stage (SLURM array shares hold it shared, and each its own ``.extract-share-I-of-N.lock`` alone). The kernel releases it when that process ends in any way (exit, exception, SIGKILL, a lost node's
process being killed), so a killed run never leaves a lock behind: the file itself stays and means nothing.
The holder writes its host and pid into the file so that the one waiting can say whom it waits for.

``extract.concurrent`` chooses what a second driver does: ``wait`` (default; when the first is done the second
finds every shard finished and skips it, or resumes what a killed first one left) or ``refuse`` (one line,
exit code 2). Network file systems: ``flock`` on NFS v4 and Lustre is forwarded to the server; on file systems
that do not support it the lock cannot be taken and the stage says so in one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from pipeline.errors import ConfigError, UserError
from pipeline.store.run_dir import RunDir

log = logging.getLogger(__name__)

LOCK_NAME = RunDir(".").lock("extract").name
#: what a second driver on a locked run directory may do
POLICIES = ("wait", "refuse")


class RunDirectoryBusy(UserError):
    """Another extract driver is processing this run directory (``extract.concurrent=refuse``)."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def run_lock(run_dir, policy: str = "wait", share: str | None = None, poll_s: float = 0.5):
    """Hold the run directory's extract lock for the duration of the ``with`` block.

    Args:
        run_dir: ``outputs/<run_name>``.
        policy: ``wait`` for the holder to finish (logged once, with the holder), or ``refuse`` at once.
        share: a SLURM array share's name: the driver holds the run's lock shared with the other shares' drivers
            and its share's lock alone (a driver of every shard holds the run's lock alone).
        poll_s: how often a waiting driver retries (a non-blocking attempt, so Ctrl-C stays responsive).

    Raises:
        RunDirectoryBusy: ``policy=refuse`` and another driver holds the lock.
        ConfigError: an unknown policy, or a file system that offers no locks.
    """
    if policy not in POLICIES:
        raise ConfigError(f"extract.concurrent must be one of {POLICIES}, got {policy!r}")
    run = RunDir(run_dir)
    with contextlib.ExitStack() as held:
        held.enter_context(_flock(run.lock("extract"), policy, poll_s, run, shared=share is not None))
        if share is not None:
            held.enter_context(_flock(run.lock("extract", share), policy, poll_s, run, shared=False))
        yield run.lock("extract", share)


@contextlib.contextmanager
def _flock(path: Path, policy: str, poll_s: float, run: RunDir, shared: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = None
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(
                        f"{path}: cannot lock the run directory ({err.strerror}); its file system offers no flock"
                    ) from None
            if policy == "refuse":
                raise RunDirectoryBusy(
                    f"{run.root} is being extracted by {_holder(path)}; wait for it, or rerun with "
                    "extract.concurrent=wait (finished shards are never recomputed)"
                )
            if waited is None:
                waited = time.monotonic()
                log.warning("%s is being extracted by %s: waiting for it to finish", run.root, _holder(path))
            time.sleep(poll_s)
        if waited is not None:
            log.info("lock on %s acquired after %.1f s", run.root, time.monotonic() - waited)
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock (the kernel does the same if the process dies)
