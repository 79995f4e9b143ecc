"""Kinetics as released: the annotation CSV, clips named by the downloaders (flat, in label folders as written or
with ``_`` for spaces; MP4, MKV, WebM), bad rows of every kind; a Kinetics-400 model maps every label."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from helpers.action_layouts import (
    assert_every_good_entry_has_tubes,
    assert_failures_name_every_bad_entry,
    assert_index_holds_every_good_entry,
    make_kinetics,
    quoted,
)
from helpers.config import make_cfg
from helpers.layouts import barcode_frames, read_barcode, run_index, write_csv
from pipeline.__main__ import run
from pipeline.data.datasets.base import DatasetError
from pipeline.data.datasets.kinetics import Kinetics, clip_name
from pipeline.data.video import read_frames, write_video
from pipeline.models.classes import model_class_names
from pipeline.store import read_failures, read_tubes

KINETICS400 = model_class_names("kinetics400", None, 400)


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    return make_kinetics(tmp_path_factory.mktemp("kinetics"))


def test_clip_name_is_the_downloaders():
    assert clip_name("-aBc123_xy0", 10, 20) == "-aBc123_xy0_000010_000020"


def test_index_every_good_row_and_a_failure_row_for_every_bad_one(tmp_path, kinetics, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        rows, meta, run_dir = run_index(tmp_path, [*kinetics.overrides, "cluster.n_workers=1"])
    assert_index_holds_every_good_entry(rows, kinetics)
    assert_failures_name_every_bad_entry(read_failures(run_dir), kinetics)
    # classes: the CSV's labels, sorted (the train row's label is one of them too)
    assert meta["classes"] == sorted({*kinetics.good.values(), "applauding"})
    assert (rows["label"] == rows["label_name"].map(meta["classes"].index)).all() and (rows["split"] == "val").all()
    # 9 rows of the val split: 4 with a readable video, 3 with a broken one, 2 without a video or malformed
    assert "dataset: 4 of 9 CSV rows have a readable video (3 without one, 2 unusable)" in caplog.text
    for row in rows.itertuples():  # the frames of every container (MP4, MKV, VP9 WebM) are the indexed ones
        assert [read_barcode(f) for f in read_frames(row.source, row.frame_indices)] == list(row.frame_indices)
    missing = read_failures(run_dir).set_index("clip_id").loc["missing0001", "message"]
    assert "missing0001_000000_000010.{mp4,mkv,webm}" in missing and "abseiling/" in missing


def test_files_are_found_flat_or_in_a_label_folder_and_nowhere_else(tmp_path):
    root = tmp_path / "videos"
    frames = barcode_frames(12)
    write_video(root / "air_drumming" / "a_000001_000011.mp4", frames, fps=25)  # `_` for spaces
    write_video(root / "abseiling" / "b_000002_000012.mp4", frames, fps=25)  # the wrong label's folder
    write_video(root / "c_000003_000013.mkv", frames, fps=25)  # flat
    write_video(root / "air drumming" / "c_000003_000013.mp4", frames, fps=25)  # also flat: flat wins
    csv = tmp_path / "k.csv"
    write_csv(
        csv,
        ["youtube_id", "label", "time_start", "time_end", "split", "extra"],
        [["a", "air drumming", 1, 11, "val", "x"], ["b", "air drumming", 2, 12, "val", "y"]]
        + [["c", "air drumming", 3.0, 13, "val", ""], ["d", "air drumming", 5, 5, "val", ""]],
    )
    records, errors = Kinetics(str(csv), str(root)).records()
    assert [(r.video_id, r.source, r.label_name) for r in records] == [
        ("a", str(root / "air_drumming" / "a_000001_000011.mp4"), "air drumming"),
        ("c", str(root / "c_000003_000013.mkv"), "air drumming"),
    ]
    assert [(e.entry_id, e.error_type) for e in errors] == [("b", "MissingVideo"), ("d", "FrameRangeError")]
    assert "air drumming/ or air_drumming/" in errors[0].message


def test_a_class_file_a_test_csv_without_labels_and_bad_files(tmp_path, kinetics):
    names = tmp_path / "kinetics400.txt"
    names.write_text("\n".join(KINETICS400) + "\n")
    data = Kinetics(str(kinetics.annotations), str(kinetics.root), classes=str(names))
    assert data.classes == KINETICS400
    records, _ = data.records()
    assert {r.video_id: r.label for r in records}["Zz9_-qWErt1"] == KINETICS400.index("air drumming")
    csv = tmp_path / "bad.csv"
    write_csv(csv, ["label", "youtube_id", "time_start", "time_end"], [["not a kinetics class", "x", 0, 10]])
    assert [e.error_type for e in Kinetics(str(csv), str(kinetics.root), classes=str(names)).records()[1]] == [
        "UnknownClass"
    ]
    test_csv = tmp_path / "test.csv"  # Kinetics-700's test CSV has no label column
    write_csv(test_csv, ["youtube_id", "time_start", "time_end", "split"], [["-aBc123_xy0", 10, 20, "test"]])
    records, errors = Kinetics(str(test_csv), str(kinetics.root)).records()
    assert errors == [] and [(r.label, r.label_name, r.split) for r in records] == [(None, None, "test")]
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['time_end'\]"):
        write_csv(csv, ["label", "youtube_id", "time_start"], [["a", "b", 0]])
        Kinetics(str(csv), str(kinetics.root))
    with pytest.raises(DatasetError, match="video folder not found"):
        Kinetics(str(test_csv), str(tmp_path / "nowhere"))


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


@pytest.mark.slow  # the whole pipeline with a 400-class R3D-18: 5 s on two idle cores, 26 s on busy ones
def test_stage_all_with_a_kinetics400_model(tmp_path, kinetics):
    """model=r3d_18 (random weights, model.classes=kinetics400): every label maps, accuracy is a number."""
    run(make_cfg(tmp_path, [*R3D_SMALL, *kinetics.overrides, "stage=all"]))
    run_dir = tmp_path / "outputs" / "demo"
    assert_every_good_entry_has_tubes(run_dir, kinetics)
    tubes = read_tubes(run_dir, columns=["label_name", "model_label", "pred", "pred_name"])
    assert (tubes["model_label"] == tubes["label_name"].map(KINETICS400.index)).all()
    assert set(tubes["pred_name"]) <= set(KINETICS400)
    overall = pd.read_parquet(run_dir / "stats" / "overall.parquet")
    expected = (tubes["pred"] == tubes["model_label"]).mean()  # the accuracy, computed here from the rows
    assert overall["accuracy"].notna().all() and overall["accuracy"].iloc[0] == pytest.approx(expected)


def test_a_non_ascii_path_is_quoted_in_a_hydra_override(tmp_path, kinetics):
    """What docs/datasets.md tells: Hydra's parser refuses a bare non-ASCII value and reads a quoted one."""
    from hydra.errors import OverrideParseException

    with pytest.raises(OverrideParseException):
        make_cfg(tmp_path, [f"dataset.root={kinetics.root}", "dataset=kinetics"])
    cfg = make_cfg(tmp_path, [f"dataset.root={quoted(kinetics.root)}", "dataset=kinetics", "dataset.csv=x"])
    assert cfg.dataset.root == str(kinetics.root) and "é" in cfg.dataset.root
