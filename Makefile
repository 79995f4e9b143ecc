# Saliency Tubes pipeline. `make demo` and `make test` set everything up on a fresh machine.
# Stage targets take Hydra overrides in ARGS, e.g.  make extract ARGS="run_name=ucf dataset=ucf101 method=gradcam"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# pip says nothing but errors: no version check, no root-user or upgrade notices
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_ROOT_USER_ACTION := ignore
export PIP_NO_WARN_SCRIPT_LOCATION := 1

.PHONY: help install lint demo test test-fast bench index extract stats evaluate report all train clean slurm-up slurm-down slurm-array

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv and install the package with its dev extras

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --upgrade pip
	$(PY) -m pip install --quiet --quiet -e '.[dev]'
	touch $@

demo: install ## synthetic data + demo model (if missing), the whole pipeline, then a summary
	$(PY) -m pipeline stage=demo $(ARGS)

lint: install ## ruff: lint rules and formatting (pyproject.toml)
	$(VENV)/bin/ruff check pipeline tests
	$(VENV)/bin/ruff format --check pipeline tests

test: install lint ## lint, then the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install ## the test suite without the slow end-to-end tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install ## benchmarks (BENCH="name ..." to pick, ARGS=--quick) -> outputs/bench/results.md
	$(PY) -m pipeline.bench $(BENCH) $(ARGS)

train: install ## fit the demo model (model.checkpoint) on the dataset's train split
	$(PY) -m pipeline stage=train $(ARGS)

index: install ## list, probe and shard the dataset -> index.parquet
	$(PY) -m pipeline stage=index $(ARGS)

extract: install ## compute the tubes of every shard on the Dask cluster -> tubes/
	$(PY) -m pipeline stage=extract $(ARGS)

stats: install ## per-class statistics and pointing game -> stats/
	$(PY) -m pipeline stage=stats $(ARGS)

evaluate: install ## faithfulness of the tubes (deletion / insertion vs random, randomisation check, IoU) -> evaluate/
	$(PY) -m pipeline stage=evaluate $(ARGS)

report: install ## the offline HTML report from the Parquet files -> report/index.html
	$(PY) -m pipeline stage=report $(ARGS)

all: install ## index, extract, stats and report in one go
	$(PY) -m pipeline stage=all $(ARGS)

SBATCH ?= --array=0-3
slurm-array: install ## a SLURM job array, no scheduler: index, extract shares (SBATCH="--array=0-31%8 -p gpu ..."), stats + report
	$(PY) -m pipeline.runtime.slurm_array --sbatch="$(SBATCH)" $(ARGS)

slurm-up: ## a one-node SLURM on this machine (munge, slurmctld, slurmd) for the tests marked slurm
	tests/cluster/slurm-up.sh

slurm-down: ## stop the SLURM of make slurm-up
	tests/cluster/slurm-up.sh down

clean: ## delete everything under outputs/ (data, models, runs)
	find outputs -mindepth 1 -maxdepth 1 ! -name .gitkeep -exec rm -rf {} +
