"""glibc's memory thresholds in Dask worker processes.

A Dask nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_`` set. Local clusters turn that off
(:data:`MALLOC_TRIM_SETTING`, see :func:`pipeline.runtime.cluster.open_client`); a worker started by another
nanny (a SLURM job, a cluster at an address) undoes it in its first task (:func:`undo_malloc_trim`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

#: what a Dask nanny sets in the environment of the worker process it starts (Dask's default: 65536)
MALLOC_TRIM_SETTING = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def undo_malloc_trim() -> None:
    """Give this process glibc's own memory thresholds back when a Dask nanny started it with
    ``MALLOC_TRIM_THRESHOLD_`` set (a SLURM job's or an address cluster's workers; local workers start without).

    Any explicit threshold turns off glibc's adaptive one, so every clip-sized tensor (0.8 MB at 16x64x64) is
    mapped, faulted in page by page and unmapped again: a clip cost 1.5x the CPU of the same loop in a process
    without it. This sets what the adaptive scheme settles at (blocks up to 32 MiB from the heap, which keeps up
    to 64 MiB free) and drops the variable, so that processes this one starts (DataLoader workers) start clean.
    """
    if os.environ.pop("MALLOC_TRIM_THRESHOLD_", None) is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
