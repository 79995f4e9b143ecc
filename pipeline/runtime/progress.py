"""Progress of extract shards: sent by each task as Dask events (at most two a second), shown by the driver as one bar."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dask.distributed import get_worker
from tqdm import tqdm

#: seconds between two progress events of one task: a 32-clip shard of small clips takes a third of a second, and an
#: event per batch (dozens a second over the workers) cost the driver, the scheduler and the workers' event loops CPU
#: that the workers' tasks could use; the end of a shard is reported by its result, at once
EVERY = 0.5


def reporter(topic: str | None, shard: int) -> Callable[[int], None] | None:
    """What a task calls after each batch with the clips of ``shard`` done so far: a Dask event on ``topic`` at most
    every :data:`EVERY` seconds (None outside a Dask worker, or without a topic)."""
    if topic is None:
        return None
    try:
        worker = get_worker()
    except ValueError:
        return None
    last = [time.monotonic()]

    def report(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= EVERY:
            last[0] = now
            worker.log_event(topic, dict(shard=int(shard), done=int(done)))

    return report


class ShardProgress:
    """The one progress bar of the stage: clips handled over all workers, fed by the shards' batch events; the
    clips that failed (failure rows, or a failed shard's clips) show apart as ``failed=N``."""

    def __init__(self, bar: tqdm):
        self.bar, self.done, self.ended, self.lock = bar, {}, set(), threading.Lock()
        self.failed = 0

    def add_failed(self, clips: int) -> None:
        """Count ``clips`` more failed clips of an ended shard."""
        if clips:
            with self.lock:
                self.failed += clips
                self.bar.set_postfix(failed=self.failed)

    def set(self, shard: int, done: int, end: bool = False) -> None:
        """``done`` clips of ``shard`` handled so far (a retried shard starts again from 0); after ``end``, a
        late event of the shard changes nothing."""
        with self.lock:
            if shard in self.ended:
                return
            self.bar.update(done - self.done.get(shard, 0))
            self.done[shard] = done
            if end:
                self.ended.add(shard)

    def on_event(self, event) -> None:
        _, msg = event
        self.set(msg["shard"], msg["done"])
