"""UCF-101 in its published layout (mpeg4 AVI at 25 and 29.97 fps, some with audio, splits folder apart)."""

import av
import numpy as np
import pytest

from helpers.layouts import UCF_CLASSES, UCF_VIDEOS, make_ucf101, read_barcode, run_index
from pipeline.data.clips import ClipDataset
from pipeline.data.resize import ResizeCrop
from pipeline.data.video import probe, read_frames
from pipeline.store import read_failures


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    base = tmp_path_factory.mktemp("ucf")
    make_ucf101(base / "UCF-101", base / "ucfTrainTestlist")
    return dict(root=base / "UCF-101", splits=base / "ucfTrainTestlist")


def index_ucf(tmp_path, ucf, *overrides):
    rows, _, run_dir = run_index(
        tmp_path,
        [
            "dataset=ucf101",
            f"dataset.root={ucf['root']}",
            f"dataset.splits_dir={ucf['splits']}",
            "sampler=uniform",
            "sampler.num_clips=2",
            "sampler.clip_len=4",
            "sampler.frame_stride=3",
            *overrides,
        ],
    )
    return rows, run_dir


def test_videos_are_what_ucf101_ships(ucf):
    for relative, (fps, n, audio) in UCF_VIDEOS.items():
        info = probe(ucf["root"] / relative)
        assert (info.codec, info.width, info.height, info.num_frames) == ("mpeg4", 320, 240, n)
        assert info.fps == pytest.approx(fps)
        with av.open(str(ucf["root"] / relative)) as container:
            assert len(container.streams.audio) == int(audio)


@pytest.mark.parametrize(
    "fold,split,expected",
    [
        (1, "train", ["v_ApplyEyeMakeup_g08_c01", "v_Archery_g01_c01", "v_Archery_g09_c02"]),
        (1, "test", ["v_Basketball_g02_c04"]),
        (2, "train", ["v_Archery_g09_c02", "v_Basketball_g02_c04"]),
        (2, "test", ["v_ApplyEyeMakeup_g08_c01", "v_Archery_g01_c01"]),
    ],
)
def test_index_ucf_folds_labels_frames(tmp_path, ucf, fold, split, expected):
    rows, run_dir = index_ucf(tmp_path, ucf, f"dataset.fold={fold}", f"dataset.split={split}")
    assert len(read_failures(run_dir)) == 0
    assert sorted(rows["video_id"].unique()) == expected
    assert (rows["split"] == split).all()
    assert (rows["label_name"] == rows["video_id"].str.split("_").str[1]).all()
    assert (rows["label"] == rows["label_name"].map(UCF_CLASSES.index)).all()
    for row in rows.itertuples():
        fps, n, _ = UCF_VIDEOS[f"{row.label_name}/{row.video_id}.avi"]
        assert row.num_frames == n and row.fps == pytest.approx(fps, rel=1e-6)
        # uniform: 2 clips of span 10, the first at frame 0, the last ending at the video's last frame
        assert row.clip_id == f"{row.video_id}:{row.frame_indices[0]:06d}"
        assert row.frame_indices[0] in (0, n - 10)
        assert list(np.diff(row.frame_indices)) == [3, 3, 3]
        frames = read_frames(row.source, row.frame_indices)
        assert [read_barcode(f) for f in frames] == list(row.frame_indices)


def test_ucf_decoded_clip_and_crop_box(tmp_path, ucf):
    rows, _ = index_ucf(tmp_path, ucf, "dataset.split=test")
    item = ClipDataset(rows, ResizeCrop(112, (112, 112)))[0]
    assert item["ok"]
    # 320x240 -> short side 112: scale 112/240, width round(149.33) = 149; crop column (149 - 112) // 2 = 18
    assert item["crop_box"].tolist() == pytest.approx([18 * 320 / 149, 0.0, 130 * 320 / 149, 240.0], abs=1e-4)
    assert tuple(item["video"].shape) == (3, 4, 112, 112)


def test_ucf_train_line_with_wrong_number(tmp_path, ucf):
    splits = tmp_path / "lists"
    splits.mkdir()
    (splits / "classInd.txt").write_text((ucf["splits"] / "classInd.txt").read_text())
    (splits / "trainlist01.txt").write_text("Archery/v_Archery_g09_c02.avi 2\nArchery/v_Archery_g01_c01.avi 3\n")
    rows, run_dir = index_ucf(tmp_path, dict(ucf, splits=splits), "dataset.split=train")
    assert rows["video_id"].unique().tolist() == ["v_Archery_g09_c02"]
    failure = read_failures(run_dir).iloc[0]
    assert (failure["clip_id"], failure["error_type"]) == ("trainlist01.txt:2", "MalformedRow")
    assert "'3'" in failure["message"] and "Archery" in failure["message"]
