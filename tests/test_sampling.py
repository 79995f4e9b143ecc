import pytest

from pipeline.data.sampling import CenterSampler, Clip, ClipSampler, SlidingSampler, UniformSampler


def frames_of(clips):
    return [c.frame_indices for c in clips]


def test_span():
    assert CenterSampler(4).span() == 4
    assert CenterSampler(4, frame_stride=2).span() == 7
    assert UniformSampler(1, frame_stride=5).span() == 1
    assert CenterSampler(4, target_fps=15).span(60000 / 1001) == 13  # offsets 0, 4, 8, 12


# ------------------------------------------------------------------------------------------------ CenterSampler
def test_center_stride_one():
    # 10 frames, clip of 4: (10 - 4) // 2 = 3
    assert CenterSampler(4)(0, 10) == [Clip([3, 4, 5, 6], 0)]


def test_center_odd_leftover_rounds_down():
    # 11 frames, clip of 4: (11 - 4) // 2 = 3
    assert frames_of(CenterSampler(4)(0, 11)) == [[3, 4, 5, 6]]


def test_center_stride_two():
    # span 7 in 20 frames: start (20 - 7) // 2 = 6
    assert CenterSampler(4, frame_stride=2)(0, 20) == [Clip([6, 8, 10, 12], 0)]


def test_center_range_not_at_zero():
    # [100, 110): span 7, start 100 + (10 - 7) // 2 = 101
    assert CenterSampler(4, frame_stride=2)(100, 110) == [Clip([101, 103, 105, 107], 0)]


def test_center_exact_fit():
    assert CenterSampler(5)(20, 25) == [Clip([20, 21, 22, 23, 24], 0)]


def test_center_padding_repeats_last_frame():
    assert CenterSampler(5)(0, 3) == [Clip([0, 1, 2, 2, 2], 2)]


def test_center_padding_with_stride():
    # [10, 15) with stride 2: 10, 12, 14, (16 -> 14)
    assert CenterSampler(4, frame_stride=2)(10, 15) == [Clip([10, 12, 14, 14], 1)]


def test_center_single_frame_range():
    assert CenterSampler(3, frame_stride=3)(7, 8) == [Clip([7, 7, 7], 2)]


# ------------------------------------------------------------------------------------------------ UniformSampler
def test_uniform_stride_one():
    # last possible start 20 - 4 = 16; starts 0, 8, 16
    clips = UniformSampler(4, num_clips=3)(0, 20)
    assert clips == [Clip([0, 1, 2, 3], 0), Clip([8, 9, 10, 11], 0), Clip([16, 17, 18, 19], 0)]


def test_uniform_stride_two_offset_range():
    # [5, 30), span 5, last start 25; linspace(5, 25, 4) = 5, 11.67, 18.33, 25 -> 5, 12, 18, 25
    clips = UniformSampler(3, frame_stride=2, num_clips=4)(5, 30)
    assert frames_of(clips) == [[5, 7, 9], [12, 14, 16], [18, 20, 22], [25, 27, 29]]
    assert all(c.padded == 0 for c in clips)


def test_uniform_last_clip_ends_at_range_end():
    clips = UniformSampler(4, frame_stride=3, num_clips=2)(0, 50)
    # span 10, last start 40 -> [40, 43, 46, 49]
    assert frames_of(clips) == [[0, 3, 6, 9], [40, 43, 46, 49]]


def test_uniform_single_clip_starts_at_range_start():
    assert frames_of(UniformSampler(2, num_clips=1)(3, 9)) == [[3, 4]]


def test_uniform_short_range_collapses_to_one_padded_clip():
    # 5 frames, clip of 8: every start is 0, duplicates dropped
    clips = UniformSampler(8, num_clips=3)(0, 5)
    assert clips == [Clip([0, 1, 2, 3, 4, 4, 4, 4], 3)]


def test_uniform_duplicate_starts_dropped():
    # [0, 6), clip of 4: last start 2; linspace(0, 2, 6) rounds to 0, 0, 1, 1, 2, 2
    clips = UniformSampler(4, num_clips=6)(0, 6)
    assert frames_of(clips) == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert len({tuple(f) for f in frames_of(clips)}) == len(clips)


def test_uniform_more_clips_than_starts():
    # [10, 13), clip of 1: three possible starts, ten requested
    assert frames_of(UniformSampler(1, num_clips=10)(10, 13)) == [[10], [11], [12]]


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("cls", [CenterSampler, UniformSampler, SlidingSampler])
@pytest.mark.parametrize("clip_len,stride", [(0, 1), (-2, 1), (4, 0), (4, -1)])
def test_invalid_clip_len_or_stride(cls, clip_len, stride):
    with pytest.raises(ValueError):
        cls(clip_len, frame_stride=stride)


def test_invalid_num_clips():
    with pytest.raises(ValueError):
        UniformSampler(4, num_clips=0)


@pytest.mark.parametrize("cls", [CenterSampler, UniformSampler, SlidingSampler])
@pytest.mark.parametrize("start,end", [(0, 0), (5, 5), (10, 3)])
def test_empty_range_raises(cls, start, end):
    with pytest.raises(ValueError):
        cls(4)(start, end)


def test_base_sampler_has_no_starts():
    with pytest.raises(NotImplementedError):
        ClipSampler(4)(0, 10)


# ------------------------------------------------------------------------------------------------ SlidingSampler
def test_sliding_back_to_back_with_tail_clip():
    # span 4 over [0, 10): 0, 4, then a last clip ending at 10 (start 6) so frames 8, 9 are covered
    assert frames_of(SlidingSampler(4)(0, 10)) == [[0, 1, 2, 3], [4, 5, 6, 7], [6, 7, 8, 9]]


def test_sliding_exact_tiling_has_no_extra_clip():
    # span 3 (frames 10, 12) tiles [10, 19) with stride 3: 10, 13, 16 -> 16 + 3 = 19 = end
    assert frames_of(SlidingSampler(2, frame_stride=2, clip_stride=3)(10, 19)) == [[10, 12], [13, 15], [16, 18]]


def test_sliding_overlapping_windows():
    clips = SlidingSampler(3, clip_stride=1)(5, 9)
    assert frames_of(clips) == [[5, 6, 7], [6, 7, 8]]
    assert all(c.padded == 0 for c in clips)


def test_sliding_short_range_is_one_padded_clip():
    assert SlidingSampler(4, frame_stride=2, clip_stride=1)(0, 3) == [Clip([0, 2, 2, 2], 2)]


def test_sliding_invalid_stride():
    with pytest.raises(ValueError, match="clip_stride"):
        SlidingSampler(4, clip_stride=0)


# ------------------------------------------------------------------------------------------------ target_fps
def test_target_fps_uses_the_videos_rate():
    sampler = CenterSampler(4, target_fps=15)
    # 59.94 fps -> step 3.996: offsets round(k * 3.996) = 0, 4, 8, 12; span 13 centred in [0, 100): start 43
    assert sampler(0, 100, fps=60000 / 1001) == [Clip([43, 47, 51, 55], 0)]
    # 25 fps -> step 5/3: offsets 0, 2, 3, 5 (round half to even at 3.33 -> 3); span 6 centred: start 47
    assert sampler(0, 100, fps=25) == [Clip([47, 49, 50, 52], 0)]
    # 30 fps -> step 2: the same as frame_stride=2
    assert sampler(0, 100, fps=30) == CenterSampler(4, frame_stride=2)(0, 100)


def test_target_fps_above_video_rate_repeats_frames():
    # 10 fps video sampled at 20 fps: step 0.5 -> 0, 0, 1, 2 (numpy rounds half to even), 2
    assert frames_of(UniformSampler(5, target_fps=20, num_clips=1)(0, 10, fps=10)) == [[0, 0, 1, 2, 2]]


def test_target_fps_needs_fps():
    with pytest.raises(ValueError, match="frame rate"):
        CenterSampler(4, target_fps=15)(0, 100)
    with pytest.raises(ValueError, match="frame rate"):
        CenterSampler(4, target_fps=15)(0, 100, fps=float("nan"))
    with pytest.raises(ValueError, match="target_fps"):
        CenterSampler(4, target_fps=0)


def test_frame_stride_ignores_fps():
    assert CenterSampler(3, frame_stride=2)(0, 20, fps=59.94) == CenterSampler(3, frame_stride=2)(0, 20)


def test_target_fps_padding_counts_steps_past_the_end():
    # step 2 (60 -> 30 fps) in [0, 5): 0, 2, 4, (6 -> 4)
    assert CenterSampler(4, target_fps=30)(0, 5, fps=60) == [Clip([0, 2, 4, 4], 1)]
