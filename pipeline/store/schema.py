"""The output contract's tables: Parquet schemas of the index, the tubes and the failures, and the label
sentinels every aggregate table uses."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

COMPRESSION = "zstd"
#: ``store.codec``: how tube values are stored (see :mod:`pipeline.store.codec`)
CODECS = ("float16", "float32")

#: ``label`` / ``label_name`` of the totals rows of aggregate tables (every class together)
ALL_LABEL, ALL_NAME = -1, "(all)"
#: ``label`` / ``label_name`` that aggregate tables give clips without a label
UNLABELLED, UNLABELLED_NAME = -2, "(unlabelled)"

INDEX_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("video_id", pa.string()),
        ("source", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("frame_indices", pa.list_(pa.int32())),
        ("padded", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("shard", pa.int32()),
        # added by the dataset readers (issue 3): the segment a clip comes from and the probe's codec/duration
        ("segment_id", pa.string()),
        ("start_frame", pa.int32()),
        ("end_frame", pa.int32()),
        ("codec", pa.string()),
        ("duration", pa.float32()),
    ]
)

#: index columns that describe the source rather than the clip; tube tables leave them out
SOURCE_COLUMNS = ("num_frames", "fps", "width", "height", "segment_id", "start_frame", "end_frame", "codec", "duration")

_F32, _I32, _LF32, _LI32 = pa.float32(), pa.int32(), pa.list_(pa.float32()), pa.list_(pa.int32())

#: one fused layer's own tube (``layer_volumes``): stored like ``volume`` (same codec), at the layer's resolution
LAYER_VOLUME = pa.struct([("layer", pa.string()), ("volume", pa.binary()), ("shape", _LI32), ("scale", _F32)])


@dataclass(frozen=True)
class Statistic:
    """One per-clip statistic of a tube row, declared once: the tube schema, the extractor's statistics
    (:func:`pipeline.explain.clipstats.clip_statistics`) and the stats stage's aggregates follow this list.

    ``per_class``: how stats aggregates it per class: ``mean`` (and ``histogram``: also a histogram of ten equal
    bins of [0, 1]), or None (kept per clip only)."""

    name: str
    dtype: pa.DataType
    per_class: str | None
    doc: str

    @property
    def is_list(self) -> bool:
        return pa.types.is_list(self.dtype)


CLIP_STATISTICS = (
    Statistic("mass", _F32, "mean", "sum of the positive part of the tube"),
    Statistic("peak_t", _I32, "mean", "time step of the tube's maximum"),
    Statistic("peak_y", _F32, None, "input pixel row of the maximum"),
    Statistic("peak_x", _F32, None, "input pixel column of the maximum"),
    Statistic("peak_frame", _I32, None, "source frame of the maximum (from frame_indices)"),
    Statistic("centroid_t", _F32, "mean", "mass-weighted mean time step"),
    Statistic("centroid_y", _F32, "mean", "mass-weighted mean input pixel row"),
    Statistic("centroid_x", _F32, "mean", "mass-weighted mean input pixel column"),
    Statistic("top10_mass", _F32, "histogram", "share of the mass in the 10 % highest voxels"),
    Statistic("entropy", _F32, "histogram", "entropy of the mass over voxels / log(voxels): 0 one voxel, 1 uniform"),
    Statistic("temporal_profile", _LF32, "mean", "share of the mass at each time step"),
    Statistic("frame_peak_x", _LF32, None, "per time step, the frame's peak column in source pixels"),
    Statistic("frame_peak_y", _LF32, None, "per time step, the frame's peak row in source pixels"),
    Statistic("border_mass", _F32, "histogram", "share of the mass in the frame's outer band"),
    Statistic("density", _LF32, "mean", "share of the mass in each cell of a coarse grid of the frame, row-major"),
)

TUBE_SCHEMA = pa.schema(
    [f for f in INDEX_SCHEMA if f.name not in SOURCE_COLUMNS]
    + [
        # the clip's label as a class of the model (null: no label, or no model class for it); accuracy uses it
        ("model_label", _I32),
        ("crop_box", _LF32),
        ("input_size", _LI32),
        ("method", pa.string()),
        ("layer", pa.string()),
        ("target", _I32),
        ("target_name", pa.string()),
        ("target_rank", _I32),
        ("target_logit", _F32),
        ("target_prob", _F32),
        ("pred", _I32),
        ("pred_name", pa.string()),
        ("pred_prob", _F32),
        ("volume", pa.binary()),
        ("volume_shape", _LI32),
        ("volume_codec", pa.string()),
        ("volume_scale", _F32),
    ]
    # per-clip statistics, computed on the decoded tube upsampled to input_size
    + [(s.name, s.dtype) for s in CLIP_STATISTICS]
    + [
        # method=fusion: each fused layer's own tube, in the order of `layer` (null for one-layer methods)
        ("layer_volumes", pa.list_(LAYER_VOLUME)),
    ]
)

FAILURE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
