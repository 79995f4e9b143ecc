"""Imported by the forkserver that local Dask workers fork from (``forkserver.PRELOAD``) and by nothing else.

When the driver exits, the forkserver leaves at once instead of unloading torch and Lightning module by module
(1.5 s of a core, while it still holds the driver's output pipe, so whoever reads that pipe waits too). The
workers forked from it never run exit handlers (a forked process ends with ``os._exit``).
"""

import atexit
import os
import sys


def _leave() -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


atexit.register(_leave)
