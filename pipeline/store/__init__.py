"""The output contract: table schemas, the tube codec, atomic writes, the run's ledger and every reader.

Users read a run with :func:`read_tubes` (tubes, decoded and optionally upsampled), :func:`read_index`,
:func:`read_failures` and :func:`read_boxes`; the tables are plain Parquet that any tool reads too.
"""

import importlib

#: each public name and the submodule that defines it; imported on first use, so that a light caller (the
#: command line before it starts a cluster, a reader of the ledger) does not import torch with the codec
_WHERE = {
    **dict.fromkeys(
        (
            "decode_layer_volumes",
            "decode_volume",
            "dequantise",
            "encode_layer_volumes",
            "encode_volume",
            "quantise",
        ),
        "codec",
    ),
    **dict.fromkeys(
        (
            "atomic_write",
            "Failure",
            "failures_table",
            "file_metadata",
            "publish",
            "replace_folder",
            "shard_failure_rows",
            "temp_path",
            "write_table_atomic",
        ),
        "files",
    ),
    **dict.fromkeys(("RunDir", "part_name"), "run_dir"),
    **dict.fromkeys(
        (
            "REPAIR",
            "boxes_path",
            "decode_column",
            "read_boxes",
            "read_failures",
            "read_index",
            "read_table",
            "read_tubes",
            "readable",
            "require_tubes",
            "tube_files",
        ),
        "readers",
    ),
    **dict.fromkeys(
        (
            "ALL_LABEL",
            "ALL_NAME",
            "CODECS",
            "COMPRESSION",
            "FAILURE_SCHEMA",
            "INDEX_SCHEMA",
            "LAYER_VOLUME",
            "SOURCE_COLUMNS",
            "TUBE_SCHEMA",
            "UNLABELLED",
            "UNLABELLED_NAME",
        ),
        "schema",
    ),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pipeline.store.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
