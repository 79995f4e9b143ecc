"""HMDB-51 as released: ``<class>/<video>.avi`` (MPEG-4 Part 2) and the official split files, with a missing,
empty, truncated and corrupt video and a malformed line."""

from __future__ import annotations

import pytest

from helpers.action_layouts import (
    HMDB_CLASSES,
    assert_every_good_entry_has_tubes,
    assert_failures_name_every_bad_entry,
    assert_index_holds_every_good_entry,
    make_hmdb51,
)
from helpers.config import make_cfg
from helpers.layouts import read_barcode, run_index
from pipeline.__main__ import run
from pipeline.data.datasets.base import DatasetError
from pipeline.data.datasets.hmdb51 import HMDB51
from pipeline.data.video import read_frames
from pipeline.store import read_failures


@pytest.fixture(scope="module")
def hmdb(tmp_path_factory):
    return make_hmdb51(tmp_path_factory.mktemp("hmdb"))


def test_index_split_1_test(tmp_path, hmdb):
    rows, meta, run_dir = run_index(tmp_path, [*hmdb.overrides, "cluster.n_workers=1"])
    assert meta["classes"] == HMDB_CLASSES
    assert_index_holds_every_good_entry(rows, hmdb)
    assert (rows["split"] == "test").all()
    assert_failures_name_every_bad_entry(read_failures(run_dir), hmdb)
    for row in rows.itertuples():
        assert [read_barcode(f) for f in read_frames(row.source, row.frame_indices)] == list(row.frame_indices)


def test_splits_train_all_and_split_2(hmdb):
    root, splits = str(hmdb.root), str(hmdb.annotations)
    train, errors = HMDB51(root, "train", 1, splits).records()
    assert [(r.video_id, r.label_name, r.split) for r in train] == [
        (f"train_only_{name}_0", name, "train") for name in HMDB_CLASSES
    ]
    assert [e.where for e in errors] == ["chew_test_split1.txt:5"]  # malformed lines are reported in every split
    everything, _ = HMDB51(root, "all", 1, splits).records()
    assert len(everything) == len(train) + len(hmdb.good) + 4  # the unused (0) lines are left out
    second, errors = HMDB51(root, "train", 2, splits).records()
    assert errors == [] and [r.label for r in second] == [0, 1, 2]
    assert second[2].source == str(hmdb.root / "chew" / "Chewing Gum_chew_h_nm_np1_fr_med_2.avi")


def test_bad_settings(tmp_path, hmdb):
    with pytest.raises(DatasetError, match="dataset.split_id must be 1, 2 or 3, got 4"):
        HMDB51(str(hmdb.root), split_id=4, splits_dir=str(hmdb.annotations))
    with pytest.raises(DatasetError, match="dataset.split must be train, test or all"):
        HMDB51(str(hmdb.root), split="val", splits_dir=str(hmdb.annotations))
    with pytest.raises(DatasetError, match=r"no <class>_test_split3.txt files"):
        HMDB51(str(hmdb.root), split_id=3, splits_dir=str(hmdb.annotations))
    with pytest.raises(DatasetError, match="video folder not found"):
        HMDB51(str(tmp_path / "nowhere"), splits_dir=str(hmdb.annotations))
    with pytest.raises(DatasetError, match="folder of the split files not found"):
        HMDB51(str(hmdb.root), splits_dir=str(tmp_path / "nowhere"))


@pytest.mark.slow  # the whole pipeline: 3 s on two idle cores, 8-15 s on busy ones
def test_stage_all_on_hmdb51(tmp_path, hmdb):
    """A 3-class demo network with random weights, trained (as it were) on HMDB-51's classes."""
    demo = ["model.net.num_classes=3", "model.checkpoint=null", "model.classes=dataset"]
    small = ["model.input.size=[64,64]", "model.input.short_side=64", "cluster.n_workers=1", "extract.batch_size=2"]
    run(make_cfg(tmp_path, [*hmdb.overrides, *demo, *small, "stage=all", "report.clips_per_class=1"]))
    assert_every_good_entry_has_tubes(tmp_path / "outputs" / "demo", hmdb)
