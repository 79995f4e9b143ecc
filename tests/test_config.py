"""Config composition: every group option builds what it names, and bad values fail with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers.config import CONF_DIR, make_cfg
from pipeline.__main__ import run, stages_of
from pipeline.data.sampling import CenterSampler, UniformSampler
from pipeline.errors import ConfigError
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.methods import CAM, GradCAM
from pipeline.models import build_model

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_demo(tmp_path):
    cfg = make_cfg(tmp_path)
    assert cfg.stage == "all" and cfg.run_name == "demo"
    assert cfg.paths.run_dir == f"{tmp_path}/outputs/demo"
    assert isinstance(instantiate(cfg.method), CAM)
    assert isinstance(instantiate(cfg.sampler), CenterSampler)
    assert instantiate(cfg.sampler).clip_len == cfg.model.input.clip_len


@pytest.mark.parametrize("group", ["dataset", "model", "method", "sampler", "cluster"])
def test_every_group_option_composes(tmp_path, group):
    for option in sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")):
        cfg = make_cfg(tmp_path, [f"{group}={option}"])
        assert group in cfg


def test_method_and_sampler_options(tmp_path):
    assert isinstance(instantiate(make_cfg(tmp_path, ["method=gradcam"]).method), GradCAM)
    sampler = instantiate(make_cfg(tmp_path, ["sampler=uniform", "sampler.num_clips=4"]).sampler)
    assert isinstance(sampler, UniformSampler) and sampler.num_clips == 4


def test_a_users_own_model_from_config(tmp_path):
    """model=custom with torchvision's r3d_18 (random weights saved as a local checkpoint)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    torch.save(torchvision.models.video.r3d_18(num_classes=3).state_dict(), tmp_path / "r3d.pt")
    cfg = make_cfg(
        tmp_path,
        [
            "model=custom",
            "model.net._target_=torchvision.models.video.r3d_18",
            "+model.net.num_classes=3",
            f"model.checkpoint={tmp_path / 'r3d.pt'}",
            "model.input.clip_len=4",
            "model.input.size=[32,32]",
        ],
    )
    net = build_model(cfg.model)
    explainer = TubeExplainer(net, CAM(), (3, 4, 32, 32))
    assert explainer.layer_name == "layer4" and explainer.classifier_name == "fc"
    out = explainer(torch.randn(2, 3, 4, 32, 32), lambda logits: logits.argmax(1, keepdim=True))
    assert out.tubes.shape == (2, 1, 1, 2, 2)


def test_unknown_stage_is_named():
    with pytest.raises(ValueError, match="unknown stage 'extrct'"):
        stages_of("extrct")
    assert stages_of("all") == ["index", "extract", "stats", "report"]
    assert stages_of(["stats", "report"]) == ["stats", "report"]


def test_cli_runs_a_stage_and_saves_its_config(tmp_path, synthetic_root):
    """The real command line: index a dataset, then a typo in a group option fails with Hydra's message."""
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "stage=index",
        f"paths.root={tmp_path}",
        f"dataset.root={synthetic_root}",
        "dataset.generate_if_missing=false",
        "cluster.n_workers=1",
        "cluster.processes=false",
    ]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "outputs" / "demo"
    assert (run_dir / "index.parquet").is_file()
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.dataset.root == str(synthetic_root) and saved.stage == "index"

    bad = subprocess.run(args + ["method=gradcamm"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "method=gradcamm: no such option; did you mean method=gradcam?" in bad.stdout

    # a command rejected by validation changes nothing in the run: not config.yaml, not configs/, no log line
    kept = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for override, why in (
        ("store.codec=float8", "store.codec=float8: not allowed; store.codec takes float16 | float32"),
        ("run_name=../escape", "run_name='../escape': a run name is one folder name"),
    ):
        rejected = subprocess.run(
            [*args[:3], "stage=extract", *args[4:], override], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        lines = [line for line in (rejected.stdout + rejected.stderr).splitlines() if line.strip()]
        assert rejected.returncode == 2 and len(lines) == 1 and why in lines[0], rejected.stdout + rejected.stderr
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # nothing beside outputs/ (no escape/)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["demo"]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", ".hidden", "", "a b", "/abs", "x/../../y"])
def test_a_run_name_is_one_plain_folder_name(tmp_path, name):
    """A run stays inside outputs/: a name with a separator or '..' is refused before anything is written."""
    with pytest.raises(ConfigError, match="a run name is one folder name"):
        run(make_cfg(tmp_path, ["stage=report", f"run_name='{name}'"]))
    assert list(tmp_path.iterdir()) == []


def test_plain_run_names_are_accepted(tmp_path):
    from pipeline.run_folder import check_run_name

    for name in ("demo", "demo-grad_2.1", "R3D.v2", "x..y", "_tmp"):
        check_run_name(name)
