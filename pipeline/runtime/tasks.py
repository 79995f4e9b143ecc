"""The one loop that runs tasks on a Dask cluster: submit them all, then follow each as it ends.

Probing, extract and evaluate all run through :func:`follow`; the caller keeps its own bookkeeping (progress
bar, ledger, failure rows) in the loop body. It imports nothing of the project, so any layer may use it.
"""

from __future__ import annotations

import importlib
import traceback
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping

from dask.distributed import as_completed


def follow(
    client,
    fn: Callable,
    jobs: Mapping[Hashable, tuple],
    *,
    name: str = "task",
    resources: dict | None = None,
) -> Iterator[tuple[Hashable, object, BaseException | None]]:
    """Run ``fn(*args)`` for every ``key: args`` of ``jobs``; yield ``(key, result, error)`` as each task ends.

    Args:
        client: a Dask client, or None to run the tasks one after the other in this process.
        fn: the task function (picklable).
        jobs: each task's key (for the caller) and arguments.
        name: prefix of the Dask task keys (shown on the dashboard).
        resources: Dask resources each task needs (e.g. ``{"GPU": 1}``).

    ``error`` is the task's exception (``result`` is then None); its formatted traceback is in its
    ``remote_traceback`` attribute, for the caller's log: an exception of ``fn`` is caught where it runs and
    handed back as a value, so Dask neither retries it nor prints it. A task whose worker died comes back as
    Dask's own error (after ``distributed.scheduler.allowed-failures`` reruns). Tasks not yet finished are
    cancelled when the caller stops iterating (an error it raises, Ctrl-C), so nothing runs on after the loop.
    """
    if not jobs:  # nothing to run: no cluster needed (a lazy client stays unstarted)
        return
    if client is None:
        for key, args in jobs.items():
            yield (key, *_unpack(_call(fn, *args)))
        return
    futures = {
        client.submit(_call, fn, *args, key=f"{name}-{uuid.uuid4().hex[:12]}", pure=False, resources=resources): key
        for key, args in jobs.items()
    }
    try:
        for future in as_completed(futures):
            if future.status == "finished":
                yield (futures[future], *_unpack(future.result()))
            else:
                error = future.exception()
                error.remote_traceback = f"{type(error).__name__}: {error}"
                yield futures[future], None, error
    finally:
        client.cancel(list(futures))


class Task:
    """A task function named by module and attribute, imported where it runs: the driver of a Dask run never
    imports what the task needs (torch, Lightning: seconds of CPU, taken from the workers on a small machine).

    Example:
        >>> Task("os.path", "join")("a", "b")
        'a/b'
    """

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        return getattr(importlib.import_module(self.module), self.name)(*args)


class _Raised:
    """An exception raised by a task, carried back as its result with the traceback as text."""

    def __init__(self, error: Exception):
        self.error, self.text = error, "".join(traceback.format_exception(error))


def _call(fn: Callable, *args):
    try:
        return fn(*args)
    except Exception as err:
        return _Raised(err)


def _unpack(outcome) -> tuple[object, BaseException | None]:
    if isinstance(outcome, _Raised):
        outcome.error.remote_traceback = outcome.text
        return None, outcome.error
    return outcome, None
