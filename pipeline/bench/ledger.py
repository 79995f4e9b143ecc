"""The sharded-stage engine's own cost at 100,000 shards: plan, record every shard, resume after a kill.

No decoding and no model: the shards' work is replaced by a one-byte part file each (what the engine lists and
checks), so the table times the ledger and the planning alone (:mod:`pipeline.runtime.engine`), on this machine's
file system. The steps:

1. plan a fresh run (shard digests of the index, one listing of an empty parts folder);
2. record every shard as finished (one journal line each), its part published (the parts' writing timed apart);
3. kill: the journal's last 1,000 lines lost and the one before cut in the middle;
4. resume: plan again (the 1,001 parts the ledger lost are adopted, every other shard skipped);
5. plan a third time, everything done (the steady cost of a rerun).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from pipeline.runtime.planning import Published, ShardWork, plan, shards_of
from pipeline.store.provenance import rows_digest
from pipeline.store.run_dir import RunDir


def _index(shards: int, clips_per_shard: int) -> pd.DataFrame:
    count = shards * clips_per_shard
    return pd.DataFrame(
        {
            "clip_id": [f"video{i // 4:07d}_clip{i % 4}" for i in range(count)],
            "source": [f"/data/video{i // 4:07d}.mp4" for i in range(count)],
            "frame_indices": [list(range(i % 4 * 16, i % 4 * 16 + 16)) for i in range(count)],
            "shard": [i // clips_per_shard for i in range(count)],
        }
    )


def run(out_dir: Path, quick: bool) -> str:
    shards = 10_000 if quick else 100_000
    clips_per_shard = 4
    root = RunDir(Path(out_dir).resolve() / "ledger-run")
    shutil.rmtree(root.root, ignore_errors=True)
    root.tubes.mkdir(parents=True)
    index = _index(shards, clips_per_shard)
    digests: dict[int, str] = {}
    work = ShardWork(
        stage="extract",
        task=lambda *args: None,
        job=lambda shard: (),
        inspect=lambda parts: Published(digests[int(parts[0].name[5:-8])], rows=clips_per_shard),
    )
    timings = []

    def timed(step: str, fn):
        started = time.perf_counter()
        value = fn()
        timings.append((step, time.perf_counter() - started))
        return value

    table = timed("shard digests of the index", lambda: shards_of(index, rows_digest))
    digests.update({s: shard.digest for s, shard in table.items()})
    first = timed("plan a fresh run", lambda: plan(work, root, table, None, "bench"))

    def publish_all():  # what the tasks do: not the engine's cost, timed apart
        for number in first.todo:
            root.part("extract", number).write_bytes(b"x")

    def record_all():
        for number, shard in first.todo.items():
            first.ledger.finish(number, shard.digest, rows=clips_per_shard, clips=clips_per_shard, bytes=1)
        first.ledger.close()

    timed(f"(the tasks' share: write {shards:,} one-byte parts)", publish_all)
    timed(f"record {shards:,} finished shards (one journal line each)", record_all)
    journal = root.ledger("extract") / "all.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-1001]) + lines[-1001][: len(lines[-1001]) // 2])  # the kill
    resumed = timed("resume after the kill (plan)", lambda: plan(work, root, table, None, "bench"))
    resumed.ledger.close()
    again = timed("plan a finished run", lambda: plan(work, root, table, None, "bench"))
    again.ledger.close()
    assert not first.skipped and resumed.adopted == 1001 and not resumed.todo and again.skipped == shards
    rows = "\n".join(f"| {step} | {seconds:.2f} | {seconds / shards * 1e6:.1f} |" for step, seconds in timings)
    shutil.rmtree(root.root, ignore_errors=True)
    total = sum(seconds for step, seconds in timings if not step.startswith("("))
    return (
        f"## Ledger and planning at {shards:,} shards\n\n"
        f"{shards:,} shards of {clips_per_shard} clips, one-byte parts (no decoding), local disk; "
        f"{resumed.adopted:,} parts adopted on resume. `python -m pipeline.bench ledger`\n\n"
        "| step | s | us per shard |\n|---|---:|---:|\n"
        f"{rows}\n| the engine in all (steps 1-5) | {total:.2f} | {total / shards * 1e6:.1f} |\n"
    )
