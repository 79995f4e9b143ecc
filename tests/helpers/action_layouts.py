"""Kinetics, Something-Something v2, HMDB-51 and class-folder datasets in their published layouts, written with
real videos (H.264 MP4 and MKV, VP9 WebM, MPEG-4 AVI), each with bad entries of every kind: a missing video, an
empty (0-byte) one, a truncated one, a corrupt one, an unknown class and a malformed line. Paths hold spaces and
non-ASCII letters. Every layout returns which entries are good and which are bad (and why)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.layouts import barcode_frames, write_avi, write_csv
from pipeline.data.video import write_video

#: VP9 as fast as libvpx goes (a keyframe every 12 frames, so that seeking has somewhere to land)
VP9 = {"codec": "libvpx-vp9", "g": "12", "deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}


@dataclass
class Layout:
    """A dataset written for a test: its settings, and its entries that must explain and must fail."""

    overrides: list[str]
    good: dict[str, str] = field(default_factory=dict)  # video id -> class name (None: no label)
    bad: dict[str, str] = field(default_factory=dict)  # the name a failure row must carry -> its error type
    root: Path | None = None  # the videos' folder
    annotations: Path | None = None  # the annotation file or folder


def quoted(path: Path) -> str:
    """A path as a Hydra override value: quoted, so that spaces and other characters survive the parser."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_webm(path: Path, frames: np.ndarray, fps: float) -> None:
    write_video(path, frames, fps=fps, **VP9)


def truncate(source: Path, target: Path, keep: float = 0.4) -> None:
    """``target``: the first ``keep`` of ``source``'s bytes (a download stopped midway)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])


def garbage(target: Path, seed: int = 0) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8)))


def empty(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"")


# ------------------------------------------------------------------------------------------------ Kinetics
KINETICS_HEADER = ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"]


def make_kinetics(base: Path, frames: int = 20) -> Layout:
    """A Kinetics-400 validation CSV as released (with its extra ``is_cc`` column) and clips as the downloaders
    name them: flat, in a label folder as written (spaces, an apostrophe), in a folder with ``_`` for spaces."""
    root = base / "kinetics 400 vidéos"
    clips = [  # label, youtube id, start, end, folder ("" = flat), container
        ("abseiling", "-aBc123_xy0", 10, 20, "", ".mp4"),
        ("air drumming", "Zz9_-qWErt1", 0, 10, "air drumming", ".webm"),
        ("passing American football (in game)", "pAf_0001xyz", 30, 40, "passing_American_football_(in_game)", ".mkv"),
        ("massaging person's head", "mPh5sE-Ad0k", 5, 15, "massaging person's head", ".mp4"),
    ]
    layout = Layout(overrides=[], root=root)
    rows = []
    for k, (label, youtube_id, start, end, folder, suffix) in enumerate(clips):
        path = root / folder / f"{youtube_id}_{start:06d}_{end:06d}{suffix}"
        images = barcode_frames(frames + 4 * k, seed=k)
        if suffix == ".webm":
            write_webm(path, images, 30)
        else:
            write_video(path, images, fps=25 + 5 * (k % 2))
        rows.append([label, youtube_id, start, end, "val", 0])
        layout.good[youtube_id] = label
    webm = next(root.glob("air drumming/*.webm"))
    bad = [  # label, youtube id, how it is broken, error type
        ("abseiling", "missing0001", None, "MissingVideo"),
        ("applauding", "empty000001", empty, "VideoError"),
        ("air drumming", "truncated01", lambda p: truncate(webm, p), "VideoError"),
        ("applauding", "corrupt0001", garbage, "VideoError"),
    ]
    for label, youtube_id, breaks, error in bad:
        if breaks is not None:
            folder = "" if label == "applauding" else label
            suffix = ".webm" if label == "air drumming" else ".mp4"
            breaks(root / folder / f"{youtube_id}_000000_000010{suffix}")
        rows.append([label, youtube_id, 0, 10, "val", 0])
        layout.bad[youtube_id] = error
    rows.append(["abseiling", "badTimes001", "abc", 10, "val", 0])
    layout.bad["badTimes001"] = "MalformedRow"
    rows.append(["abseiling", "train000001", 0, 10, "train", 0])  # another split: not read with split=val
    csv = layout.annotations = base / "annotations" / "validate.csv"
    write_csv(csv, KINETICS_HEADER, rows)
    layout.overrides = [
        "dataset=kinetics",
        f"dataset.csv={quoted(csv)}",
        f"dataset.root={quoted(root)}",
        "dataset.split=val",
    ]
    return layout


# ------------------------------------------------------------------------------------------------ SSv2
SSV2_CLASSES = [
    "Approaching something with your camera",
    "Holding something next to something",
    "Pushing something from left to right",
    "Putting something on a surface",
]


def ssv2_entry(video_id: str, template: str, objects: list[str]) -> dict:
    """One entry of the train / validation JSON as released."""
    label = template
    for name in objects:
        label = label.replace(label[label.index("[") : label.index("]") + 1], name, 1)
    return {"id": video_id, "label": label.lower(), "template": template, "placeholders": objects}


def make_ssv2(base: Path, frames: int = 24) -> Layout:
    """``labels.json``, the three split files and ``<id>.webm`` VP9 videos at 12 fps (SSv2's rate)."""
    annotations, root = base / "labels", base / "20bn-something-something-v2 ü"
    annotations.mkdir(parents=True, exist_ok=True)
    (annotations / "labels.json").write_text(json.dumps({name: str(i) for i, name in enumerate(SSV2_CLASSES)}))
    good = [
        ("101", "Approaching [something] with your camera", ["a mug"]),
        ("102", "Holding [something] next to [something]", ["potato", "vicks vaporub bottle"]),
        ("103", "Pushing [something] from left to right", ["a pen"]),
        ("104", "Putting [something] on a surface", ["a phone"]),
    ]
    layout = Layout(overrides=[], root=root, annotations=annotations)
    for k, (video_id, template, _) in enumerate(good):
        write_webm(root / f"{video_id}.webm", barcode_frames(frames + 6 * k, seed=10 + k), 12)
        layout.good[video_id] = template.replace("[", "").replace("]", "")
    empty(root / "106.webm")
    truncate(root / "104.webm", root / "107.webm")
    garbage(root / "109.webm")
    bad = [
        ssv2_entry("105", "Putting [something] on a surface", ["a cup"]),  # no video
        ssv2_entry("106", "Putting [something] on a surface", ["a box"]),  # 0 bytes
        ssv2_entry("107", "Pushing [something] from left to right", ["a box"]),  # truncated
        ssv2_entry("108", "Spinning [something] so it continues spinning", ["a top"]),  # not in labels.json
        ssv2_entry("109", "Holding [something] next to [something]", ["a", "b"]),  # corrupt
    ]
    layout.bad = {"105": "VideoError", "106": "VideoError", "107": "VideoError", "108": "UnknownClass"}
    layout.bad["109"] = "VideoError"
    validation = [ssv2_entry(*entry) for entry in good] + bad + [{"label": "an entry without an id"}]
    layout.bad["something-something-v2-validation.json[9]"] = "MalformedRow"
    (annotations / "something-something-v2-validation.json").write_text(json.dumps(validation))
    (annotations / "something-something-v2-train.json").write_text(json.dumps([ssv2_entry(*good[1])]))
    (annotations / "something-something-v2-test.json").write_text(json.dumps([{"id": "101"}, {"id": "103"}]))
    layout.overrides = [
        "dataset=ssv2",
        f"dataset.root={quoted(root)}",
        f"dataset.annotations_dir={quoted(annotations)}",
    ]
    return layout


# ------------------------------------------------------------------------------------------------ HMDB-51
HMDB_CLASSES = ["brush_hair", "cartwheel", "chew"]


def make_hmdb51(base: Path, frames: int = 24) -> Layout:
    """``<class>/<video>.avi`` (MPEG-4 Part 2, as HMDB ships) and ``testTrainMulti_7030_splits`` with split 1.

    Split 1, test (2): every good video, and the bad ones; train (1) and unused (0) lines are also there.
    """
    root, splits = base / "hmdb 51", base / "testTrainMulti_7030_splits"
    good = {
        "brush_hair": [
            "April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
            "Brushing_Hair_with_Beautiful_Ümlaut_f_nm_np1_ri_med_1.avi",
        ],
        "cartwheel": ["(Rad)Schlagen_cartwheel_f_cm_np1_le_med_0.avi"],
        "chew": ["Chewing Gum_chew_h_nm_np1_fr_med_2.avi"],
    }
    layout = Layout(overrides=[], root=root, annotations=splits)
    for k, (name, files) in enumerate((c, f) for c, f in good.items()):
        for j, file in enumerate(files):
            write_avi(root / name / file, barcode_frames(frames + 5 * j, seed=20 + k), 30.0, audio=False)
            layout.good[Path(file).stem] = name
    truncate(root / "chew" / good["chew"][0], root / "chew" / "truncated_chew_h_nm_np1_fr_bad_3.avi", 0.5)
    empty(root / "cartwheel" / "empty_cartwheel_f_cm_np1_le_bad_4.avi")
    garbage(root / "brush_hair" / "corrupt_brush_hair_u_nm_np1_ba_bad_5.avi")
    broken = {
        "brush_hair": ["missing_brush_hair_u_nm_np1_ba_goo_9.avi", "corrupt_brush_hair_u_nm_np1_ba_bad_5.avi"],
        "cartwheel": ["empty_cartwheel_f_cm_np1_le_bad_4.avi"],
        "chew": ["truncated_chew_h_nm_np1_fr_bad_3.avi"],
    }
    for files in broken.values():
        layout.bad.update({Path(f).stem: "VideoError" for f in files})
    splits.mkdir(parents=True, exist_ok=True)
    for name in HMDB_CLASSES:
        lines = [f"{f} 2 " for f in good[name] + broken[name]]  # the release's trailing space kept
        lines += [f"train_only_{name}_0.avi 1 ", f"unused_{name}_0.avi 0 "]
        if name == "chew":
            lines.append("Chewing_badline_chew_0.avi 7")
            layout.bad["chew_test_split1.txt:5"] = "MalformedRow"
        (splits / f"{name}_test_split1.txt").write_text("\n".join(lines) + "\n")
        (splits / f"{name}_test_split2.txt").write_text(f"{good[name][0]} 1 \n")
    layout.overrides = [
        "dataset=hmdb51",
        f"dataset.root={quoted(root)}",
        f"dataset.splits_dir={quoted(splits)}",
        "dataset.split_id=1",
    ]
    return layout


# ------------------------------------------------------------------------------------------------ folders
def make_class_folders(base: Path, frames: int = 24) -> Layout:
    """``<root>/<class>/<video>``: two classes (one named with a space and a non-ASCII letter), MP4 and WebM,
    a text file that is no video, an empty and a corrupt video."""
    root = base / "my clips"
    layout = Layout(overrides=[], root=root)
    write_video(root / "jump" / "garden 01.mp4", barcode_frames(frames, seed=30), fps=25)
    write_webm(root / "jump" / "beach_02.webm", barcode_frames(frames + 6, seed=31), 30)
    write_video(root / "run fast ü" / "träck.mp4", barcode_frames(frames + 2, seed=32), fps=25)
    layout.good = {"jump/garden 01": "jump", "jump/beach_02": "jump", "run fast ü/träck": "run fast ü"}
    (root / "jump" / "notes.txt").write_text("not a video\n")
    (root / "empty folder").mkdir()
    empty(root / "jump" / "empty.mp4")
    garbage(root / "run fast ü" / "corrupt.mkv")
    layout.bad = {"jump/empty": "VideoError", "run fast ü/corrupt": "VideoError"}
    layout.overrides = ["dataset=folder", f"dataset.root={quoted(root)}"]
    return layout


def make_flat_folder(base: Path, frames: int = 24) -> Layout:
    """A flat folder of videos, no labels."""
    root = base / "unlabelled ü"
    write_video(root / "a.mp4", barcode_frames(frames, seed=40), fps=25)
    write_webm(root / "b c.webm", barcode_frames(frames, seed=41), 12)
    return Layout(
        overrides=["dataset=folder", f"dataset.root={quoted(root)}"], good={"a": None, "b c": None}, root=root
    )


# ------------------------------------------------------------------------------------------------ checks
def assert_failures_name_every_bad_entry(failures, layout: Layout, stages=("index",)) -> None:
    """One failure row per bad entry, named by it (``clip_id``), of the expected type; nothing else failed."""
    failures = failures[failures["stage"].isin(stages)]
    got = {row.clip_id: row.error_type for row in failures.itertuples()}
    assert got == layout.bad, failures[["clip_id", "error_type", "message"]].to_string()
    for row in failures.itertuples():  # the message names the entry too (its file or its id)
        assert row.clip_id.split("/")[-1].split("[")[0].split(":")[0] in row.message, row.message


def assert_index_holds_every_good_entry(rows, layout: Layout) -> None:
    assert set(rows["video_id"]) == set(layout.good), sorted(rows["video_id"])
    for row in rows.drop_duplicates("video_id").itertuples():
        expected = layout.good[row.video_id]
        assert (row.label_name == expected) if expected is not None else pd.isna(row.label_name)
        assert pd.isna(row.label) == (expected is None)
        assert Path(row.source).is_file()


def assert_every_good_entry_has_tubes(run_dir: Path, layout: Layout) -> None:
    from pipeline.store import read_failures, read_index, read_tubes

    index, _ = read_index(run_dir)
    tubes = read_tubes(run_dir, columns=["clip_id", "video_id", "volume"])
    assert set(tubes["video_id"]) == set(layout.good) and set(tubes["clip_id"]) == set(index["clip_id"])
    assert all(np.isfinite(v).all() and v.size for v in tubes["volume"])
    assert_failures_name_every_bad_entry(read_failures(run_dir), layout, stages=("index", "extract"))
    assert (run_dir / "report" / "index.html").is_file()
