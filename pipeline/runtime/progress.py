"""Per-batch progress of extract shards: sent by each task as a Dask event, shown by the driver as one bar."""

from __future__ import annotations

import threading
from collections.abc import Callable

from dask.distributed import get_worker
from tqdm import tqdm


def reporter(topic: str | None, shard: int) -> Callable[[int], None] | None:
    """What a task calls after each batch with the clips of ``shard`` done so far: a Dask event on ``topic``
    (None outside a Dask worker, or without a topic)."""
    if topic is None:
        return None
    try:
        worker = get_worker()
    except ValueError:
        return None
    return lambda done: worker.log_event(topic, dict(shard=int(shard), done=int(done)))


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
