"""What every stage returns: :class:`StageResult`. The command's summary and exit status read it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    """How a stage ended.

    Args:
        stage: its name.
        left: set when the stage did not finish its work: what is left and how to go on (the command then exits
            with status 2, and later stages do not run).
        shards, skipped, failed_shards: a sharded stage's shards (of this driver's share), those found finished,
            those that failed after their retries in this run.
        rows, clips: what the stage's outputs hold (tube rows, clips).
        failures: failure rows of the stage by reason (``error_type``).
        figures: the stage's headline numbers by name (accuracy, AUCs, ...), for the summary and for callers.
    """

    stage: str
    left: str | None = None
    shards: int = 0
    skipped: int = 0
    failed_shards: list[int] = field(default_factory=list)
    rows: int = 0
    clips: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
