"""A model's own class set: names from config, torchvision's metadata or an HF config; labels mapped onto them;
end to end through the real stages with a Kinetics-400 model on datasets of other classes, on a manifest
without labels, and on a 2-class manifest under a 4-class model."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from helpers.config import make_cfg
from helpers.layouts import barcode_frames, make_epic100_annotations, make_epic_media
from pipeline.__main__ import run
from pipeline.data.video import write_video
from pipeline.errors import ConfigError, ModelError
from pipeline.models.classes import label_mapping, map_labels, model_class_names
from pipeline.stages import extract, summary
from pipeline.store import read_failures, read_index, read_tubes

KINETICS_FIRST = ["abseiling", "air drumming", "answering questions"]


# ------------------------------------------------------------------------------------------------ names
def test_class_names_from_each_source(tmp_path):
    net = torch.nn.Linear(2, 2)
    kinetics = model_class_names("kinetics400", net, 400)
    assert len(kinetics) == 400 and kinetics[:3] == KINETICS_FIRST and len(set(kinetics)) == 400
    (tmp_path / "names.txt").write_text("jump\nrun\n\n")
    assert model_class_names(str(tmp_path / "names.txt"), net, 2) == ["jump", "run"]
    assert model_class_names(["a", "b"], net, 2) == ["a", "b"]
    assert model_class_names(None, net, 3) == ["class 0", "class 1", "class 2"]
    assert model_class_names("dataset", net, 2, ["x", "y"]) == ["x", "y"]
    net.config = type("Config", (), {"id2label": {1: "run", 0: "walk"}})()
    assert model_class_names(None, net, 2) == ["walk", "run"]


@pytest.mark.parametrize(
    "setting, logits, message",
    [
        ("kinetics400", 101, r"model.classes=kinetics400 has 400 class names but Linear returns 101 logits"),
        ("/nowhere/names.txt", 2, r"model.classes: /nowhere/names.txt is neither a file"),
        (["a"], 2, r"model.classes has 1 class names but Linear returns 2 logits"),
        ("dataset", 4, r"model.classes=dataset .* has 2 class names but Linear returns 4 logits"),
    ],
)
def test_class_names_that_do_not_fit_the_logits(setting, logits, message):
    with pytest.raises(ModelError, match=message):
        model_class_names(setting, torch.nn.Linear(2, 2), logits, ["x", "y"])


def test_logits_as_many_as_the_datasets_classes_suggest_model_classes_dataset():
    with pytest.raises(ModelError, match=r"the dataset has 2 classes too: .* set model.classes=dataset, else set"):
        model_class_names("kinetics400", torch.nn.Linear(2, 2), 2, ["x", "y"])
    with pytest.raises(ModelError) as err:  # a count that differs from the dataset's: no such hint
        model_class_names("kinetics400", torch.nn.Linear(2, 2), 3, ["x", "y"])
    assert "model.classes=dataset" not in str(err.value)


def test_labels_map_by_name_or_class_map():
    mapping = label_mapping(["jump", "run", "swim"], ["run", "walk", "jump"], {"swim": "walk"})
    assert mapping.tolist() == [2, 0, 1]
    assert label_mapping(["jump", "fly"], ["run", "jump"], {"fly": 0}).tolist() == [1, 0]
    assert label_mapping(["jump", "fly"], ["run", "walk"]).tolist() == [-1, -1]
    labels = pd.array([0, None, 1, 7], dtype="Int32")
    assert map_labels(labels, np.array([5, -1])).tolist() == [5, -1, -1, -1]
    with pytest.raises(ConfigError, match="model.class_map: 'dive' is not a class of the dataset"):
        label_mapping(["jump"], ["run"], {"dive": "run"})
    with pytest.raises(ConfigError, match="model.class_map: 'jump' -> 'fly' is not a class of the model"):
        label_mapping(["jump"], ["run"], {"jump": "fly"})


# ------------------------------------------------------------------------------------------------ end to end
R3D_SMALL = [
    "model=r3d_18",
    "model.input.clip_len=4",
    "model.input.size=[32,32]",
    "model.input.short_side=32",
    "index.clips_per_shard=4",
    "extract.batch_size=4",
    "cluster.n_workers=1",
    "report.clips_per_class=1",
]


def printed_summary(run_dir) -> str:
    out = io.StringIO()
    summary.show(run_dir, {}, 0.0, Console(file=out, width=200))
    return out.getvalue()


def assert_every_clip_explained(run_dir, names):
    index, _ = read_index(run_dir)
    tubes = read_tubes(run_dir, columns=["clip_id", "label", "model_label", "target_name", "pred_name"])
    assert set(tubes["clip_id"]) == set(index["clip_id"]) and len(tubes) == len(index)
    assert set(tubes["target_name"]) <= set(names) and set(tubes["pred_name"]) <= set(names)
    assert tubes["model_label"].isna().all()
    assert (read_failures(run_dir)["stage"] != "extract").all()
    overall = pd.read_parquet(run_dir / "stats" / "overall.parquet")
    assert overall["accuracy"].isna().all() and overall["clips"].sum() == len(index)
    line = next(row for row in printed_summary(run_dir).splitlines() if row.strip().startswith("│ cam"))
    assert "n/a" in line and "0.0%" not in line.split("│")[3]
    return tubes


def test_kinetics_model_on_the_synthetic_dataset(tmp_path, synthetic_root):
    """A 400-class model on a 4-class dataset: tubes for every clip, Kinetics names, accuracy n/a everywhere."""
    cfg = make_cfg(
        tmp_path, [*R3D_SMALL, f"dataset.root={synthetic_root}", "dataset.generate_if_missing=false", "stage=all"]
    )
    run(cfg)
    run_dir = tmp_path / "outputs" / "demo"
    tubes = assert_every_clip_explained(run_dir, model_class_names("kinetics400", None, 400))
    assert tubes["label"].notna().all()  # the dataset's label stays in the row
    html = (run_dir / "report" / "index.html").read_text()
    assert "n/a" in html and "Traceback" not in html
    with pytest.raises(ConfigError, match="target.mode=label needs .* none of the dataset's 4 classes is a class"):
        extract.validate(make_cfg(tmp_path, [*R3D_SMALL, f"dataset.root={synthetic_root}", "target.mode=label"]))


def test_kinetics_model_on_an_epic_kitchens_index(tmp_path):
    root = tmp_path / "epic"
    make_epic_media(root / "EPIC-KITCHENS")
    make_epic100_annotations(root / "annotations")
    epic = [
        "dataset=epic100",
        f"dataset.root={root / 'EPIC-KITCHENS'}",
        f"dataset.annotations_dir={root / 'annotations'}",
        "dataset.split=train",
    ]
    run(make_cfg(tmp_path, [*R3D_SMALL, *epic, "stage=[index,extract,stats]"]))
    assert_every_clip_explained(tmp_path / "outputs" / "demo", model_class_names("kinetics400", None, 400))


@pytest.fixture
def manifest_media(tmp_path):
    write_video(tmp_path / "videos" / "a.mp4", barcode_frames(24, seed=1), fps=25)
    write_video(tmp_path / "videos" / "b.mp4", barcode_frames(24, seed=2), fps=25)
    return tmp_path / "videos"


DEMO_RANDOM = ["model.input.size=[64,64]", "model.input.short_side=64", "cluster.n_workers=1", "extract.batch_size=2"]


def test_manifest_without_labels(tmp_path, manifest_media, random_checkpoint):
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"path\n{manifest_media / 'a.mp4'}\n{manifest_media / 'b.mp4'}\n")
    overrides = ["dataset=manifest", f"dataset.csv={csv}", f"model.checkpoint={random_checkpoint}", *DEMO_RANDOM]
    run(make_cfg(tmp_path, [*overrides, "stage=[index,extract,stats]", "target.mode=topk", "target.k=2"]))
    run_dir = tmp_path / "outputs" / "demo"
    tubes = read_tubes(run_dir, columns=["clip_id", "label", "target_name", "target_rank"])
    assert len(tubes) == 2 * 2 and tubes["label"].isna().all()
    assert set(tubes["target_name"]) <= {"MoveRight", "MoveLeft", "MoveDown", "MoveUp"}
    assert pd.read_parquet(run_dir / "stats" / "overall.parquet")["accuracy"].isna().all()
    with pytest.raises(ConfigError, match="target.mode=label needs .* the dataset has no labels"):
        extract.validate(make_cfg(tmp_path, [*overrides, "target.mode=label"]))


@pytest.mark.slow  # five runs of the stages (about a minute on two cores)
def test_two_label_names_under_a_four_class_model(tmp_path, manifest_media, random_checkpoint):
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"path,label\n{manifest_media / 'a.mp4'},jump\n{manifest_media / 'b.mp4'},run\n")
    overrides = ["dataset=manifest", f"dataset.csv={csv}", f"model.checkpoint={random_checkpoint}", *DEMO_RANDOM]
    with pytest.raises(
        ConfigError, match=r"target.mode=label needs .* none of the dataset's 2 classes .* model.class_map"
    ):
        run(make_cfg(tmp_path, [*overrides, "stage=[index,extract]", "target.mode=label"]))
    assert not (tmp_path / "outputs" / "demo" / "index.parquet").exists()  # refused before any work
    for mode in ("pred", "topk"):
        run(make_cfg(tmp_path, [*overrides, "stage=[index,extract,stats]", f"target.mode={mode}", f"run_name={mode}"]))
        tubes = read_tubes(tmp_path / "outputs" / mode, columns=["clip_id", "label_name", "pred_name", "model_label"])
        assert len(tubes) == (2 if mode == "pred" else 2 * 3) and set(tubes["label_name"]) == {"jump", "run"}
        assert tubes["model_label"].isna().all()
    # a mapping makes label targets and accuracy applicable
    mapped = [*overrides, "+model.class_map={jump: MoveUp, run: 1}", "target.mode=label", "run_name=mapped"]
    run(make_cfg(tmp_path, [*mapped, "stage=[index,extract,stats]"]))
    tubes = read_tubes(tmp_path / "outputs" / "mapped", columns=["label_name", "target_name", "model_label"])
    assert sorted(zip(tubes["label_name"], tubes["target_name"])) == [("jump", "MoveUp"), ("run", "MoveLeft")]
    overall = pd.read_parquet(tmp_path / "outputs" / "mapped" / "stats" / "overall.parquet")
    assert overall["accuracy"].notna().all()
