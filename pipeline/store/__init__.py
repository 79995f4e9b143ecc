"""The output contract: table schemas, the tube codec, atomic writes, the run's ledger and every reader.

Users read a run with :func:`read_tubes` (tubes, decoded and optionally upsampled), :func:`read_index`,
:func:`read_failures` and :func:`read_boxes`; the tables are plain Parquet that any tool reads too.
"""

from pipeline.store.codec import (
    CODECS,
    decode_layer_volumes,
    decode_volume,
    dequantise,
    encode_layer_volumes,
    encode_volume,
    quantise,
)
from pipeline.store.files import failure_row, failures_table, file_metadata, part_name, shard_parts, write_table_atomic
from pipeline.store.readers import (
    boxes_path,
    decode_column,
    read_boxes,
    read_failures,
    read_index,
    read_tubes,
    tube_files,
)
from pipeline.store.schema import (
    ALL_LABEL,
    ALL_NAME,
    COMPRESSION,
    FAILURE_SCHEMA,
    INDEX_SCHEMA,
    LAYER_VOLUME,
    SOURCE_COLUMNS,
    TUBE_SCHEMA,
    UNLABELLED,
    UNLABELLED_NAME,
)

__all__ = [
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
    "boxes_path",
    "decode_column",
    "decode_layer_volumes",
    "decode_volume",
    "dequantise",
    "encode_layer_volumes",
    "encode_volume",
    "failure_row",
    "failures_table",
    "file_metadata",
    "part_name",
    "read_boxes",
    "read_failures",
    "read_index",
    "read_tubes",
    "shard_parts",
    "tube_files",
    "quantise",
    "write_table_atomic",
]
