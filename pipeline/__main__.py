"""Command line: ``python -m pipeline stage=<index|extract|stats|evaluate|report|all|train|demo> [overrides]``.

Each stage reads the previous stage's files in ``outputs/<run_name>/`` and nothing else. The resolved
configuration of the latest invocation is saved as ``outputs/<run_name>/config.yaml``, and every invocation's
in ``outputs/<run_name>/configs/``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline.errors import ConfigError, UserError
from pipeline.runtime import cluster
from pipeline.runtime.cluster import open_client
from pipeline.stages import evaluate, extract, index, report, stats, summary, train

log = logging.getLogger("pipeline")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning's own use of a deprecated torch API

STAGES = {"train": train, "index": index, "extract": extract, "stats": stats, "evaluate": evaluate, "report": report}
SEQUENCES = {
    "all": ["index", "extract", "stats", "report"],
    "demo": ["train", "index", "extract", "stats", "evaluate", "report"],
}
NEEDS_CLUSTER = {"index", "extract", "evaluate"}
#: errors the user can fix: printed as one line (exit 2). Anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, InstantiationException, MissingMandatoryValue)


def stages_of(stage) -> list[str]:
    names = SEQUENCES.get(stage, [stage]) if isinstance(stage, str) else list(stage)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(
            f"stage={stage!r}: unknown stage {unknown[0]!r}; choose from {sorted(STAGES) + sorted(SEQUENCES)}"
        )
    return names


def run(cfg: DictConfig) -> dict:
    """Run the configured stage(s); returns what each stage reported."""
    names = stages_of(cfg.stage)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(resolved)
    (run_dir / "configs").mkdir(exist_ok=True)  # every invocation's config is kept (once: not by DDP's extra ranks)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        stamp = datetime.now(timezone.utc).strftime(
            "%Y%m%dT%H%M%S.%f"
        )  # microseconds: one process may run stages twice a second
        (run_dir / "configs" / f"{stamp}-{os.getpid()}-{'-'.join(names)}.yaml").write_text(resolved)
    started = time.perf_counter()
    results: dict = {}
    if NEEDS_CLUSTER & set(names):
        cluster.validate(cfg.cluster)
    for i, name in enumerate(names):  # check every stage's settings before any work starts
        if hasattr(STAGES[name], "validate"):
            STAGES[name].validate(cfg, upstream=tuple(names[:i]))

    def run_stages(client=None):
        for name in names:
            t0 = time.perf_counter()
            results[name] = STAGES[name].run(cfg, run_dir, client=client)
            log.info("stage %s done in %.1f s", name, time.perf_counter() - t0)

    if NEEDS_CLUSTER & set(names) and not (names == ["extract"] and extract.uses_ddp(cfg)):
        with open_client(cfg.cluster) as client:
            run_stages(client)
    else:
        run_stages()
    results["seconds"] = time.perf_counter() - started
    if cfg.stage in SEQUENCES or "stats" in names:
        summary.show(run_dir, results)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        OmegaConf.resolve(cfg)
        run(cfg)
    except USER_ERRORS as err:  # a bad setting or input: one clear line, no traceback
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
