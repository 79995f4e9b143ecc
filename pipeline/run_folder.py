"""A run's folder, ``outputs/<run_name>/``: its name, and what every command keeps in it (the resolved
configuration in ``config.yaml`` and ``configs/``, the log in ``pipeline.log``).

Nothing here writes before the command was validated: a rejected command leaves no folder and no file behind.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError
from pipeline.store.files import atomic_write
from pipeline.store.run_dir import RunDir

#: one plain folder name: letters, digits, '-', '_' and '.', not starting with '.'
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def check_run_name(name) -> None:
    """Raise :class:`ConfigError` unless ``name`` is one plain folder name (so a run stays inside ``outputs/``).

    Example:
        >>> check_run_name("demo-grad_2.1")
        >>> check_run_name("../escape")
        Traceback (most recent call last):
        pipeline.errors.ConfigError: run_name='../escape': ...
    """
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"run_name={name!r}: a run name is one folder name of letters, digits, '-', '_' and '.' "
            "(not starting with '.', no '/'): the run lives in outputs/<run_name>/"
        )


@contextmanager
def open_run_folder(cfg: DictConfig, stages: list[str]) -> Iterator[Path]:
    """Create the run folder, save the command's resolved configuration (``config.yaml``: the latest command;
    ``configs/<time>-<pid>-<stages>.yaml``: every command) and log to ``pipeline.log`` while the block runs."""
    run = RunDir(cfg.paths.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    with atomic_write(run.config) as tmp:
        tmp.write_text(resolved)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # once: not by DDP's extra ranks
        run.configs.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")  # one process may run stages twice a second
        (run.configs / f"{stamp}-{os.getpid()}-{'-'.join(stages)}.yaml").write_text(resolved)
    handler = logging.FileHandler(run.log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        yield run.root
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
