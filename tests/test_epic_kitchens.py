from pathlib import Path

import pytest

from helpers.layouts import (
    EPIC_55_COLUMNS,
    EPIC_100_COLUMNS,
    EPIC_FPS,
    EPIC_NOUNS,
    EPIC_VERBS,
    epic_row,
    make_epic100_annotations,
    make_epic_media,
    read_barcode,
    run_index,
    write_csv,
)
from pipeline.data.clips import ClipDataset
from pipeline.data.datasets.base import DatasetError
from pipeline.data.datasets.epic_kitchens import Epic55, Epic100
from pipeline.data.resize import ResizeCrop
from pipeline.data.video import read_frames
from pipeline.store import read_failures


@pytest.fixture(scope="module")
def epic(tmp_path_factory):
    root = tmp_path_factory.mktemp("epic")
    media, annotations = root / "EPIC-KITCHENS", root / "annotations"
    make_epic_media(media)
    make_epic100_annotations(annotations)
    return dict(media=media, annotations=annotations)


def reader(epic, **kwargs):
    return Epic100(str(epic["media"]), str(epic["annotations"]), **kwargs)


# ------------------------------------------------------------------------------------------------ reader
def test_verb_labels_and_segments(epic):
    data = reader(epic, split="train", label="verb")
    assert data.classes == EPIC_VERBS
    records, errors = data.records()
    assert errors == []
    got = [(r.segment_id, r.video_id, r.label, r.label_name, r.split, r.start_frame, r.end_frame) for r in records]
    assert got == [
        ("P01_01_0", "P01_01", 0, "take", "train", 10, 40),
        ("P01_01_1", "P01_01", 1, "put", "train", 60, 120),
        ("P01_02_0", "P01_02", 2, "open", "train", 0, 3),
        ("P01_02_1", "P01_02", 0, "take", "train", 49, 89),
    ]
    assert records[0].source == str(epic["media"] / "P01" / "videos" / "P01_01.MP4")
    assert records[0].fps == pytest.approx(EPIC_FPS)


def test_noun_labels(epic):
    data = reader(epic, split="train", label="noun")
    assert data.classes == EPIC_NOUNS
    records, _ = data.records()
    assert [(r.label, r.label_name) for r in records] == [(0, "cup"), (1, "plate"), (3, "door"), (1, "plate")]


def test_action_classes_are_the_train_pairs(epic):
    data = reader(epic, split="validation", label="action")
    # pairs in the train CSV, sorted by (verb, noun): (0,0) (0,1) (1,1) (2,3)
    assert data.classes == ["take cup", "take plate", "put plate", "open door"]
    records, errors = data.records()
    assert errors == []
    assert [(r.segment_id, r.label, r.label_name, r.split) for r in records] == [
        ("P01_02_5", 0, "take cup", "validation"),
        ("P01_02_6", None, "open knife", "validation"),  # a pair never seen in training has no class index
    ]


def test_test_timestamps_have_no_labels(epic):
    records, errors = reader(epic, split="test", label="noun").records()
    assert errors == []
    assert [(r.segment_id, r.label, r.label_name, r.split, r.start_frame, r.end_frame) for r in records] == [
        ("P01_01_9", None, None, "test", 30, 70)
    ]


def test_frames_media_points_at_the_frame_folder(epic):
    records, _ = reader(epic, split="train", media="frames").records()
    assert records[0].source == str(epic["media"] / "P01" / "rgb_frames" / "P01_01")
    assert Path(records[0].source).is_dir()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(split="val"), "dataset.split"),
        (dict(label="verbs"), "dataset.label"),
        (dict(media="flow"), "dataset.media"),
    ],
)
def test_bad_settings(epic, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        reader(epic, **kwargs)


def test_missing_class_file(epic, tmp_path):
    with pytest.raises(DatasetError, match="EPIC_100_verb_classes.csv: file not found"):
        Epic100(str(epic["media"]), str(tmp_path))


def test_bad_rows_become_record_errors(epic, tmp_path):
    annotations = tmp_path / "annotations"
    make_epic100_annotations(annotations)
    rows = [
        epic_row("P01_01_0", "P01_01", 11, 40, 0, 0),
        epic_row("P01_01_2", "P01_01", 50, 45, 0, 0),  # line 3: stops before it starts
        epic_row("P01_01_3", "P01_01", 11, 40, 7, 0),  # line 4: verb class not in the class file
        epic_row("P01_01_4", "P01_01", "abc", 40, 0, 0),  # line 5: not a frame number
        epic_row("P01_01_5", "P01_01", 0, 40, 0, 0),  # line 6: frames start at 1
    ]
    write_csv(annotations / "EPIC_100_train.csv", EPIC_100_COLUMNS, rows)
    with open(annotations / "EPIC_100_train.csv", "a") as handle:
        handle.write("P01_01_6,P01,P01_01,00:00:01.00\n")  # line 7: a truncated row
    records, errors = Epic100(str(epic["media"]), str(annotations), split="train").records()
    assert [r.segment_id for r in records] == ["P01_01_0"]
    assert [(e.where, e.error_type) for e in errors] == [
        ("EPIC_100_train.csv:3", "FrameRangeError"),
        ("EPIC_100_train.csv:4", "UnknownClass"),
        ("EPIC_100_train.csv:5", "MalformedRow"),
        ("EPIC_100_train.csv:6", "FrameRangeError"),
        ("EPIC_100_train.csv:7", "MalformedRow"),
    ]
    assert "P01_01_2" in errors[0].message and "before start_frame" in errors[0].message
    assert "verb_class 7" in errors[1].message and "EPIC_100_verb_classes.csv" in errors[1].message
    assert "'abc'" in errors[2].message
    assert all(e.message.startswith(e.where) for e in errors)


# ------------------------------------------------------------------------------------------------ index + decode
def index_epic(tmp_path, epic, *overrides):
    return run_index(
        tmp_path,
        [
            "dataset=epic100",
            f"dataset.root={epic['media']}",
            f"dataset.annotations_dir={epic['annotations']}",
            "dataset.split=train",
            "sampler.clip_len=4",
            "sampler.frame_stride=2",
            "index.clips_per_shard=2",
            *overrides,
        ],
    )


@pytest.mark.parametrize("media", ["videos", "frames"])
def test_index_and_decode_epic(tmp_path, epic, media):
    rows, meta, run_dir = index_epic(tmp_path, epic, f"dataset.media={media}", "dataset.label=action")
    assert meta["classes"] == ["take cup", "take plate", "put plate", "open door"]
    # centre clip of 4 frames every 2 (span 7) in each segment's 0-based [start_frame - 1, stop_frame)
    expected = {
        "P01_01_0:000021": ("P01_01", 0, [21, 23, 25, 27], 0, 10, 40),  # 10 + (30 - 7) // 2 = 21
        "P01_01_1:000086": ("P01_01", 2, [86, 88, 90, 92], 0, 60, 120),  # 60 + (60 - 7) // 2 = 86
        "P01_02_0:000000": ("P01_02", 3, [0, 2, 2, 2], 2, 0, 3),
        "P01_02_1:000065": ("P01_02", 1, [65, 67, 69, 71], 0, 49, 89),
    }
    got = {
        r.clip_id: (r.video_id, r.label, list(r.frame_indices), r.padded, r.start_frame, r.end_frame)
        for r in rows.itertuples()
    }
    assert got == expected
    assert (rows["segment_id"] == rows["clip_id"].str.split(":").str[0]).all()
    assert rows["fps"].to_numpy() == pytest.approx(EPIC_FPS)
    assert (rows["num_frames"] == rows["video_id"].map({"P01_01": 120, "P01_02": 90})).all()
    assert list(rows["codec"].unique()) == (["h264"] if media == "videos" else ["jpeg"])
    assert rows["shard"].tolist() == [0, 0, 1, 1]
    assert len(read_failures(run_dir)) == 0

    transform = ResizeCrop(48, (48, 48))
    dataset = ClipDataset(rows, transform)
    for i in range(len(rows)):
        item = dataset[i]
        assert item["ok"], item.get("message")
        # 128x72 source, short side 72 -> 48: scale 2/3, resized 85x48, crop starts at column (85 - 48) // 2 = 18
        assert item["crop_box"].tolist() == pytest.approx([18 * 128 / 85, 0.0, 66 * 128 / 85, 72.0], abs=1e-4)
    # every clip frame is the frame written under that index (it carries its index as a barcode)
    for row in rows.itertuples():
        frames = read_frames(row.source, row.frame_indices)
        assert [read_barcode(f) for f in frames] == list(row.frame_indices)


def test_index_epic_bad_inputs(tmp_path, epic):
    annotations = tmp_path / "annotations"
    make_epic100_annotations(annotations)
    rows = [
        epic_row("P01_01_0", "P01_01", 11, 40, 0, 0),
        epic_row("P01_01_7", "P01_01", 100, 130, 0, 0),  # beyond the video's 120 frames
        epic_row("P02_01_0", "P02_01", 1, 30, 0, 0),  # no such video
        epic_row("P01_01_0", "P01_01", 11, 40, 0, 0),  # listed twice
    ]
    write_csv(annotations / "EPIC_100_train.csv", EPIC_100_COLUMNS, rows)
    other = dict(epic, annotations=annotations)
    rows, _, run_dir = index_epic(tmp_path, other)
    assert rows["clip_id"].tolist() == ["P01_01_0:000021"]
    failures = read_failures(run_dir).set_index("clip_id")
    assert failures.loc["P01_01_7", "error_type"] == "FrameRangeError"
    assert "beyond the video's 120 frames" in failures.loc["P01_01_7", "message"]
    assert (
        failures.loc["P02_01_0", "error_type"] == "VideoError"
        and "P02_01.MP4: no such file" in failures.loc["P02_01_0", "message"]
    )
    assert failures.loc["P01_01_0", "error_type"] == "DuplicateClip"
    assert len(failures) == 3


def test_target_fps_uses_each_videos_rate(tmp_path, epic):
    rows, _, _ = index_epic(tmp_path, epic, "dataset.media=frames", "sampler.target_fps=15")
    # 59.94 -> 15 fps: offsets 0, 4, 8, 12 (span 13); [10, 40): 10 + (30 - 13) // 2 = 18
    assert rows.set_index("clip_id").loc["P01_01_0:000018", "frame_indices"].tolist() == [18, 22, 26, 30]


# ------------------------------------------------------------------------------------------------ EPIC-55
def test_epic55_reader(epic, tmp_path):
    annotations = tmp_path / "epic55"
    write_csv(
        annotations / "EPIC_verb_classes.csv",
        ["verb_id", "class_key", "verbs"],
        [[i, v, f"\"['{v}']\""] for i, v in enumerate(EPIC_VERBS)],
    )
    write_csv(
        annotations / "EPIC_noun_classes.csv",
        ["noun_id", "class_key", "nouns"],
        [[i, n, f"\"['{n}']\""] for i, n in enumerate(EPIC_NOUNS)],
    )
    write_csv(
        annotations / "EPIC_train_action_labels.csv",
        EPIC_55_COLUMNS,
        [
            epic_row(0, "P01_01", 11, 40, 1, 2, columns=EPIC_55_COLUMNS),
            epic_row(1, "P01_02", 5, 9, 2, 3, columns=EPIC_55_COLUMNS),
        ],
    )
    write_csv(
        annotations / "EPIC_test_s1_timestamps.csv",
        ["uid", "participant_id", "video_id", "start_timestamp", "stop_timestamp", "start_frame", "stop_frame"],
        [[7, "P01", "P01_01", "00:00:01.00", "00:00:02.00", 61, 120]],
    )
    data = Epic55(str(epic["media"]), str(annotations), label="noun", media="frames", fps=59.94)
    records, errors = data.records()
    assert errors == [] and data.classes == EPIC_NOUNS
    assert [(r.segment_id, r.label_name, r.start_frame, r.end_frame, r.fps) for r in records] == [
        ("0", "knife", 10, 40, 59.94),
        ("1", "door", 4, 9, 59.94),
    ]
    test, _ = Epic55(str(epic["media"]), str(annotations), split="test_s1").records()
    assert [(r.segment_id, r.label, r.split, r.start_frame) for r in test] == [("7", None, "test_s1", 60)]
    with pytest.raises(DatasetError, match="test_s1"):
        Epic55(str(epic["media"]), str(annotations), split="validation")
