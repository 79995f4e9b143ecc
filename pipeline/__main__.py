"""Command line: ``python -m pipeline stage=<index|extract|stats|evaluate|report|all|train|demo> [overrides]``.

Each stage reads the previous stage's files in ``outputs/<run_name>/`` and nothing else. Every setting is
checked first, against the schema (:mod:`pipeline.settings`: a misspelt key, a value of the wrong type or out of
its allowed values is one line, exit 2, before any work); then the resolved configuration of the latest invocation is saved as
``outputs/<run_name>/config.yaml``, and every invocation's in ``outputs/<run_name>/configs/``
(:mod:`pipeline.run_folder`).
"""

from __future__ import annotations

import sys

from pipeline.runtime import forkserver

if __name__ == "__main__":  # before the imports below: the workers' forkserver imports torch meanwhile
    forkserver.start_early(sys.argv[1:])

import atexit
import contextlib
import importlib
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline import settings
from pipeline.errors import ConfigError, Interrupted, StageFailed, UserError, environment_problem
from pipeline.run_folder import LOG_FORMAT, check_run_name, open_run_folder
from pipeline.runtime import cluster
from pipeline.runtime.cluster import open_client, uses_ddp
from pipeline.runtime.inprocess import cluster_pays_off
from pipeline.settings.schema import OLD_IN_PROCESS

log = logging.getLogger("pipeline")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning's own use of a deprecated torch API

#: the stages, each a module of pipeline.stages, imported when a command runs it: what a stage imports (torch,
#: Lightning: seconds) then overlaps with the start of the cluster
STAGES = ("train", "index", "extract", "stats", "evaluate", "report")
SEQUENCES = {
    "all": ["index", "extract", "stats", "report"],
    "demo": ["train", "index", "extract", "stats", "evaluate", "report"],
}
NEEDS_CLUSTER = {"index", "extract", "evaluate"}
#: errors the user can fix: printed as one line (exit 2). Anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, InstantiationException, MissingMandatoryValue)


def stages_of(setting) -> list[str]:
    names = SEQUENCES.get(setting, [setting]) if isinstance(setting, str) else list(setting)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(
            f"stage={setting!r}: unknown stage {unknown[0]!r}; choose from {sorted(STAGES) + sorted(SEQUENCES)}"
        )
    return names


def stage(name: str):
    """The module of stage ``name``."""
    return importlib.import_module(f"pipeline.stages.{name}")


def run(cfg: DictConfig) -> dict:
    """Run the configured stage(s); returns what each stage reported. Every setting is checked before the run
    folder is created or its ``config.yaml`` touched.

    The stages share one Dask cluster, started when one first uses it. When the first of them is an extract
    that will run on the cluster, it starts in the background once every stage's settings passed
    (``check_settings``), while the stages build and check the model and their inputs (``validate``).
    """
    settings.check(cfg)
    names = stages_of(cfg.stage)
    check_run_name(cfg.run_name)
    if NEEDS_CLUSTER & set(names):
        cluster.validate(cfg.cluster)
    on_dask = bool(NEEDS_CLUSTER & set(names)) and not (names == ["extract"] and uses_ddp(cfg))
    with open_client(cfg.cluster, lazy=True) if on_dask else contextlib.nullcontext() as client:
        for check in ("check_settings", "validate"):  # every stage's settings, then its model and inputs
            if check == "validate":
                if on_dask and names[0] == "extract" and cluster_pays_off(cfg, cfg.paths.run_dir):
                    client.start_soon()
                forkserver.release()  # the server started early, unless the cluster above claimed it
            for i, name in enumerate(names):
                if hasattr(stage(name), check):
                    getattr(stage(name), check)(cfg, upstream=tuple(names[:i]))
        with open_run_folder(cfg, names) as run_dir:
            return run_stages(cfg, names, run_dir, client)


def run_stages(cfg: DictConfig, names: list[str], run_dir: Path, client=None) -> dict:
    """Run the stages in order, on ``client``'s cluster for those that use one."""
    started = time.perf_counter()
    results: dict = {}

    def each_stage(client=None):
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            try:
                results[name] = stage(name).run(cfg, run_dir, client=client)
            except Interrupted:
                raise
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted during stage {name}; rerun the same command to resume") from None
            left = results[name].left
            if left:  # the stage did not finish its work: the command fails, and later stages have nothing to do
                later = f"; not run: {', '.join(names[i + 1 :])}" if names[i + 1 :] else ""
                failed = StageFailed(f"{left}{later}")
                failed.results = results
                raise failed
            log.info("stage %s done in %.1f s", name, time.perf_counter() - t0)

    each_stage(client)
    if cfg.stage in SEQUENCES or "stats" in names:
        stage("summary").show(run_dir, results, time.perf_counter() - started)
    return results


def one_line(err: BaseException) -> str:
    """A user error as one line: a project error that Hydra's ``instantiate`` wrapped (with its repr and a
    ``full_key`` line) is shown as itself; any other wrapped error's lines are joined.

    Example:
        >>> one_line(InstantiationException("Error in call to target 'x.Y':\nValueError('bad')\nfull_key: dataset"))
        "Error in call to target 'x.Y': ValueError('bad') (full_key: dataset)"
    """
    cause = err.__cause__
    if isinstance(err, InstantiationException) and isinstance(cause, UserError):
        return str(cause)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[-1].startswith("full_key:"):
        return " ".join(lines[:-1]) + f" ({lines[-1]})"
    return " ".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_entry(cfg: DictConfig) -> None:
    """The command, once Hydra composed it (see :func:`main`)."""
    _restore_full_error()
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        OmegaConf.resolve(cfg)
        run(cfg)
    except USER_ERRORS as err:  # a bad setting or input, or unfinished work: one clear line, no traceback
        log.error("%s", one_line(err))
        leave(2)
    except OSError as err:  # a full disk, a read-only folder, a file gone: the environment's, not the code's
        problem = environment_problem(err, cfg.paths.run_dir)
        if problem is None:
            raise
        log.error("%s", problem)
        leave(2)
    except KeyboardInterrupt as err:  # the stage has closed its cluster and published nothing half-written
        log.error("%s", err if isinstance(err, Interrupted) else "interrupted; rerun the same command to resume")
        leave(128 + (_SIGNALLED or signal.SIGINT))
    leave(0)


_FULL_ERROR = "HYDRA_FULL_ERROR"
_USERS_FULL_ERROR = os.environ.get(_FULL_ERROR)


def _restore_full_error() -> None:
    """The user's own HYDRA_FULL_ERROR again, for a bug's traceback and for the processes the stages start."""
    if _USERS_FULL_ERROR is None:
        os.environ.pop(_FULL_ERROR, None)
    else:
        os.environ[_FULL_ERROR] = _USERS_FULL_ERROR


class _Console:
    """The command's stdout or stderr, outliving its reader: when the pipe it writes to closes (``... | head``, a
    terminal gone), the run goes on and what it would have printed is dropped (its file descriptor then points at
    ``/dev/null``). A progress bar whose write fails would otherwise keep tqdm's lock, which tqdm releases only
    after a write that returns, and the next update of the bar would wait for it for ever."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline``: Hydra composes the command against the schema; what it refuses while composing (a
    misspelt key, a wrong type, an unknown option) is printed as one line (exit 2) before any work.

    Hydra prints its own composition errors in several lines unless ``HYDRA_FULL_ERROR`` is set, when it raises
    them: it is set while Hydra composes, and the command gets the user's own value back (:func:`hydra_entry`).
    An old ``+key=value`` for a key the schema now has is taken as ``key=value``.
    """
    if sys.stdout is not None and sys.stderr is not None:  # both are None under pythonw
        sys.stdout, sys.stderr = _Console(sys.stdout), _Console(sys.stderr)
    sys.argv[1:] = _plain_overrides(sys.argv[1:] if argv is None else argv)
    os.environ[_FULL_ERROR] = "1"
    try:
        hydra_entry()
    except Exception as err:
        _restore_full_error()
        line = settings.composition_error(err)
        if line is None:
            raise
        record = logging.LogRecord("pipeline", logging.ERROR, __file__, 0, line, None, None)
        sys.stdout.write(logging.Formatter(LOG_FORMAT).format(record) + "\n")
        leave(2)


#: what the per-stage ``<stage>.in_process`` values of earlier versions mean as ``execution``
_OLD_EXECUTION = {"true": "driver", "false": "cluster", "auto": "auto"}


def _plain_overrides(args: list[str]) -> list[str]:
    """``+key=value`` (append) is ``key=value`` for a key the schema declares (the README's ``+model.class_map``);
    an old ``<stage>.in_process=V`` is ``execution=...``, said in one line."""
    out = []
    for arg in args:
        old, _, value = arg.lstrip("+").partition("=")
        if old in OLD_IN_PROCESS and value.lower() in _OLD_EXECUTION:
            arg = f"execution={_OLD_EXECUTION[value.lower()]}"
            record = logging.LogRecord("pipeline", logging.WARNING, __file__, 0, f"{old} is now {arg}", None, None)
            sys.stdout.write(logging.Formatter(LOG_FORMAT).format(record) + "\n")
        key = arg[1:].split("=", 1)[0]
        if arg.startswith("+") and not arg.startswith("++") and "=" in arg and settings.known(key):
            arg = arg[1:]
        out.append(arg)
    return out


def leave(status: int) -> NoReturn:
    """End the command once its work is published: the exit handlers run (Dask's, multiprocessing's), logs and
    streams are flushed, and the process exits without unloading its modules one by one, which costs torch
    and what comes with it 1-1.5 s of a core (a quarter of a small run's wall time)."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


_SIGNALLED: int | None = None


def _interrupt(signum, frame) -> None:
    """Ctrl-C or SIGTERM: stop the stage as Ctrl-C does (KeyboardInterrupt); further signals are ignored while
    it closes its cluster, so that the shutdown itself is not interrupted (SIGKILL still ends it at once)."""
    global _SIGNALLED
    _SIGNALLED = signum
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
