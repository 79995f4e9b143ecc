"""Something-Something v2 as released: labels.json, the split JSONs, VP9 WebM videos at 12 fps; a missing, empty,
truncated and corrupt video, an unknown template and an entry without an id."""

from __future__ import annotations

import json
import logging

import pytest

from helpers.action_layouts import (
    SSV2_CLASSES,
    assert_every_good_entry_has_tubes,
    assert_failures_name_every_bad_entry,
    assert_index_holds_every_good_entry,
    make_ssv2,
)
from helpers.config import make_cfg
from helpers.layouts import read_barcode, run_index
from pipeline.__main__ import run
from pipeline.data.datasets.base import DatasetError
from pipeline.data.datasets.ssv2 import SomethingSomethingV2, template_class
from pipeline.data.video import probe, read_frames
from pipeline.errors import ModelError
from pipeline.stages import extract
from pipeline.store import read_failures, read_tubes


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory):
    return make_ssv2(tmp_path_factory.mktemp("ssv2"))


def test_template_class_removes_the_brackets():
    assert template_class("Putting [something] on [something]") == "Putting something on something"
    assert template_class("Putting [something similar to other things] on a table") == (
        "Putting something similar to other things on a table"
    )


def test_index_validation_with_every_bad_entry(tmp_path, ssv2, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        rows, meta, run_dir = run_index(tmp_path, [*ssv2.overrides, "cluster.n_workers=1"])
    assert meta["classes"] == SSV2_CLASSES  # in labels.json's index order
    assert_index_holds_every_good_entry(rows, ssv2)
    assert (rows["label"] == rows["label_name"].map(SSV2_CLASSES.index)).all()
    assert_failures_name_every_bad_entry(read_failures(run_dir), ssv2)
    assert "dataset: 4 of 10 JSON entries have a readable video (4 without one, 2 unusable)" in caplog.text
    for row in rows.itertuples():  # VP9 at 12 fps, millisecond timestamps: the indexed frames, exactly
        assert probe(row.source).codec == "vp9"
        assert [read_barcode(f) for f in read_frames(row.source, row.frame_indices)] == list(row.frame_indices)
    truncated = read_failures(run_dir).set_index("clip_id").loc["107", "message"]
    assert "107.webm: truncated" in truncated


def test_train_and_test_splits(ssv2):
    train = SomethingSomethingV2(str(ssv2.root), str(ssv2.annotations), split="train").records()
    assert [(r.video_id, r.label, r.split) for r in train[0]] == [("102", 1, "train")] and train[1] == []
    test, errors = SomethingSomethingV2(str(ssv2.root), str(ssv2.annotations), split="test").records()
    assert errors == [] and [(r.video_id, r.label, r.label_name) for r in test] == [
        ("101", None, None),
        ("103", None, None),
    ]
    assert test[0].source == str(ssv2.root / "101.webm")


def test_annotation_files_that_cannot_be_read(tmp_path, ssv2):
    with pytest.raises(DatasetError, match="dataset.split must be one of"):
        SomethingSomethingV2(str(ssv2.root), str(ssv2.annotations), split="val")
    with pytest.raises(DatasetError, match="video folder not found"):
        SomethingSomethingV2(str(tmp_path / "nowhere"), str(ssv2.annotations))
    with pytest.raises(DatasetError, match="labels.json: file not found"):
        SomethingSomethingV2(str(ssv2.root), str(tmp_path))
    (tmp_path / "labels.json").write_text(json.dumps({"a": "0", "b": "2"}))
    with pytest.raises(DatasetError, match="class indices must run 0..N-1"):
        SomethingSomethingV2(str(ssv2.root), str(tmp_path))
    (tmp_path / "labels.json").write_text("{not json")
    with pytest.raises(DatasetError, match="labels.json: not valid JSON"):
        SomethingSomethingV2(str(ssv2.root), str(tmp_path))
    (tmp_path / "labels.json").write_text(json.dumps({"a": "0"}))
    with pytest.raises(DatasetError, match="something-something-v2-validation.json: file not found"):
        SomethingSomethingV2(str(ssv2.root), str(tmp_path)).records()


DEMO_RANDOM = ["model.input.size=[64,64]", "model.input.short_side=64", "cluster.n_workers=1", "extract.batch_size=2"]


def test_a_model_with_the_datasets_class_count_is_told_of_model_classes_dataset(tmp_path, ssv2, random_checkpoint):
    """The demo model has 4 logits, as this SSv2 has classes: the refusal of kinetics400 names the fix."""
    cfg = make_cfg(tmp_path, [*ssv2.overrides, f"model.checkpoint={random_checkpoint}", "model.classes=kinetics400"])
    with pytest.raises(
        ModelError, match=r"400 class names .* 4 logits; the dataset has 4 classes too: .*model.classes=dataset"
    ):
        extract.validate(cfg, upstream=("index",))


@pytest.mark.slow  # the whole pipeline: 3 s on two idle cores, 8-15 s on busy ones
def test_stage_all_on_ssv2(tmp_path, ssv2, random_checkpoint):
    overrides = [*ssv2.overrides, f"model.checkpoint={random_checkpoint}", "model.classes=dataset", *DEMO_RANDOM]
    run(make_cfg(tmp_path, [*overrides, "stage=all", "report.clips_per_class=1"]))
    run_dir = tmp_path / "outputs" / "demo"
    assert_every_good_entry_has_tubes(run_dir, ssv2)
    tubes = read_tubes(run_dir, columns=["label_name", "model_label", "target_name"])
    assert (tubes["model_label"] == tubes["label_name"].map(SSV2_CLASSES.index)).all()
    assert set(tubes["target_name"]) <= set(SSV2_CLASSES)
