"""The CSV manifest reader, and bad input of every kind through the index stage."""

from pathlib import Path

import pytest
from rich.console import Console

from helpers.layouts import barcode_frames, read_barcode, run_index, write_frame_folder
from pipeline.data.clips import ClipDataset, collate_clips
from pipeline.data.datasets.base import DatasetError
from pipeline.data.datasets.manifest import Manifest
from pipeline.data.resize import ResizeCrop
from pipeline.data.video import read_frames, write_video
from pipeline.stages import summary
from pipeline.store import read_failures


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    write_video(root / "videos" / "jump_01.mp4", barcode_frames(60, seed=1), fps=30, g="15", bf="2")
    write_video(root / "videos" / "run_01.mp4", barcode_frames(40, seed=2), fps=25)
    write_frame_folder(root / "frames" / "wave_01", barcode_frames(20, seed=3))
    return root


def write_manifest(root: Path, lines: list[str], name="manifest.csv") -> Path:
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


HEADER = "path,label,start_frame,end_frame,start_sec,end_sec,video_id,split"


def test_manifest_records(media, tmp_path):
    csv = write_manifest(
        tmp_path,
        [
            HEADER,
            f"{media}/videos/jump_01.mp4,jump,,,,,,val",
            f"{media}/videos/jump_01.mp4,run,,,0.5,1.2,,val",
            f"{media}/frames/wave_01,wave,4,12,,,wave_a,train",
            f"{media}/videos/run_01.mp4,,,,,,,",
        ],
    )
    data = Manifest(str(csv))
    assert data.classes == ["jump", "run", "wave"]
    records, errors = data.records()
    assert errors == []
    got = [
        (r.video_id, r.label, r.label_name, r.split, r.segment_id, r.start_frame, r.end_frame, r.start_sec, r.end_sec)
        for r in records
    ]
    assert got == [
        ("jump_01", 0, "jump", "val", None, 0, None, None, None),
        ("jump_01", 1, "run", "val", "jump_01/0.5s-1.2s", 0, None, 0.5, 1.2),
        ("wave_a", 2, "wave", "train", "wave_a/4-12", 4, 12, None, None),
        ("run_01", None, None, "all", None, 0, None, None, None),
    ]
    assert [r.video_id for r in Manifest(str(csv), split="val").records()[0]] == ["jump_01", "jump_01"]


def test_manifest_relative_paths_and_class_file(media, tmp_path):
    (tmp_path / "classes.txt").write_text("wave\njump\n\n")
    csv = write_manifest(tmp_path, ["path,label", "videos/jump_01.mp4,jump", "frames/wave_01,0", "videos/run_01.mp4,1"])
    data = Manifest(str(csv), root=str(media), classes=str(tmp_path / "classes.txt"))
    assert data.classes == ["wave", "jump"]
    records, errors = data.records()
    assert errors == []
    assert [(r.source, r.label, r.label_name) for r in records] == [
        (str(media / "videos/jump_01.mp4"), 1, "jump"),
        (str(media / "frames/wave_01"), 0, "wave"),
        (str(media / "videos/run_01.mp4"), 1, "jump"),
    ]


def test_manifest_integer_labels_sort_numerically(tmp_path):
    csv = write_manifest(tmp_path, ["path,label", "a.mp4,10", "b.mp4,9", "c.mp4,100"])
    data = Manifest(str(csv))
    assert data.classes == ["9", "10", "100"]
    assert [r.label for r in data.records()[0]] == [1, 0, 2]


def test_manifest_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        Manifest(str(tmp_path / "nope.csv"))
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['path'\]"):
        Manifest(str(write_manifest(tmp_path, ["file,label", "a.mp4,x"])))
    csv = write_manifest(tmp_path, ["path,label", "a.mp4,x"], name="ok.csv")
    with pytest.raises(DatasetError, match="class file not found"):
        Manifest(str(csv), classes=str(tmp_path / "classes.txt"))


# ------------------------------------------------------------------------------------------------ index
def index_manifest(tmp_path, csv, *overrides):
    rows, _, run_dir = run_index(
        tmp_path, ["dataset=manifest", f"dataset.csv={csv}", "sampler.clip_len=4", "sampler.frame_stride=2", *overrides]
    )
    return rows, run_dir


def test_index_manifest_segments(media, tmp_path):
    csv = write_manifest(
        tmp_path,
        [
            HEADER,
            f"{media}/videos/jump_01.mp4,jump,,,0.5,1.2,,",  # 30 fps: frames [15, 36)
            f"{media}/frames/wave_01,wave,4,12,,,,",  # frames [4, 12)
            f"{media}/videos/run_01.mp4,run,,,,,,",  # the whole video
        ],
    )
    rows, run_dir = index_manifest(tmp_path, csv, "dataset.fps=50")
    assert len(read_failures(run_dir)) == 0
    got = {r.clip_id: (list(r.frame_indices), r.start_frame, r.end_frame, r.fps) for r in rows.itertuples()}
    assert got == {
        "jump_01/0.5s-1.2s:000022": ([22, 24, 26, 28], 15, 36, 30.0),  # 15 + (21 - 7) // 2
        "wave_01/4-12:000004": ([4, 6, 8, 10], 4, 12, 50.0),  # frame folder: fps from the config
        "run_01:000016": ([16, 18, 20, 22], 0, 40, 25.0),
    }
    for row in rows.itertuples():
        assert [read_barcode(f) for f in read_frames(row.source, row.frame_indices)] == list(row.frame_indices)


def test_every_bad_input_is_a_failure_row(media, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    data = (media / "videos" / "jump_01.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (bad / "garbage.avi").write_bytes(bytes(range(256)) * 40)
    folder = bad / "broken_frames"
    write_frame_folder(folder, barcode_frames(12, seed=4))
    (folder / "frame_0000000005.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (tmp_path / "classes.txt").write_text("jump\nrun\nwave\n")
    csv = write_manifest(
        tmp_path,
        [
            "path,label,start_frame,end_frame",
            f"{media}/videos/jump_01.mp4,jump,,",  # 2: fine
            f"{bad}/missing.mp4,jump,,",  # 3: missing file
            f"{bad}/empty.mp4,jump,,",  # 4: zero bytes
            f"{bad}/truncated.mp4,jump,,",  # 5: truncated
            f"{bad}/garbage.avi,jump,,",  # 6: not a video
            f"{media}/videos/run_01.mp4,run,30,80",  # 7: beyond the video's 40 frames
            f"{media}/videos/run_01.mp4,run,20,10",  # 8: stops before it starts
            f"{media}/videos/run_01.mp4,run,x,10",  # 9: malformed row
            f"{media}/videos/run_01.mp4,swim,,",  # 10: class not in the class file
            f"{folder},wave,,",  # 11: a frame folder with an unreadable JPEG
            f"{media}/videos/run_01.mp4,run,,,extra",  # 12: more fields than the header
        ],
    )
    rows, run_dir = index_manifest(tmp_path, csv, f"dataset.classes={tmp_path / 'classes.txt'}")
    assert sorted(rows["video_id"]) == ["broken_frames", "jump_01"]
    failures = read_failures(run_dir)
    by_source = {
        Path(s).name: (e, m) for s, e, m in zip(failures["source"], failures["error_type"], failures["message"])
    }
    assert by_source["missing.mp4"] == ("VideoError", f"{bad}/missing.mp4: no such file")
    assert by_source["empty.mp4"] == ("VideoError", f"{bad}/empty.mp4: file is empty (0 bytes)")
    assert by_source["truncated.mp4"][0] == "VideoError" and by_source["truncated.mp4"][1].startswith(
        f"{bad}/truncated.mp4: "
    )
    assert (
        by_source["garbage.avi"][0] == "VideoError" and "garbage.avi: cannot be opened" in by_source["garbage.avi"][1]
    )
    rows_by_line = {
        s: (e, m)
        for s, e, m in zip(failures["clip_id"], failures["error_type"], failures["message"])
        if s.startswith("manifest.csv:")
    }
    assert (
        rows_by_line["manifest.csv:8"][0] == "FrameRangeError"
        and "before its start" in rows_by_line["manifest.csv:8"][1]
    )
    assert rows_by_line["manifest.csv:9"] == ("MalformedRow", "manifest.csv:9: start_frame must be an integer, got 'x'")
    assert rows_by_line["manifest.csv:10"][0] == "UnknownClass" and "'swim'" in rows_by_line["manifest.csv:10"][1]
    assert rows_by_line["manifest.csv:12"][0] == "MalformedRow"
    beyond = failures[failures["error_type"] == "FrameRangeError"]["message"].tolist()
    assert any("run_01.mp4: frames [30, 80) lie beyond the video's 40 frames" in m for m in beyond)
    assert len(failures) == 9

    # the unreadable JPEG is found when the clip is decoded: a failure item naming the file, the batch goes on
    items = [ClipDataset(rows, ResizeCrop(32, (32, 32)))[i] for i in range(len(rows))]
    batch = collate_clips(items)
    assert batch.video.shape[0] == 1
    [(position, error_type, message)] = batch.failures
    assert rows.iloc[position]["video_id"] == "broken_frames" and error_type == "VideoError"
    assert "frame_0000000005.jpg: unreadable JPEG" in message

    console = Console(record=True, width=200)
    summary.show(run_dir, {}, 1.0, console=console)
    text = console.export_text()
    assert "9 failures" in text and "index/VideoError: 4" in text and "index/MalformedRow: 2" in text


def test_an_unknown_column_is_a_warning_with_the_likely_one(media, tmp_path, caplog):
    """A misspelled ``label`` column would drop every label silently: the reader names it and the column meant."""
    csv = write_manifest(tmp_path, ["path,lable,notes", f"{media}/videos/run_01.mp4,run,first take"])
    with caplog.at_level("WARNING"):
        records, _ = Manifest(str(csv)).records()
    assert records[0].label is None  # the column is not read
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2
    assert f"{csv}: column 'lable' is not read and is ignored (did you mean 'label'?" in warned[0]
    assert "known columns: ['path', 'label', 'start_frame'" in warned[0]
    assert "'notes' is not read" in warned[1] and "did you mean" not in warned[1]
    caplog.clear()
    Manifest(str(write_manifest(tmp_path, [HEADER, f"{media}/videos/run_01.mp4,run,,,,,,"], "ok.csv"))).records()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
