"""The settings schema: composition with the schema, one line per bad value or misspelt key, --help from the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers.config import make_cfg
from pipeline import settings
from pipeline.errors import ConfigError
from pipeline.explain.faithfulness import BASELINES
from pipeline.explain.fusion import RULES
from pipeline.runtime.job import TARGET_MODES
from pipeline.runtime.lock import POLICIES
from pipeline.settings.groups import COMBINE, FusionSettings, ModelSettings
from pipeline.settings.schema import Evaluate, Extract, Settings
from pipeline.store.provenance import fingerprint
from pipeline.store.schema import CODECS

REPO = Path(__file__).resolve().parents[1]


def test_the_schema_is_the_base_of_every_command(tmp_path):
    cfg = make_cfg(tmp_path, ["method=fusion"])
    assert OmegaConf.get_type(cfg) is Settings and OmegaConf.get_type(cfg.extract) is Extract
    assert OmegaConf.get_type(cfg.method) is FusionSettings and OmegaConf.get_type(cfg.model) is ModelSettings
    assert cfg.extract.batch_size == 8 and cfg.model.init_seed == 0 and cfg.method.combine == "weighted"
    settings.check(cfg)


def test_allowed_values_match_the_code():
    spec = {f.name: f.metadata for f in __import__("dataclasses").fields(Evaluate)}
    assert set(spec["baseline"]["choices"]) == set(BASELINES)
    extract = {f.name: f.metadata for f in __import__("dataclasses").fields(Extract)}
    assert set(extract["concurrent"]["choices"]) == set(POLICIES)
    assert set(COMBINE) == set(RULES)
    fields = {f.name: f for f in __import__("dataclasses").fields(Settings)}
    assert fields["target"].default_factory().mode in TARGET_MODES and set(CODECS) == {"float16", "float32"}


@pytest.mark.parametrize(
    "override, line",
    [
        ("extract.batch_size=0", "extract.batch_size=0: not allowed; extract.batch_size takes an integer >= 1"),
        ("execution=maybe", "execution=maybe: not allowed; execution takes auto | driver | cluster"),
        (
            "evaluate.iou_level=1.5",
            "evaluate.iou_level=1.5: not allowed; evaluate.iou_level takes a number > 0.0 and <= 1.0",
        ),
    ],
)
def test_a_bad_value_names_the_setting_and_the_allowed_values(tmp_path, override, line):
    with pytest.raises(ConfigError) as err:
        settings.check(make_cfg(tmp_path, [override]))
    assert str(err.value) == line


def test_settings_at_their_neutral_value_keep_the_demo_fingerprint(tmp_path):
    cfg = make_cfg(tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("init_seed", "class_map", "output", "grid", "token_order"):
        del plain["model"][key]
    del plain["model"]["input"]["layout"], plain["model"]["input"]["pathways"]
    assert fingerprint(cfg) == fingerprint(plain)  # the config as the demo spelt it before the schema
    assert fingerprint(make_cfg(tmp_path, ["model.init_seed=1"])) != fingerprint(cfg)


def _cli(tmp_path, *args):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", f"paths.root={tmp_path}", "run_name=t", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize(
    "args, says",
    [
        (["extract.batch_sise=4"], "extract.batch_sise: no such setting; did you mean extract.batch_size?"),
        (["dataset.rooot=/x"], "dataset.rooot: no such setting; did you mean dataset.root?"),
        (["extract.batch_size=abc"], "extract.batch_size=abc: not allowed; extract.batch_size takes an integer >= 1"),
        (
            ["method=fusionn"],
            "method=fusionn: no such option; did you mean method=fusion? (options: cam, fusion, gradcam, gradcampp, gradrollout, layercam, rollout, scorecam, xgradcam)",
        ),
        (
            ["stage=index", "method=fusion", "method.combine=prod"],
            "method.combine=prod: not allowed; method.combine takes weighted | product | mean | max",
        ),
        (
            ["stage=extract", "method.combine=prod"],
            "method.combine: no such setting of this method option; it is a setting of method=fusion and takes weighted | product | mean | max (e.g. method=fusion method.combine=...)",
        ),
    ],
)
def test_the_command_line_says_one_line_before_any_work(tmp_path, args, says):
    status, lines = _cli(tmp_path, *args)
    assert status == 2 and len(lines) == 1 and lines[0].endswith(says), lines
    assert "[pipeline][ERROR]" in lines[0]
    assert not (tmp_path / "outputs" / "t").exists()  # no run folder, nothing written


def test_help_lists_the_settings_with_their_docs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0
    assert "extract.batch_size = 8: clips per forward pass [an integer >= 1]" in done.stdout
    assert "model.init_seed = 0:" in done.stdout and "method.combine = weighted:" in done.stdout
    assert "paths.root = ${hydra:runtime.cwd}" in done.stdout
