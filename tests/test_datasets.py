import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.datasets.base import DatasetError, RecordError, VideoRecord
from pipeline.data.datasets.synthetic import (
    ACTOR_COLOUR,
    DIRECTIONS,
    Synthetic,
    SyntheticSpec,
    generate,
    render_video,
)
from pipeline.data.datasets.ucf101 import UCF101
from pipeline.data.video import probe, read_frames

CLASSES = ["ApplyEyeMakeup", "Archery", "Basketball"]
TRAIN = [
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1",
    "Archery/v_Archery_g09_c02.avi 2",
    "Basketball/v_Basketball_g10_c03.avi 3",
]
TEST = ["Archery/v_Archery_g01_c01.avi", "Basketball/v_Basketball_g02_c04.avi"]


def write_lists(folder, classes=CLASSES, train=TRAIN, test=TEST, fold=1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classInd.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(classes, start=1)))
    (folder / f"trainlist{fold:02d}.txt").write_text("\n".join(train) + "\n")
    (folder / f"testlist{fold:02d}.txt").write_text("\n".join(test) + "\n")


def make_videos(root, lines):
    for line in lines:
        path = root / line.split()[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


@pytest.fixture()
def ucf(tmp_path):
    root = tmp_path / "UCF-101"
    write_lists(root)
    make_videos(root, TRAIN + TEST)
    return root


# ------------------------------------------------------------------------------------------------ UCF-101
def test_ucf_classes(ucf):
    assert UCF101(str(ucf)).classes == CLASSES


def test_ucf_train_records(ucf):
    records, errors = UCF101(str(ucf), split="train").records()
    assert errors == []
    assert records == [
        VideoRecord(
            "v_ApplyEyeMakeup_g08_c01",
            str(ucf / "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"),
            0,
            "ApplyEyeMakeup",
            "train",
        ),
        VideoRecord("v_Archery_g09_c02", str(ucf / "Archery/v_Archery_g09_c02.avi"), 1, "Archery", "train"),
        VideoRecord("v_Basketball_g10_c03", str(ucf / "Basketball/v_Basketball_g10_c03.avi"), 2, "Basketball", "train"),
    ]
    for record in records:
        assert Path(record.source).is_file()
        assert record.start_frame == 0 and record.end_frame is None


def test_ucf_test_records_take_label_from_folder(ucf):
    records, errors = UCF101(str(ucf), split="test").records()
    assert errors == []
    assert [(r.video_id, r.label, r.label_name, r.split) for r in records] == [
        ("v_Archery_g01_c01", 1, "Archery", "test"),
        ("v_Basketball_g02_c04", 2, "Basketball", "test"),
    ]
    assert records[1].source == str(ucf / "Basketball" / "v_Basketball_g02_c04.avi")


def test_ucf_default_split_is_test(ucf):
    records, _ = UCF101(str(ucf)).records()
    assert {r.split for r in records} == {"test"}


def test_ucf_all_splits(ucf):
    records, errors = UCF101(str(ucf), split="all").records()
    assert errors == []
    assert [r.split for r in records] == ["train"] * 3 + ["test"] * 2
    assert [r.video_id for r in records][3:] == ["v_Archery_g01_c01", "v_Basketball_g02_c04"]


def test_ucf_splits_dir_apart_from_root(tmp_path):
    root, splits = tmp_path / "videos", tmp_path / "ucfTrainTestlist"
    write_lists(splits)
    make_videos(root, TRAIN + TEST)
    records, errors = UCF101(str(root), split="train", splits_dir=str(splits)).records()
    assert errors == []
    assert [r.source for r in records] == [str(root / line.split()[0]) for line in TRAIN]
    assert not (root / "classInd.txt").exists()


def test_ucf_other_fold(tmp_path):
    write_lists(tmp_path, train=["Archery/v_Archery_g20_c01.avi 2"], test=["Archery/v_Archery_g03_c01.avi"], fold=2)
    records, _ = UCF101(str(tmp_path), split="train", fold=2).records()
    assert [r.video_id for r in records] == ["v_Archery_g20_c01"]
    with pytest.raises(DatasetError):
        UCF101(str(tmp_path), split="train", fold=1).records()


def test_ucf_windows_line_endings_and_blank_lines(tmp_path):
    (tmp_path / "classInd.txt").write_text("1 Archery\r\n2 Basketball\r\n\r\n")
    (tmp_path / "testlist01.txt").write_text(
        "Basketball/v_Basketball_g01_c01.avi\r\n\r\nArchery/v_Archery_g01_c02.avi\r\n"
    )
    reader = UCF101(str(tmp_path))
    assert reader.classes == ["Archery", "Basketball"]
    records, errors = reader.records()
    assert errors == []
    assert [(r.video_id, r.label) for r in records] == [("v_Basketball_g01_c01", 1), ("v_Archery_g01_c02", 0)]
    assert records[0].source == str(tmp_path / "Basketball" / "v_Basketball_g01_c01.avi")


def test_ucf_unknown_class_is_a_record_error(ucf):
    (ucf / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\nBowling/v_Bowling_g01_c01.avi\nno_folder.avi\n")
    records, errors = UCF101(str(ucf), split="test").records()
    assert [r.video_id for r in records] == ["v_Archery_g01_c01"]
    assert len(errors) == 2
    assert all(isinstance(e, RecordError) and e.error_type == "UnknownClass" for e in errors)
    assert errors[0].where == "testlist01.txt:2"
    assert "Bowling" in errors[0].message
    assert errors[1].where == "testlist01.txt:3"


def test_ucf_missing_class_index(tmp_path):
    (tmp_path / "trainlist01.txt").write_text(TRAIN[0] + "\n")
    with pytest.raises(DatasetError) as err:
        UCF101(str(tmp_path), split="train")
    assert "classInd.txt" in str(err.value)


@pytest.mark.parametrize("split", ["val", "Train", ""])
def test_ucf_bad_split(ucf, split):
    with pytest.raises(DatasetError):
        UCF101(str(ucf), split=split)


def test_ucf_missing_split_list(ucf):
    (ucf / "testlist01.txt").unlink()
    with pytest.raises(DatasetError):
        UCF101(str(ucf), split="test").records()


@pytest.mark.parametrize("content", ["1 Archery\n3 Basketball\n", "one Archery\n", "1 Archery extra\n"])
def test_ucf_bad_class_index(tmp_path, content):
    (tmp_path / "classInd.txt").write_text(content)
    with pytest.raises(DatasetError):
        UCF101(str(tmp_path))


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


# ------------------------------------------------------------------------------------------------ synthetic
SPEC = SyntheticSpec(groups=2, clips_per_group=1, test_groups=1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    assert generate(root, SPEC, progress=False) == root
    return root


def video_ids(split_lines):
    return [Path(line.split()[0]).stem for line in split_lines]


def test_synthetic_layout(synthetic):
    classes = list(DIRECTIONS)
    assert (synthetic / "classInd.txt").read_text().split() == [
        t for i, c in enumerate(classes, 1) for t in (str(i), c)
    ]
    train = (synthetic / "trainlist01.txt").read_text().splitlines()
    test = (synthetic / "testlist01.txt").read_text().splitlines()
    assert sorted(train) == sorted(f"{c}/v_{c}_g02_c01.mp4 {i}" for i, c in enumerate(classes, 1))
    assert sorted(test) == sorted(f"{c}/v_{c}_g01_c01.mp4" for c in classes)
    assert (synthetic / "boxes.csv").is_file()
    assert sorted(p.relative_to(synthetic).as_posix() for p in synthetic.rglob("*.mp4")) == sorted(
        line.split()[0] for line in train + test
    )


def test_synthetic_videos_decode(synthetic):
    for path in sorted(synthetic.rglob("*.mp4")):
        info = probe(path)
        assert (info.width, info.height) == (SPEC.width, SPEC.height)
        assert SPEC.min_frames <= info.num_frames <= SPEC.max_frames
        assert info.fps == pytest.approx(SPEC.fps)
        assert info.codec == "h264"
        frames = read_frames(path, [0, info.num_frames - 1])
        assert frames.shape == (2, SPEC.height, SPEC.width, 3)


def test_synthetic_generate_is_skipped_for_same_spec(synthetic):
    files = [p for p in synthetic.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    generate(synthetic, SPEC, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for p in synthetic.rglob("*") if p.is_file()) == sorted(files)


def test_synthetic_boxes_one_row_per_frame(synthetic):
    boxes = pd.read_csv(synthetic / "boxes.csv")
    assert list(boxes.columns) == ["video_id", "frame", "x0", "y0", "x1", "y1"]
    ids = video_ids(
        (synthetic / "trainlist01.txt").read_text().splitlines()
        + (synthetic / "testlist01.txt").read_text().splitlines()
    )
    assert sorted(boxes["video_id"].unique()) == sorted(ids)
    for path in synthetic.rglob("*.mp4"):
        rows = boxes[boxes["video_id"] == path.stem]
        assert rows["frame"].tolist() == list(range(probe(path).num_frames))
    assert ((boxes["x1"] > boxes["x0"]) & (boxes["y1"] > boxes["y0"])).all()
    assert (boxes[["x0", "x1"]] >= 0).all().all() and (boxes[["x0", "x1"]] <= SPEC.width).all().all()
    assert (boxes[["y0", "y1"]] >= 0).all().all() and (boxes[["y0", "y1"]] <= SPEC.height).all().all()


def actor_mask(frame):
    diff = np.abs(frame.astype(np.int16) - np.array(ACTOR_COLOUR, dtype=np.int16))
    return (diff < 45).all(-1)


def test_synthetic_actor_inside_box(synthetic):
    boxes = pd.read_csv(synthetic / "boxes.csv").set_index(["video_id", "frame"])
    for path in sorted(synthetic.rglob("*.mp4")):
        n = probe(path).num_frames
        indices = [0, n // 2, n - 1]
        for index, frame in zip(indices, read_frames(path, indices)):
            x0, y0, x1, y1 = boxes.loc[(path.stem, index)]
            ys, xs = np.nonzero(actor_mask(frame))
            assert len(xs) > 0.5 * np.pi * ((x1 - x0 - 1) / 2) ** 2, (path.name, index)
            assert xs.min() >= x0 - 2 and xs.max() + 1 <= x1 + 2, (path.name, index)
            assert ys.min() >= y0 - 2 and ys.max() + 1 <= y1 + 2, (path.name, index)


def test_synthetic_actor_moves_in_class_direction(synthetic):
    boxes = pd.read_csv(synthetic / "boxes.csv")
    for video_id, rows in boxes.groupby("video_id"):
        dx, dy = DIRECTIONS[video_id.split("_")[1]]
        step_x, step_y = np.diff(rows["x0"].to_numpy()), np.diff(rows["y0"].to_numpy())
        along, across = (step_x * dx, step_y) if dx else (step_y * dy, step_x)
        # steady motion along the class direction at the spec's speed, none across it (boxes.csv keeps 2 decimals)
        assert np.all(across == 0), video_id
        assert along.max() - along.min() <= 0.021, video_id
        assert SPEC.speed[0] - 0.011 <= along.mean() <= SPEC.speed[1] + 0.011, video_id


def test_synthetic_same_seed_same_boxes(synthetic, tmp_path):
    generate(tmp_path / "again", SPEC, progress=False)
    assert (tmp_path / "again" / "boxes.csv").read_bytes() == (synthetic / "boxes.csv").read_bytes()
    small = dict(groups=1, clips_per_group=1, test_groups=1, min_frames=5, max_frames=6)
    generate(tmp_path / "seed1", SyntheticSpec(seed=1, **small), progress=False)
    generate(tmp_path / "seed2", SyntheticSpec(seed=2, **small), progress=False)
    assert (tmp_path / "seed1" / "boxes.csv").read_text() != (tmp_path / "seed2" / "boxes.csv").read_text()


def test_synthetic_other_spec_regenerates(tmp_path):
    small = dict(groups=1, clips_per_group=1, test_groups=1, min_frames=5, max_frames=6)
    generate(tmp_path, SyntheticSpec(seed=1, **small), progress=False)
    first = (tmp_path / "boxes.csv").read_text()
    generate(tmp_path, SyntheticSpec(seed=2, **small), progress=False)
    assert (tmp_path / "boxes.csv").read_text() != first
    assert json.loads((tmp_path / "synthetic.json").read_text())["seed"] == 2


def test_render_video_exact_actor_and_determinism():
    spec = SyntheticSpec(min_frames=6, max_frames=6, distractors=2)
    frames, boxes = render_video(spec, DIRECTIONS["MoveUp"], np.random.default_rng(3))
    again, boxes_again = render_video(spec, DIRECTIONS["MoveUp"], np.random.default_rng(3))
    assert np.array_equal(frames, again) and np.array_equal(boxes, boxes_again)
    assert frames.shape == (6, spec.height, spec.width, 3) and frames.dtype == np.uint8
    assert boxes.shape == (6, 4)
    for frame, (x0, y0, x1, y1) in zip(frames, boxes):
        ys, xs = np.nonzero((frame == np.array(ACTOR_COLOUR, dtype=np.uint8)).all(-1))
        assert len(xs) > 0
        assert xs.min() >= x0 and xs.max() + 1 <= x1
        assert ys.min() >= y0 and ys.max() + 1 <= y1
    # moving up: y decreases, x fixed
    assert (np.diff(boxes[:, 1]) < 0).all() and (np.diff(boxes[:, 0]) == 0).all()


def test_synthetic_reader(synthetic):
    reader = Synthetic(
        str(synthetic), split="all", generate_if_missing=True, groups=2, clips_per_group=1, test_groups=1
    )
    records, errors = reader.records()
    assert errors == []
    assert len(records) == 8
    assert reader.classes == list(DIRECTIONS)
    assert reader.boxes_path == synthetic / "boxes.csv"
    for r in records:
        assert r.label_name == r.video_id.split("_")[1]
        assert reader.classes[r.label] == r.label_name
        assert Path(r.source).is_file()
        assert r.split == ("test" if "_g01_" in r.video_id else "train")
