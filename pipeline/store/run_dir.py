"""Every path of a run folder, ``outputs/<run_name>/``: the one place that spells them.

    index.parquet                      clips (stage=index); probes.parquet: its probe cache
    tubes/part-NNNNN[-rankR].parquet   the tubes of one shard (one part per Lightning DDP rank)
    evaluate/part-NNNNN.parquet        faithfulness per clip of one shard (stage=evaluate)
    failures/index.parquet             entries that gave no clip
    failures/part-NNNNN[-rankR].parquet, failures/evaluate-NNNNN.parquet
                                       clips of one shard that failed in extract, in evaluate
    logs/shard-NNNNN.log, logs/evaluate-NNNNN.log
                                       every attempt of one shard's task
    ledger/<stage>/*.jsonl             finished and failed shards (:mod:`pipeline.store.ledger`)
    stats/*.parquet, report/index.html, config.yaml, configs/, tubes_config.yaml, pipeline.log

Example:
    >>> run = RunDir("outputs/demo")
    >>> run.part("extract", 3).as_posix(), run.failure_part("evaluate", 3).name, run.shard_log("extract", 3).name
    ('outputs/demo/tubes/part-00003.parquet', 'evaluate-00003.parquet', 'shard-00003.log')
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: per sharded stage: its parts' folder, and the prefix of its failure parts and logs
_SHARDED = {"extract": ("tubes", "part", "shard"), "evaluate": ("evaluate", "evaluate", "evaluate")}
_PART = re.compile(r"part-(\d{5,})(?:-rank(\d+))?\.parquet")


def part_name(shard: int, rank: int | None = None) -> str:
    """``part-NNNNN.parquet``, or ``part-NNNNN-rankR.parquet`` for one rank's share of a shard (Lightning DDP)."""
    return f"part-{shard:05d}.parquet" if rank is None else f"part-{shard:05d}-rank{rank}.parquet"


def shard_of(name: str) -> int | None:
    """The shard a part file (or its temporary file) belongs to, from its name; None for other files."""
    match = _PART.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder. ``RunDir(path)``; ``os.fspath(run)`` is the folder itself."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root.root if isinstance(root, RunDir) else root))

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def name(self) -> str:
        return self.root.name

    # what the stages write
    @property
    def index(self) -> Path:
        return self.root / "index.parquet"

    @property
    def probe_cache(self) -> Path:
        return self.root / "probes.parquet"

    @property
    def tubes(self) -> Path:
        return self.root / "tubes"

    @property
    def failures(self) -> Path:
        return self.root / "failures"

    @property
    def index_failures(self) -> Path:
        return self.failures / "index.parquet"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    def table(self, name: str) -> Path:
        """A statistics table: ``stats/<name>.parquet`` (per_class, overall, faithfulness, ...)."""
        return self.stats / f"{name}.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_page(self) -> Path:
        return self.report / "index.html"

    # what every command keeps
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def tubes_config(self) -> Path:
        return self.root / "tubes_config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "pipeline.log"

    # the sharded stages
    def parts_folder(self, stage: str) -> Path:
        return self.root / _SHARDED[stage][0]

    def part(self, stage: str, shard: int, rank: int | None = None) -> Path:
        return self.parts_folder(stage) / part_name(shard, rank)

    def failure_part(self, stage: str, shard: int, rank: int | None = None) -> Path:
        prefix = _SHARDED[stage][1]
        return self.failures / (part_name(shard, rank) if prefix == "part" else f"{prefix}-{shard:05d}.parquet")

    def failure_parts(self, stage: str, shard: int) -> list[Path]:
        prefix = _SHARDED[stage][1]
        if prefix != "part":
            return [p for p in [self.failure_part(stage, shard)] if p.is_file()]
        return _shard_files(self.failures, shard)

    def parts(self, stage: str, shard: int) -> list[Path]:
        """The published part files of one shard (one, or one per DDP rank)."""
        return _shard_files(self.parts_folder(stage), shard)

    def failure_shard(self, stage: str, name: str) -> int | None:
        """The shard a file name of ``failures/`` is a failure part of, for ``stage``; None for other files."""
        prefix = _SHARDED[stage][1]
        match = re.fullmatch(rf"{prefix}-(\d{{5,}})(?:-rank\d+)?\.parquet", name)
        return int(match.group(1)) if match and (prefix == "part" or "-rank" not in name) else None

    def shard_log(self, stage: str, shard: int) -> Path:
        return self.logs / f"{_SHARDED[stage][2]}-{shard:05d}.log"

    def stale(self, folder: Path) -> Path:
        """Where files set aside from ``folder`` go (never deleted; readers never see them)."""
        return folder / ".stale"

    def ledger(self, stage: str) -> Path:
        return self.root / "ledger" / stage

    def lock(self, stage: str, share: str | None = None) -> Path:
        """The driver lock of a stage (``share``: of one share of a SLURM array)."""
        return self.root / f".{stage}.lock" if share is None else self.root / f".{stage}-{share}.lock"


def _shard_files(folder: Path, shard: int) -> list[Path]:
    return sorted(Path(folder).glob(f"part-{shard:05d}.parquet")) + sorted(
        Path(folder).glob(f"part-{shard:05d}-rank*.parquet")
    )
