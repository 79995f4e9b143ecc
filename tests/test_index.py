"""Probing on Dask and its cache; index stage internals: shard balance, clip ids, sampler failures."""

import math
import os

import numpy as np
import pytest
from dask.distributed import Client, LocalCluster

from helpers.layouts import barcode_frames, write_frame_folder
from pipeline.data import probing
from pipeline.data.clip_index import assign_shards, build_clips
from pipeline.data.datasets.base import VideoRecord
from pipeline.data.sampling import SlidingSampler
from pipeline.data.video import VideoError, VideoInfo, probe, write_video


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    paths = []
    for k in range(5):
        path = root / f"v{k}.mp4"
        write_video(path, barcode_frames(10 + k, seed=k), fps=25)
        paths.append(str(path))
    write_frame_folder(root / "frames", barcode_frames(7))
    (root / "empty.mp4").write_bytes(b"")
    return paths + [str(root / "frames"), str(root / "empty.mp4"), str(root / "missing.mp4")]


def same(a, b):
    """Equal probe results (NaN fps included) or equal errors."""
    return type(a) is type(b) and repr(a) == repr(b)


def test_probe_on_dask_matches_probing_here(sources):
    serial = probing.probe_all(sources, progress=False)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        parallel = probing.probe_all(sources + sources[:2], client=client, progress=False, batch_size=3)
    assert list(parallel) == sources  # distinct sources, in order
    assert all(same(serial[s], parallel[s]) for s in sources)
    assert serial[sources[0]].num_frames == 10 and serial[sources[4]].num_frames == 14
    assert serial[sources[5]].codec == "jpeg" and serial[sources[5]].num_frames == 7
    assert isinstance(serial[sources[6]], VideoError) and isinstance(serial[sources[7]], VideoError)


def test_probe_cache_skips_unchanged_files(sources, tmp_path, monkeypatch):
    cache = tmp_path / "probes.parquet"
    first = probing.probe_all(sources, progress=False, cache=cache)
    calls = []
    monkeypatch.setattr(probing, "probe", lambda s: calls.append(s) or probe(s))
    again = probing.probe_all(sources, progress=False, cache=cache)
    assert calls == [sources[-1]]  # only the missing file (nothing to key a cache entry on) is looked at again
    assert all(same(first[s], again[s]) for s in sources)
    # a rewritten file is probed again, and the new result replaces the old one
    write_video(sources[0], barcode_frames(13), fps=25)
    os.utime(sources[0], ns=(1, 1))
    calls.clear()
    changed = probing.probe_all(sources, progress=False, cache=cache)
    assert calls == [sources[0], sources[-1]]
    assert changed[sources[0]].num_frames == 13


def test_shards_balanced_by_clip_count():
    shards = assign_shards(10, 4)
    assert np.bincount(shards).tolist() == [4, 3, 3]
    assert (np.diff(shards) >= 0).all()
    assert assign_shards(0, 4).tolist() == []
    with pytest.raises(ValueError):
        assign_shards(5, 0)


def test_clip_ids_are_stable_and_unique():
    info = VideoInfo(num_frames=40, fps=25.0, width=64, height=48, codec="h264", duration=1.6)
    records = [
        VideoRecord("P01_01", "a.mp4", 0, "x", "train", 0, 20, segment_id="P01_01_0"),
        VideoRecord("P01_01", "a.mp4", 1, "y", "train", 10, 30, segment_id="P01_01_1"),  # overlaps the first
        VideoRecord("v_b", "b.mp4", None, None, "test"),
    ]
    probes = {"a.mp4": info, "b.mp4": info}
    sampler = SlidingSampler(4, frame_stride=2, clip_stride=5)
    first, failures = build_clips(records, probes, sampler)
    again, _ = build_clips(records, probes, sampler)
    assert failures == [] and first["clip_id"].tolist() == again["clip_id"].tolist()
    assert first["clip_id"].is_unique
    assert first["clip_id"].tolist() == [
        "P01_01_0:000000",
        "P01_01_0:000005",
        "P01_01_0:000010",
        "P01_01_0:000013",
        "P01_01_1:000010",
        "P01_01_1:000015",
        "P01_01_1:000020",
        "P01_01_1:000023",
        "v_b:000000",
        "v_b:000005",
        "v_b:000010",
        "v_b:000015",
        "v_b:000020",
        "v_b:000025",
        "v_b:000030",
        "v_b:000033",
    ]
    assert (first["video_id"] == ["P01_01"] * 8 + ["v_b"] * 8).all()


def test_frame_folder_without_fps_and_target_fps_is_a_failure_row():
    info = VideoInfo(num_frames=40, fps=math.nan, width=64, height=48, codec="jpeg")
    records = [VideoRecord("f", "frames/f", 0, "x", "train"), VideoRecord("g", "frames/g", 0, "x", "train", fps=50.0)]
    rows, failures = build_clips(records, {"frames/f": info, "frames/g": info}, SlidingSampler(2, target_fps=25))
    assert rows["video_id"].unique().tolist() == ["g"] and rows["fps"].unique().tolist() == [50.0]
    assert [(f.clip_id, f.error_type) for f in failures] == [("f", "SamplingError")]
    assert "frame rate" in failures[0].message and "frames/f" in failures[0].message


def test_time_ranges_read_without_none():
    """A segment past the video's end, in seconds or frames, open-ended or not: the message says where and why."""
    info = VideoInfo(num_frames=16, fps=25.0, width=64, height=48, codec="h264", duration=0.64)
    records = [
        VideoRecord("a", "a.mp4", 0, "x", "train", start_sec=100.0),  # from 100 s to the end
        VideoRecord("b", "b.mp4", 0, "x", "train", start_sec=0.2, end_sec=2.0),  # ends after the video
        VideoRecord("c", "c.mp4", 0, "x", "train", 20, None),  # from frame 20 to the end
    ]
    _, failures = build_clips(records, {f"{n}.mp4": info for n in "abc"}, SlidingSampler(2))
    messages = {f.source: f.message for f in failures}
    assert messages == {
        "a.mp4": "a.mp4: [100s, end) = frames [2500, end) start at or after the end of the video (16 frames, 0.64s)",
        "b.mp4": "b.mp4: [0.2s, 2s) = frames [5, 50) lie beyond the video's 16 frames, 0.64s",
        "c.mp4": "c.mp4: frames [20, end) start at or after the end of the video (16 frames, 0.64s)",
    }
    assert not any("None" in m for m in messages.values())
