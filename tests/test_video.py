from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from pipeline.data.resize import ResizeCrop, source_to_input
from pipeline.data.video import VideoError, frame_file, probe, read_frames, write_video

NUM_FRAMES = 12
HEIGHT, WIDTH = 48, 64


def level(i):
    """Grey level that identifies frame i (far enough apart to survive lossy coding)."""
    return 10 + 20 * i


def indexed_frames(n=NUM_FRAMES, height=HEIGHT, width=WIDTH):
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = level(i)
    return frames


def decode_all(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    mp4, avi, mkv = root / "clip.mp4", root / "clip.avi", root / "clip.mkv"
    write_video(mp4, indexed_frames(), fps=25)
    write_video(avi, indexed_frames(), fps=12.5, codec="mpeg4")
    write_video(mkv, indexed_frames(7), fps=30)
    return {"mp4": mp4, "avi": avi, "mkv": mkv}


# ------------------------------------------------------------------------------------------------ probe
def test_probe_mp4(videos):
    info = probe(videos["mp4"])
    assert info.num_frames == NUM_FRAMES
    assert info.fps == pytest.approx(25.0)
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.codec == "h264"


def test_probe_avi_mpeg4(videos):
    info = probe(videos["avi"])
    assert info.num_frames == NUM_FRAMES
    assert info.fps == pytest.approx(12.5)
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.codec == "mpeg4"


def test_probe_counts_packets_when_container_has_no_frame_count(videos):
    with av.open(str(videos["mkv"])) as container:
        stored = container.streams.video[0].frames
    if stored > 0:
        pytest.skip("this FFmpeg build stores a frame count in Matroska")
    info = probe(videos["mkv"])
    assert info.num_frames == 7
    assert info.fps == pytest.approx(30.0)


def test_probe_accepts_str_path(videos):
    assert probe(str(videos["mp4"])).num_frames == NUM_FRAMES


# ------------------------------------------------------------------------------------------------ read_frames
@pytest.mark.parametrize("kind", ["mp4", "avi"])
def test_decoded_frames_identify_their_index(videos, kind):
    decoded = decode_all(videos[kind])
    assert len(decoded) == NUM_FRAMES
    for i, frame in enumerate(decoded):
        assert abs(float(frame.mean()) - level(i)) < 5


@pytest.mark.parametrize("kind", ["mp4", "avi"])
@pytest.mark.parametrize("indices", [[0], [5], [NUM_FRAMES - 1], [0, 3, 6, 9], [9, 2, 7, 0], [4, 4, 1, 4], [11, 0, 11]])
def test_read_frames_matches_full_decode(videos, kind, indices):
    reference = decode_all(videos[kind])
    got = read_frames(videos[kind], indices)
    assert got.dtype == np.uint8
    assert got.shape == (len(indices), HEIGHT, WIDTH, 3)
    for row, index in zip(got, indices):
        assert np.array_equal(row, reference[index])


def test_read_frames_accepts_numpy_indices(videos):
    reference = decode_all(videos["mp4"])
    got = read_frames(videos["mp4"], np.array([8, 3], dtype=np.int32))
    assert np.array_equal(got[0], reference[8])
    assert np.array_equal(got[1], reference[3])


def test_read_frames_out_of_range(videos):
    with pytest.raises(VideoError) as err:
        read_frames(videos["mp4"], [0, NUM_FRAMES])
    assert str(videos["mp4"]) in str(err.value)


def test_read_frames_negative_index(videos):
    with pytest.raises(VideoError) as err:
        read_frames(videos["mp4"], [2, -1])
    assert str(videos["mp4"]) in str(err.value)


def test_read_frames_no_indices(videos):
    with pytest.raises(VideoError):
        read_frames(videos["mp4"], [])


# ------------------------------------------------------------------------------------------------ broken files
def make_bad_file(kind, tmp_path, videos):
    path = tmp_path / f"{kind}.mp4"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    elif kind == "truncated":
        data = videos["mp4"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


BAD_KINDS = ["missing", "empty", "garbage", "truncated"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_probe_bad_file_raises_video_error(tmp_path, videos, kind):
    path = make_bad_file(kind, tmp_path, videos)
    with pytest.raises(VideoError) as err:
        probe(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_read_frames_bad_file_raises_video_error(tmp_path, videos, kind):
    path = make_bad_file(kind, tmp_path, videos)
    with pytest.raises(VideoError) as err:
        read_frames(path, [0])
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------------ ResizeCrop
def test_resize_crop_shape_and_range():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(5, 96, 128, 3), dtype=np.uint8)
    out = ResizeCrop(64, (64, 64))(frames)
    assert out.shape == (3, 5, 64, 64)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_resize_crop_non_square_output():
    frames = np.zeros((2, 120, 160, 3), dtype=np.uint8)
    out = ResizeCrop(60, (48, 56))(frames)
    assert out.shape == (3, 2, 48, 56)


def test_crop_box_landscape_with_rounding():
    # 128x96 (w x h), short side 64: scale 2/3, resized to 64 x round(85.33) = 85 columns;
    # centre crop of 64 starts at column (85 - 64) // 2 = 10; one resized column is 128/85 source pixels.
    box = ResizeCrop(64, (64, 64)).crop_box(96, 128)
    assert box == pytest.approx([10 * 128 / 85, 0.0, 74 * 128 / 85, 96.0])
    # close to the ideal centred square [16, 0, 112, 96]
    assert box == pytest.approx([16.0, 0.0, 112.0, 96.0], abs=1.0)


def test_crop_box_exact_scale():
    # 128x96 halved to 64x48, centre 48x48 crop starts at resized column 8 -> source 16
    assert ResizeCrop(48, (48, 48)).crop_box(96, 128) == pytest.approx([16.0, 0.0, 112.0, 96.0])
    # portrait 96x128 (w x h): crop is vertical
    assert ResizeCrop(48, (48, 48)).crop_box(128, 96) == pytest.approx([0.0, 16.0, 96.0, 112.0])
    # 160x120 halved to 80x60, 48x48 crop at top 6, left 16 -> source [32, 12, 128, 108]
    assert ResizeCrop(60, (48, 48)).crop_box(120, 160) == pytest.approx([32.0, 12.0, 128.0, 108.0])


def test_resize_crop_without_resize_is_a_plain_crop():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, size=(3, 96, 128, 3), dtype=np.uint8)
    out = ResizeCrop(96, (96, 96))(frames)
    expected = torch.from_numpy(frames[:, :, 16:112].astype(np.float32) / 255.0).permute(3, 0, 1, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    assert ResizeCrop(96, (96, 96)).crop_box(96, 128) == pytest.approx([16.0, 0.0, 112.0, 96.0])


def test_resize_crop_keeps_a_flat_grey():
    frames = np.full((1, 96, 128, 3), 137, dtype=np.uint8)
    out = ResizeCrop(64, (64, 64))(frames)
    assert torch.allclose(out, torch.full_like(out, 137 / 255.0), atol=1e-5)


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bilinear resampling written out: output pixel i averages the source pixels under a triangle
    centred on its own centre, widened by the scale when shrinking; each row sums to one."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    centres = (np.arange(n_out)[:, None] + 0.5) * scale
    weights = np.clip(1 - np.abs(np.arange(n_in)[None, :] + 0.5 - centres) / width, 0, None)
    return weights / weights.sum(1, keepdims=True)


@pytest.mark.parametrize("height,width,short_side", [(96, 128, 64), (120, 160, 112), (48, 64, 64)])
def test_resize_matches_triangle_filter_by_hand(height, width, short_side):
    """Frames are resized as uint8: within one level of the exact antialiased resize rounded, on the CPU's
    integer kernel and on the float kernel other devices use."""
    from pipeline.data.resize import _resize_float, _resize_integer

    frames = np.random.default_rng(3).integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
    transform = ResizeCrop(short_side, (short_side, short_side))
    new_h, new_w, top, left = transform._geometry(height, width)
    wy, wx = _triangle_weights(height, new_h), _triangle_weights(width, new_w)
    exact = np.einsum("yh,thwc,xw->tcyx", wy, frames.astype(np.float64), wx)
    chw = torch.from_numpy(frames).permute(0, 3, 1, 2)
    for resize in (_resize_integer, _resize_float):
        out = resize(chw, (new_h, new_w))
        assert out.dtype == torch.uint8
        assert np.abs(out.numpy().astype(np.float64) - exact).max() <= 1 + 1e-6
    crop = exact[:, :, top : top + short_side, left : left + short_side].round() / 255
    assert np.abs(transform(frames).numpy() - crop.transpose(1, 0, 2, 3)).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    "short_side,size,height,width,block",
    [
        (60, (48, 48), 120, 160, (100, 30, 108, 38)),  # x0, y0, x1, y1 (exclusive) in source pixels
        (64, (64, 64), 96, 128, (84, 60, 96, 72)),
        (48, (40, 40), 128, 96, (30, 70, 42, 82)),
    ],
)
def test_bright_block_lands_where_crop_box_predicts(short_side, size, height, width, block):
    bx0, by0, bx1, by1 = block
    frames = np.zeros((1, height, width, 3), dtype=np.uint8)
    frames[0, by0:by1, bx0:bx1] = 255
    transform = ResizeCrop(short_side, size)
    box = transform.crop_box(height, width)
    out = transform(frames)[:, 0].mean(0).numpy()  # (h, w)

    # expected block in input pixels, computed by hand from the crop box
    sx, sy = size[1] / (box[2] - box[0]), size[0] / (box[3] - box[1])
    ex0, ex1 = (bx0 - box[0]) * sx, (bx1 - box[0]) * sx
    ey0, ey1 = (by0 - box[1]) * sy, (by1 - box[1]) * sy

    # intensity centroid (pixel centres at i + 0.5) sits at the block's centre
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]]
    total = out.sum()
    assert (cols + 0.5).ravel() @ out.ravel() / total == pytest.approx((ex0 + ex1) / 2, abs=0.5)
    assert (rows + 0.5).ravel() @ out.ravel() / total == pytest.approx((ey0 + ey1) / 2, abs=0.5)
    # the clearly bright pixels lie inside the predicted block
    ys, xs = np.nonzero(out > 0.5)
    assert len(xs) > 0
    assert xs.min() >= ex0 - 1 and xs.max() + 1 <= ex1 + 1
    assert ys.min() >= ey0 - 1 and ys.max() + 1 <= ey1 + 1


# ------------------------------------------------------------------------------------------------ source_to_input
def test_source_to_input_maps_crop_corners():
    crop = [10 * 128 / 85, 0.0, 74 * 128 / 85, 96.0]
    out = source_to_input(np.array([crop]), crop, (64, 64))
    assert out == pytest.approx(np.array([[0.0, 0.0, 64.0, 64.0]]))


def test_source_to_input_by_hand():
    crop = [32.0, 12.0, 128.0, 108.0]  # 96x96 source region onto 48x48 input: half scale
    boxes = np.array([[[32.0, 12.0, 128.0, 108.0], [100.0, 30.0, 108.0, 38.0]]])  # extra leading dim
    out = source_to_input(boxes, crop, (48, 48))
    assert out.shape == boxes.shape
    assert out[0, 0] == pytest.approx([0.0, 0.0, 48.0, 48.0])
    assert out[0, 1] == pytest.approx([34.0, 9.0, 38.0, 13.0])
    # input untouched
    assert boxes[0, 1, 0] == 100.0


def test_source_to_input_non_square_input():
    crop = [0.0, 20.0, 160.0, 100.0]  # 160x80 region onto 40 high, 80 wide
    out = source_to_input(np.array([40.0, 60.0, 80.0, 100.0]), crop, (40, 80))
    assert out == pytest.approx([20.0, 20.0, 40.0, 40.0])


# ------------------------------------------------------------------------------------------------ exact seeking
def moving_frames(n, height=72, width=96, seed=0):
    """A textured scene panning one pixel per frame: encoders use P and B frames, every frame is distinct."""
    rng = np.random.default_rng(seed)
    canvas = rng.integers(0, 256, size=(height, width + n, 3), dtype=np.uint8)
    canvas = (canvas.astype(np.float32) * 0.5 + 64).astype(np.uint8)
    return np.stack([canvas[:, i : i + width] for i in range(n)])


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """Longer videos with real GOPs: H.264 with B-frames at 59.94 fps, mpeg4 AVI at 29.97 and 25 fps, VP9 WebM
    (Something-Something v2's and YouTube's codec, millisecond timestamps) at 30 and 29.97 fps, VFR MKV."""
    root = tmp_path_factory.mktemp("long")
    frames = moving_frames(150)
    paths = {
        "h264_5994": root / "P01_01.MP4",
        "mpeg4_2997": root / "v_Archery_g01_c01.avi",
        "mpeg4_25": root / "v_Basketball_g01_c01.avi",
        "vfr": root / "vfr.mkv",
        "vp9_30": root / "78687.webm",
        "vp9_2997": root / "abc_000010_000020.webm",
    }
    write_video(paths["h264_5994"], frames, fps=60000 / 1001, g="24", bf="3", crf="20", preset="veryfast")
    write_video(paths["mpeg4_2997"], frames, fps=30000 / 1001, codec="mpeg4", g="20", bf="2", qscale="3")
    write_video(paths["mpeg4_25"], frames, fps=25, codec="mpeg4", g="12")
    write_video(paths["vfr"], frames[:60], 25, skipped_pts={10, 11, 30})
    vp9 = {"g": "24", "deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
    write_video(paths["vp9_30"], frames, fps=30, codec="libvpx-vp9", **vp9)
    write_video(paths["vp9_2997"], frames, fps=30000 / 1001, codec="libvpx-vp9", **vp9)
    return paths


SEEKABLE = ["h264_5994", "mpeg4_2997", "mpeg4_25", "vp9_30", "vp9_2997"]


def test_long_videos_have_keyframes_between(long_videos):
    for kind in SEEKABLE:
        with av.open(str(long_videos[kind])) as container:
            keys = [p.is_keyframe for p in container.demux(video=0) if p.size]
        assert len(keys) == 150 and 3 <= sum(keys) < 40, kind  # seeking has keyframes to land on, and GOPs


def test_h264_has_b_frames(long_videos):
    with av.open(str(long_videos["h264_5994"])) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    assert any(p.pts != p.dts for p in packets)  # decode order differs from display order
    assert probe(long_videos["h264_5994"]).fps == pytest.approx(60000 / 1001)


def test_webm_vp9_stores_no_frame_count_and_millisecond_timestamps(long_videos):
    """What the seek path meets in SSv2 / Kinetics WebM files: no frame count (every packet's timestamp is
    checked instead) and timestamps rounded to the millisecond (off the 29.97 fps grid by up to 0.015 frame)."""
    for kind in ("vp9_30", "vp9_2997"):
        with av.open(str(long_videos[kind])) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.frames, stream.time_base) == ("vp9", 0, Fraction(1, 1000))
            stamps = sorted(p.pts for p in container.demux(stream) if p.size)
        assert len(stamps) == 150 and probe(long_videos[kind]).num_frames == 150
    assert stamps[7] == round(7 * 1001 / 30)  # 233.57 ms stored as 234


def test_webm_with_a_timestamp_gap_seeks_only_before_it(tmp_path):
    """A VP9 WebM whose timestamps skip one grid step after frame 99: a clip before the gap is found by seeking
    (the packets are checked only up to it), a clip after it by counting from the start; both exact."""
    from pipeline.data.video import _decode_by_timestamp

    path = tmp_path / "gap.webm"
    write_video(path, moving_frames(150), 30, codec="libvpx-vp9", skipped_pts={100}, g="24", deadline="realtime")
    reference = decode_all(path)
    assert len(reference) == 150
    with av.open(str(path)) as container:
        assert _decode_by_timestamp(container, [30, 40]) is not None
    with av.open(str(path)) as container:
        assert _decode_by_timestamp(container, [120, 121]) is None  # frame 120 is at the grid's step 121
    for indices in ([30, 40], [120, 121], [99, 100, 101]):
        got = read_frames(path, indices)
        assert all(np.array_equal(row, reference[i]) for row, i in zip(got, indices)), indices


@pytest.mark.parametrize("kind", SEEKABLE)
def test_seeking_returns_the_pixels_of_a_full_decode(long_videos, kind):
    from pipeline.data.video import _decode_by_timestamp

    reference = decode_all(long_videos[kind])
    assert len(reference) == 150
    clips = [
        [0, 1, 2],
        [23, 24, 25, 26],
        [37],
        [70, 72, 74, 76, 78],
        [149],
        [140, 100, 120, 100],
        list(range(96, 150, 4)),
    ]
    for indices in clips:
        got = read_frames(long_videos[kind], indices)
        for row, index in zip(got, indices):
            assert np.array_equal(row, reference[index]), (kind, index)
        # and the seek path itself was taken (not the counting fallback) and is exact
        with av.open(str(long_videos[kind])) as container:
            found = _decode_by_timestamp(container, sorted(set(indices)))
        if min(indices) > 0:
            assert found is not None, (kind, indices)
            assert all(np.array_equal(found[i], reference[i]) for i in indices)


@pytest.mark.parametrize("kind", ["h264_5994", "mpeg4_2997", "vp9_2997"])
def test_every_frame_by_seeking(long_videos, kind):
    reference = decode_all(long_videos[kind])
    for index in range(0, 150, 7):
        assert np.array_equal(read_frames(long_videos[kind], [index])[0], reference[index]), index


def test_seek_and_count_agree(long_videos):
    indices = [55, 61, 67, 73]
    assert np.array_equal(
        read_frames(long_videos["h264_5994"], indices), read_frames(long_videos["h264_5994"], indices, seek=False)
    )


def test_variable_frame_rate_falls_back_to_counting(long_videos):
    from pipeline.data.video import _decode_by_timestamp

    reference = decode_all(long_videos["vfr"])
    assert len(reference) == 60
    with av.open(str(long_videos["vfr"])) as container:
        assert _decode_by_timestamp(container, [40, 41]) is None  # timestamps skip: not trusted
    for indices in ([40, 41], [5, 12, 31], [59]):
        got = read_frames(long_videos["vfr"], indices)
        assert all(np.array_equal(row, reference[i]) for row, i in zip(got, indices))


@pytest.mark.parametrize("kind", ["h264_5994", "vfr"])  # by seeking, and by counting from the start
def test_decoding_never_waits_on_other_threads(long_videos, kind):
    """A clip decodes on the calling thread: converting each frame to RGB must not start and join a pool of
    scaler threads (PyAV >= 17 does by default), which cost 1.75x the CPU and stalled two decoders running at once.
    The calling thread then blocks almost never; a thread pool makes it wait several times per frame."""
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RUSAGE_THREAD"):
        pytest.skip("per-thread rusage is Linux only")
    indices = list(range(20, 52, 2))
    read_frames(long_videos[kind], indices)  # files in the page cache, codecs loaded
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    for _ in range(3):
        read_frames(long_videos[kind], indices)
    waits = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
    assert waits < len(indices), f"{waits} waits for {3 * len(indices)} frames"


def test_seeking_past_the_end_names_the_frame(long_videos):
    with pytest.raises(VideoError) as err:
        read_frames(long_videos["mpeg4_2997"], [140, 150])
    assert "frame 150" in str(err.value) and "150 frames" in str(err.value)
    assert str(long_videos["mpeg4_2997"]) in str(err.value)


def test_probe_duration(long_videos):
    info = probe(long_videos["h264_5994"])
    assert info.num_frames == 150
    assert info.duration == pytest.approx(150 * 1001 / 60000, abs=1e-3)
    assert probe(long_videos["mpeg4_25"]).duration == pytest.approx(6.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------ frame folders
def write_folder(folder, frames, first_number=1, quality=95):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(frames):
        Image.fromarray(image).save(folder / f"frame_{i + first_number:010d}.jpg", quality=quality)


def test_frame_folder_probe_and_read(tmp_path):
    from PIL import Image

    frames = moving_frames(9, height=40, width=50)
    folder = tmp_path / "P01_01"
    write_folder(folder, frames)
    (folder / "notes.txt").write_text("not a frame")
    info = probe(folder)
    assert (info.num_frames, info.width, info.height, info.codec) == (9, 50, 40, "jpeg")
    assert np.isnan(info.fps)
    got = read_frames(folder, [8, 0, 3, 3])
    # index i is frame_{i+1:010d}.jpg, decoded as PIL decodes that very file
    for row, index in zip(got, [8, 0, 3, 3]):
        expected = np.asarray(Image.open(folder / f"frame_{index + 1:010d}.jpg").convert("RGB"))
        assert np.array_equal(row, expected)
        distances = [np.abs(row.astype(int) - f).mean() for f in frames]
        assert int(np.argmin(distances)) == index  # and it is the frame written under that number
    assert str(frame_file(folder, 0)).endswith("frame_0000000001.jpg")


def test_frame_folder_errors(tmp_path):
    folder = tmp_path / "P02_03"
    write_folder(folder, moving_frames(5, height=16, width=16))
    (folder / "frame_0000000003.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "frame_0000000004.jpg").unlink()
    read_frames(folder, [0, 1, 4])  # the bad files are not touched
    with pytest.raises(VideoError, match="frame_0000000003.jpg: unreadable JPEG"):
        read_frames(folder, [1, 2])
    with pytest.raises(VideoError, match="frame_0000000004.jpg: frame 3 missing"):
        read_frames(folder, [3])
    with pytest.raises(VideoError, match="frame_0000000006.jpg: frame 5 missing"):
        read_frames(folder, [5])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="holds no frame"):
        probe(empty)
