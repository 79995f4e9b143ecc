"""A run as a SLURM job array, no Dask scheduler: ``make slurm-array ARGS="..." SBATCH="--array=0-31%8 ..."``.

Three jobs, chained with ``--dependency=afterok``: the index (skipped when the run folder has one), the array
(each task runs ``stage=extract extract.share=auto`` in its own process, on the node SLURM gave it: its share of
the shards, ``s mod n == i``), then stats and report. The job scripts are written into the run folder
(``slurm/``), so a task is resubmitted by hand with the same script (``sbatch --array=5 <run>/slurm/extract.sh``)
and keeps its share (the share count is fixed when the array first runs on the folder).

    python -m pipeline.runtime.slurm_array --sbatch "--array=0-31%8 -p gpu --gres=gpu:1" run_name=ucf dataset=ucf101
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pipeline.settings  # noqa: F401  (registers the settings schema Hydra composes with)
from pipeline.errors import ConfigError, UserError
from pipeline.store.run_dir import RunDir

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class ArrayRun:
    """What the array's job scripts need: the run folder, the Hydra overrides and the sbatch options."""

    run_dir: Path
    overrides: list[str]
    sbatch: list[str]
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)

    @property
    def others(self) -> list[str]:
        """The sbatch options of the index and stats jobs: the array's, less ``--array``."""
        return [o for o in self.sbatch if not o.startswith(("--array", "-a"))]

    def script(self, name: str, stage: str, extra: list[str] = ()) -> Path:
        """Write ``slurm/<name>.sh`` (one ``python -m pipeline`` command) and return its path."""
        folder = self.run_dir / "slurm"
        folder.mkdir(parents=True, exist_ok=True)
        array = name == "extract"
        log = RunDir(self.run_dir).logs / (f"slurm-{name}-%A_%a.out" if array else f"slurm-{name}-%j.out")
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [self.python, "-m", "pipeline", f"stage={stage}", *extra, *self.overrides]
        text = "\n".join(
            [
                "#!/usr/bin/env bash",
                f"#SBATCH --job-name=tubes-{name}",
                f"#SBATCH --output={log}",
                "set -euo pipefail",
                f"cd {shlex.quote(str(self.workdir))}",
                f"export PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))}",
                "exec " + " ".join(shlex.quote(c) for c in command),
                "",
            ]
        )
        path = folder / f"{name}.sh"
        path.write_text(text)
        path.chmod(0o755)
        return path


def submit(script: Path, options: list[str], after: str | None = None) -> str:
    """``sbatch`` the script (after job ``after`` succeeded, if given); the job id."""
    dependency = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", *dependency, *options, str(script)], capture_output=True, text=True
        )
    except FileNotFoundError:
        raise UserError("sbatch not found: run this on a SLURM login node (make slurm-up starts one here)") from None
    if done.returncode != 0:
        raise UserError(f"sbatch {script.name}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def run_folder(overrides: list[str]) -> Path:
    """The run folder the overrides name (``paths.run_dir``), relative to this directory as the command's is."""
    from hydra import compose, initialize_config_dir

    root = [] if any(o.startswith("paths.root=") for o in overrides) else [f"paths.root={Path.cwd()}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*root, *overrides])
    return Path(cfg.paths.run_dir)


def launch(overrides: list[str], sbatch: list[str]) -> dict[str, str]:
    """Write the three job scripts and submit them; the job ids by step."""
    if not any(o.startswith(("--array", "-a")) for o in sbatch):
        raise ConfigError(f"SBATCH must hold an --array option (e.g. --array=0-31%8), got {' '.join(sbatch)!r}")
    if any(o.split("=")[0] in ("stage", "extract.share") for o in overrides):
        raise ConfigError("ARGS of make slurm-array set stage and extract.share themselves; leave them out")
    array = ArrayRun(run_folder(overrides), list(overrides), list(sbatch))
    jobs: dict[str, str] = {}
    if not RunDir(array.run_dir).index.is_file():
        jobs["index"] = submit(array.script("index", "index"), array.others)
    extract = array.script("extract", "extract", ["extract.share=auto", "execution=driver"])
    jobs["extract"] = submit(extract, array.sbatch, jobs.get("index"))
    jobs["stats"] = submit(array.script("stats", "[stats,report]"), array.others, jobs["extract"])
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runtime.slurm_array", description=__doc__.split("\n")[0])
    parser.add_argument("--sbatch", default="", help="sbatch options of the array, e.g. '--array=0-31%%8 -p gpu'")
    parser.add_argument("overrides", nargs="*", help="the pipeline's Hydra overrides (as ARGS of make)")
    args = parser.parse_args(argv)
    try:
        jobs = launch(args.overrides, shlex.split(args.sbatch))
    except UserError as err:
        print(f"slurm-array: {err}", file=sys.stderr)
        return 2
    print("submitted: " + ", ".join(f"{step} job {job}" for step, job in jobs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
