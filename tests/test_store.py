import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, MissingInput
from pipeline.store import (
    FAILURE_SCHEMA,
    TUBE_SCHEMA,
    Failure,
    decode_volume,
    dequantise,
    encode_volume,
    failures_table,
    file_metadata,
    quantise,
    read_failures,
    read_tubes,
    write_table_atomic,
)


def random_tubes(seed=0, shape=(3, 2, 4, 5, 6)):
    gen = torch.Generator().manual_seed(seed)
    tubes = torch.randn(shape, generator=gen)
    # very different magnitudes per tube, so a shared scale would be caught
    lead = shape[:-3]
    count = int(np.prod(lead))
    factors = torch.logspace(-3, 3, count).reshape(*lead, 1, 1, 1)
    return tubes * factors


# ------------------------------------------------------------------------------------------------ codec
def test_float32_is_lossless():
    tubes = random_tubes()
    stored, scale = quantise(tubes, "float32")
    assert stored.dtype == torch.float32
    assert scale.shape == tubes.shape[:-3]
    assert torch.equal(scale, torch.ones(tubes.shape[:-3]))
    assert torch.equal(dequantise(stored, scale), tubes)


def test_float32_accepts_other_float_dtypes():
    tubes = random_tubes().double()
    stored, scale = quantise(tubes, "float32")
    assert stored.dtype == torch.float32
    assert torch.equal(dequantise(stored, scale), tubes.float())


def test_float16_error_bound_per_tube():
    tubes = random_tubes(seed=1)
    stored, scale = quantise(tubes, "float16")
    assert stored.dtype == torch.float16
    assert scale.dtype == torch.float32
    peak = tubes.abs().amax(dim=(-3, -2, -1))
    assert torch.equal(scale, peak)
    # stored values are normalised to [-1, 1]
    assert float(stored.float().abs().max()) <= 1.0
    error = (dequantise(stored, scale) - tubes).abs().amax(dim=(-3, -2, -1))
    assert bool((error <= 2.0**-11 * peak).all())


def test_float16_all_zero_tube():
    tubes = random_tubes(seed=2, shape=(3, 2, 3, 3))
    tubes[1] = 0.0
    stored, scale = quantise(tubes, "float16")
    assert float(scale[1]) == 1.0
    out = dequantise(stored, scale)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert float((out[0] - tubes[0]).abs().max()) <= 2.0**-11 * float(tubes[0].abs().max())


def test_float16_negative_tube_keeps_sign():
    tubes = -torch.arange(1.0, 25.0).reshape(1, 2, 3, 4)
    stored, scale = quantise(tubes, "float16")
    assert float(scale[0]) == 24.0
    assert float(stored.float().min()) == -1.0
    out = dequantise(stored, scale)
    assert bool((out < 0).all())
    assert float((out - tubes).abs().max()) <= 2.0**-11 * 24.0


@pytest.mark.parametrize("codec", ["float16", "float32"])
def test_decode_volume_matches_dequantise_bit_for_bit(codec):
    tubes = random_tubes(seed=3, shape=(4, 3, 5, 7))
    stored, scale = quantise(tubes, codec)
    expected = dequantise(stored, scale).numpy()
    for i in range(tubes.shape[0]):
        data = encode_volume(stored[i].numpy())
        assert isinstance(data, bytes)
        assert len(data) == stored[i].numel() * (2 if codec == "float16" else 4)
        decoded = decode_volume(data, (3, 5, 7), codec, float(scale[i]))
        assert decoded.dtype == np.float32
        assert decoded.shape == (3, 5, 7)
        assert np.array_equal(decoded, expected[i])


def test_encode_volume_is_little_endian():
    values = np.array([1.0, -2.5], dtype=">f4")  # big-endian input
    assert encode_volume(values) == np.array([1.0, -2.5], dtype="<f4").tobytes()


def test_unknown_codec_raises():
    with pytest.raises(ValueError):
        quantise(torch.zeros(1, 2, 2, 2), "int8")
    with pytest.raises(ValueError):
        decode_volume(b"\0" * 8, (2,), "bfloat16", 1.0)


# ------------------------------------------------------------------------------------------------ atomic writes
def test_write_table_atomic_roundtrip(tmp_path):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    path = tmp_path / "sub" / "out.parquet"
    write_table_atomic(table, path, metadata={"stage": "index", "config_hash": "abc123"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.parquet"]
    assert pq.read_table(path).equals(table)
    meta = file_metadata(path)
    assert meta["stage"] == "index"
    assert meta["config_hash"] == "abc123"
    assert not any(k.startswith("ARROW") for k in meta)


def test_write_table_atomic_replaces_existing(tmp_path):
    path = tmp_path / "out.parquet"
    write_table_atomic(pa.table({"a": [1]}), path, metadata={"version": "1"})
    write_table_atomic(pa.table({"a": [5, 6]}), path, metadata={"version": "2"})
    assert pq.read_table(path).column("a").to_pylist() == [5, 6]
    assert file_metadata(path)["version"] == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_write_table_atomic_without_metadata(tmp_path):
    path = tmp_path / "plain.parquet"
    write_table_atomic(pa.table({"a": [1.5]}), path)
    assert file_metadata(path) == {}


# ------------------------------------------------------------------------------------------------ failures
def test_read_failures_empty(tmp_path):
    frame = read_failures(tmp_path)
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == 0
    assert list(frame.columns) == FAILURE_SCHEMA.names


def test_read_failures_concatenates_files(tmp_path):
    row = Failure(clip_id="c1", source="/x.mp4", stage="index", error_type="VideoError", message="/x.mp4: bad")
    write_table_atomic(failures_table([row]), tmp_path / "failures" / "index.parquet")
    write_table_atomic(
        failures_table([dataclasses.replace(row, clip_id="c2", stage="extract")]),
        tmp_path / "failures" / "extract-00000.parquet",
    )
    frame = read_failures(tmp_path)
    assert list(frame.columns) == FAILURE_SCHEMA.names
    assert sorted(zip(frame["clip_id"], frame["stage"])) == [("c1", "index"), ("c2", "extract")]


# ------------------------------------------------------------------------------------------------ read_tubes
def tube_row(clip_id, tube, codec, input_size, label=0, label_name="MoveRight"):
    stored, scale = quantise(torch.from_numpy(tube)[None], codec)
    t = input_size[0]
    return dict(
        clip_id=clip_id,
        video_id=f"v_{clip_id}",
        source=f"/data/{clip_id}.mp4",
        label=label,
        label_name=label_name,
        split="test",
        frame_indices=list(range(t)),
        padded=0,
        shard=0,
        crop_box=[16.0, 0.0, 112.0, 96.0],
        input_size=list(input_size),
        method="cam",
        layer="layer4",
        target=label,
        target_name=label_name,
        target_rank=0,
        target_logit=1.5,
        target_prob=0.6,
        pred=label,
        pred_name=label_name,
        pred_prob=0.6,
        volume=encode_volume(stored[0].numpy()),
        volume_shape=list(tube.shape),
        volume_codec=codec,
        volume_scale=float(scale[0]),
        mass=1.0,
        peak_t=0,
        peak_y=1.0,
        peak_x=2.0,
        peak_frame=0,
        centroid_t=0.5,
        centroid_y=1.0,
        centroid_x=2.0,
        top10_mass=0.3,
        entropy=0.8,
        temporal_profile=[1.0 / t] * t,
        frame_peak_x=[50.0] * t,
        frame_peak_y=[40.0] * t,
    )


@pytest.fixture()
def run_dir(tmp_path):
    rng = np.random.default_rng(7)
    tubes = {
        "a": rng.normal(size=(2, 3, 4)).astype(np.float32),
        "b": rng.normal(size=(2, 3, 4)).astype(np.float32) * 50,
        "c": rng.normal(size=(1, 2, 2)).astype(np.float32),
    }
    specs = {
        "a": ("float32", (8, 12, 16), 0, "MoveRight"),
        "b": ("float16", (8, 12, 16), 1, "MoveLeft"),
        "c": ("float16", (4, 6, 5), 1, "MoveLeft"),
    }
    rows = {k: tube_row(k, tubes[k], *specs[k]) for k in tubes}
    (tmp_path / "tubes").mkdir()
    pq.write_table(
        pa.Table.from_pylist([rows["a"], rows["b"]], schema=TUBE_SCHEMA), tmp_path / "tubes" / "part-00000.parquet"
    )
    pq.write_table(pa.Table.from_pylist([rows["c"]], schema=TUBE_SCHEMA), tmp_path / "tubes" / "part-00001.parquet")
    expected = {}
    for k, tube in tubes.items():
        stored, scale = quantise(torch.from_numpy(tube)[None], specs[k][0])
        expected[k] = dequantise(stored, scale)[0].numpy()
    return tmp_path, expected, {k: v[1] for k, v in specs.items()}


def test_read_tubes_native_resolution(run_dir):
    path, expected, _ = run_dir
    frame = read_tubes(path)
    assert sorted(frame["clip_id"]) == ["a", "b", "c"]
    assert set(TUBE_SCHEMA.names) <= set(frame.columns)
    for clip_id, volume, shape in zip(frame["clip_id"], frame["volume"], frame["volume_shape"]):
        assert isinstance(volume, np.ndarray)
        assert volume.dtype == np.float32
        assert volume.shape == tuple(shape)
        assert np.array_equal(volume, expected[clip_id])


def test_read_tubes_upsampled(run_dir):
    path, expected, sizes = run_dir
    frame = read_tubes(path, upsample=True)
    for clip_id, volume in zip(frame["clip_id"], frame["volume"]):
        assert volume.dtype == np.float32
        assert volume.shape == sizes[clip_id]
        reference = F.interpolate(
            torch.from_numpy(expected[clip_id])[None, None], size=sizes[clip_id], mode="trilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(volume, reference, rtol=0, atol=1e-6 * np.abs(reference).max())  # float32 rounding


def test_read_tubes_column_subset(run_dir):
    path, expected, _ = run_dir
    frame = read_tubes(path, columns=["clip_id", "label_name"])
    assert list(frame.columns) == ["clip_id", "label_name"]
    assert dict(zip(frame["clip_id"], frame["label_name"])) == {"a": "MoveRight", "b": "MoveLeft", "c": "MoveLeft"}


def test_read_tubes_column_subset_with_volume(run_dir):
    path, expected, sizes = run_dir
    frame = read_tubes(path, columns=["volume", "clip_id"])
    assert list(frame.columns) == ["volume", "clip_id"]
    for clip_id, volume in zip(frame["clip_id"], frame["volume"]):
        assert np.array_equal(volume, expected[clip_id])
    # upsampling needs input_size, which is read behind the scenes and not returned
    frame = read_tubes(path, columns=["clip_id", "volume"], upsample=True)
    assert list(frame.columns) == ["clip_id", "volume"]
    assert {c: v.shape for c, v in zip(frame["clip_id"], frame["volume"])} == sizes


def test_read_tubes_filters(run_dir):
    path, expected, _ = run_dir
    frame = read_tubes(path, columns=["clip_id", "volume"], filters=[("label_name", "=", "MoveLeft")])
    assert sorted(frame["clip_id"]) == ["b", "c"]
    for clip_id, volume in zip(frame["clip_id"], frame["volume"]):
        assert np.array_equal(volume, expected[clip_id])


def test_read_tubes_missing_dir(tmp_path):
    with pytest.raises(MissingInput):
        read_tubes(tmp_path)
    (tmp_path / "tubes").mkdir()
    with pytest.raises(MissingInput):
        read_tubes(tmp_path)


def test_read_tubes_filter_matching_nothing(run_dir):
    path, _, _ = run_dir
    frame = read_tubes(path, columns=["clip_id", "volume"], upsample=True, filters=[("label_name", "=", "Nope")])
    assert list(frame.columns) == ["clip_id", "volume"]
    assert len(frame) == 0


# ------------------------------------------------------------------------------------------------ damaged files


def test_an_unreadable_part_is_named_with_its_repair(run_dir):
    from pipeline.errors import OutputError

    folder, _, _ = run_dir
    part = folder / "tubes" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-40])  # the footer is cut off
    with pytest.raises(OutputError, match=rf"^{part}: cannot be read \(ArrowInvalid: .*\); rerun stage=extract"):
        read_tubes(folder, columns=["clip_id"])
    (folder / "failures").mkdir()
    (folder / "failures" / "index.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(OutputError, match=rf"{folder / 'failures' / 'index.parquet'}: cannot be read"):
        read_failures(folder)


def test_an_index_that_is_not_ours_is_named(tmp_path):
    from pipeline.errors import OutputError
    from pipeline.store import read_index

    (tmp_path / "index.parquet").write_bytes(b"")
    with pytest.raises(OutputError, match=r"index.parquet: cannot be read .*rebuild it with stage=index"):
        read_index(tmp_path)
    pq.write_table(pa.table({"clip_id": ["a"]}), tmp_path / "index.parquet")
    with pytest.raises(OutputError, match=r"index.parquet: not an index of this pipeline .*stage=index"):
        read_index(tmp_path)


@pytest.mark.parametrize("text", ["{not json\n{}\n", "[1, 2]\n", '{"shard": 0, "state": "done"}\n'])
def test_an_unreadable_journal_is_set_aside_and_started_again(tmp_path, text, caplog):
    """A journal is a record the parts can rebuild: one with an unreadable line is moved aside (never deleted)."""
    from pipeline.store.ledger import Ledger

    folder = tmp_path / "ledger" / "extract"
    folder.mkdir(parents=True)
    (folder / "all.jsonl").write_text(text)
    with caplog.at_level("WARNING"):
        ledger = Ledger(tmp_path, "extract", config_hash="abc")
    assert ledger.done == {} and ledger.failed == {}
    aside = list(folder.glob("all.jsonl.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_text() == text
    assert "cannot be read" in caplog.text and "its parts are adopted again" in caplog.text
    ledger.finish(3, "h", rows=2)
    ledger.close()
    assert Ledger(tmp_path, "extract", config_hash="abc").is_done(3, "h")


def test_the_journal_keeps_every_entry_of_concurrent_writers_and_ignores_a_line_cut_short(tmp_path):
    """Two shares' drivers append at once, each to its own journal; a kill mid-line loses only that line; the
    latest entry of a shard wins whichever journal holds it; reopening compacts a journal to one line per shard."""
    from pipeline.store.ledger import Ledger, read_ledger

    one = Ledger(tmp_path, "extract", "share-0-of-2", config_hash="c")
    two = Ledger(tmp_path, "extract", "share-1-of-2", config_hash="c")
    for shard in range(0, 200, 2):
        one.finish(shard, f"d{shard}", rows=shard, bytes=10)
        two.fail(shard + 1, f"d{shard + 1}", "boom")
        two.finish(shard + 1, f"d{shard + 1}", rows=1)
    one.close(), two.close()
    with open(tmp_path / "ledger" / "extract" / "share-0-of-2.jsonl", "a") as journal:
        journal.write('{"shard": 500, "state": "do')  # a kill in the middle of a write
    done = read_ledger(tmp_path, "extract", "done")
    assert sorted(done) == list(range(200)) and done[198].rows == 198 and done[7].rows == 1
    again = Ledger(tmp_path, "extract", "share-1-of-2", config_hash="c")
    assert len((tmp_path / "ledger" / "extract" / "share-1-of-2.jsonl").read_text().splitlines()) == 100
    assert again.is_done(7, "d7") and not again.is_done(7, "other") and 500 not in again.entries
    again.close()
    resumed = Ledger(tmp_path, "extract", "share-0-of-2", config_hash="c")  # the journal cut short by the kill
    resumed.finish(501, "d501", rows=1)
    resumed.close()
    assert sorted(read_ledger(tmp_path, "extract", "done")) == [*range(200), 501]
    assert not list((tmp_path / "ledger" / "extract").glob("*.unreadable-*"))
    with pytest.raises(ConfigError, match=r"another configuration .*choose a new run_name"):
        Ledger(tmp_path, "extract", config_hash="other")
