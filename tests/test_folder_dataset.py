"""``dataset=folder``: class folders without split files, or a flat folder of unlabelled videos."""

from __future__ import annotations

import pytest

from helpers.action_layouts import (
    assert_every_good_entry_has_tubes,
    assert_failures_name_every_bad_entry,
    assert_index_holds_every_good_entry,
    make_class_folders,
    make_flat_folder,
)
from helpers.config import make_cfg
from helpers.layouts import read_barcode, run_index
from pipeline.__main__ import run
from pipeline.data.datasets.base import DatasetError
from pipeline.data.datasets.folder import VideoFolder
from pipeline.data.video import read_frames
from pipeline.store import read_failures, read_tubes


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("folders"))


def test_class_folders(tmp_path, folders):
    rows, meta, run_dir = run_index(tmp_path, [*folders.overrides, "cluster.n_workers=1"])
    assert meta["classes"] == ["jump", "run fast ü"]  # sorted folder names; the empty folder is no class
    assert_index_holds_every_good_entry(rows, folders)
    assert_failures_name_every_bad_entry(read_failures(run_dir), folders)
    assert not rows["source"].str.endswith("notes.txt").any()
    for row in rows.itertuples():
        assert [read_barcode(f) for f in read_frames(row.source, row.frame_indices)] == list(row.frame_indices)


def test_flat_folder_has_no_labels(tmp_path):
    flat = make_flat_folder(tmp_path / "data")
    rows, meta, run_dir = run_index(tmp_path, [*flat.overrides, "cluster.n_workers=1"])
    assert meta["classes"] == []
    assert_index_holds_every_good_entry(rows, flat)
    assert not (run_dir / "failures" / "index.parquet").exists()


def test_a_folder_without_videos(tmp_path):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    (tmp_path / "empty" / "class" / "readme.md").write_text("no video here\n")
    with pytest.raises(DatasetError, match="no video files in it or in its sub-folders"):
        VideoFolder(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="folder not found"):
        VideoFolder(str(tmp_path / "nowhere"))


@pytest.mark.slow  # the whole pipeline: 3 s on two idle cores, 8-15 s on busy ones
def test_stage_all_on_class_folders(tmp_path, folders):
    demo = ["model.net.num_classes=2", "model.checkpoint=null", "model.classes=dataset", "target.mode=label"]
    small = ["model.input.size=[64,64]", "model.input.short_side=64", "cluster.n_workers=1", "extract.batch_size=2"]
    run(make_cfg(tmp_path, [*folders.overrides, *demo, *small, "stage=all", "report.clips_per_class=1"]))
    run_dir = tmp_path / "outputs" / "demo"
    assert_every_good_entry_has_tubes(run_dir, folders)
    tubes = read_tubes(run_dir, columns=["label_name", "target_name"])
    assert (tubes["label_name"] == tubes["target_name"]).all()  # label targets: the folder names are the classes
