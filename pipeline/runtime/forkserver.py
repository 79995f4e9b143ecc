"""The forkserver that local Dask workers fork from: what it imports, and starting it early.

One server process imports :data:`PRELOAD` once (torch, Lightning and what they pull in: 5-7 s of a core) and
every worker forks from it, instead of each spawned worker importing them again. That import is the longest part
of a short extract's start, so the command line starts the server at its first line (:func:`start_early`),
on the core the driver leaves idle while it imports Hydra and Dask and checks the settings (about 1.2 s), when
its arguments say it most likely runs an extract on local workers. Once the settings are known, the cluster
either claims the server (:func:`start`) or the command stops it (:func:`release`): a wrong guess costs the
server's CPU until then, on a core nothing else used.

This module imports nothing but the standard library: the command line imports it before anything else.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from multiprocessing import forkserver

#: what the forkserver imports once, so that every worker forked from it starts with them imported
#: (``server_exit``: the server leaves at once when the driver has gone)
PRELOAD = (
    "distributed",
    "numpy",
    "pandas",
    "torch",
    "pytorch_lightning",
    "pipeline.runtime.shard",
    "pipeline.runtime.server_exit",
)

_state = {"early": False, "claimed": False}


@contextlib.contextmanager
def children_ignore_sigint():
    """Processes started in the block (local Dask workers, their forkserver) ignore SIGINT: Ctrl-C reaches the
    terminal's whole process group, and only the driver should act on it (it stops the stage and closes the
    cluster, which ends the workers) instead of every worker printing its own KeyboardInterrupt. An ignored
    signal stays ignored across ``exec``; the driver's own handler is restored at the end of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ensure_running() -> None:
    """The server, started now if it is not running: it returns at once, the server importing meanwhile."""
    with children_ignore_sigint():
        forkserver.set_forkserver_preload(list(PRELOAD))
        forkserver.ensure_running()


def start() -> None:
    """Start the server for local workers about to be made, or claim the one :func:`start_early` started."""
    _state["claimed"] = True
    _ensure_running()


#: Hydra's options that say where the config comes from, not what kind of command it is (each takes a value)
CONFIG_OPTIONS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def likely_wanted(args: list[str]) -> bool:
    """Whether a command line (``key=value`` overrides) most likely starts with an extract on local workers: its
    first stage is ``extract`` on the default (local) cluster, not in the driver (``execution=driver``) nor as one
    DDP job (``trainer.strategy=ddp...``), and no Hydra option other than :data:`CONFIG_OPTIONS` (such as
    ``--cfg``, ``--help`` or ``-m``) makes it another kind of command. The settings then decide (:func:`release`)."""
    overrides, value_next = [], False
    for arg in args:
        if value_next:
            value_next = False
        elif arg.split("=", 1)[0] in CONFIG_OPTIONS:
            value_next = "=" not in arg
        elif arg.startswith("-"):
            return False
        else:
            overrides.append(arg)
    values = dict(arg.lstrip("+").split("=", 1) for arg in overrides if "=" in arg)
    first = values.get("stage", "").strip("[] ").split(",")[0].strip()
    return (
        first == "extract"
        and values.get("cluster", "local") == "local"
        and values.get("execution") != "driver"
        and not values.get("trainer.strategy", "").startswith("ddp")
    )


def start_early(args: list[str]) -> None:
    """Start the server now if the command line :func:`likely_wanted` it; stopped at exit unless claimed."""
    if likely_wanted(args):
        _state["early"] = True
        atexit.register(release)
        _ensure_running()


def started_early() -> bool:
    """Whether :func:`start_early` started the server and it has not been released: the workers' imports are
    under way, or done, before the cluster is even asked for (``execution=auto`` then counts them as paid)."""
    return _state["early"]


def release() -> None:
    """Stop the server :func:`start_early` started when the cluster did not claim it (the settings chose another
    cluster, the driver's own threads, DDP, or failed): it is killed mid-import, at once."""
    if not _state["early"] or _state["claimed"]:
        return
    _state["early"] = False
    server = forkserver._forkserver  # the standard library's one server; its pid is not public
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    server._stop()  # reaps it and forgets it: a later cluster of this process starts a new one
