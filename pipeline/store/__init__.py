"""The output contract: table schemas, the tube codec, atomic writes, the run's ledger and every reader.

Users read a run with :func:`read_tubes` (tubes, decoded and optionally upsampled), :func:`read_index`,
:func:`read_failures` and :func:`read_boxes`; the tables are plain Parquet that any tool reads too.
"""

from pipeline.store.codec import CODECS, decode_volume, dequantise, encode_volume, quantise
from pipeline.store.files import (
    atomic_write,
    failure_row,
    failures_table,
    file_metadata,
    part_name,
    publish,
    shard_failure_rows,
    shard_parts,
    temp_path,
    write_table_atomic,
)
from pipeline.store.readers import (
    boxes_path,
    decode_column,
    read_boxes,
    read_failures,
    read_index,
    read_tubes,
    require_tubes,
    tube_files,
)
from pipeline.store.schema import (
    ALL_LABEL,
    ALL_NAME,
    COMPRESSION,
    FAILURE_SCHEMA,
    INDEX_SCHEMA,
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
    "SOURCE_COLUMNS",
    "TUBE_SCHEMA",
    "UNLABELLED",
    "UNLABELLED_NAME",
    "atomic_write",
    "boxes_path",
    "decode_column",
    "decode_volume",
    "dequantise",
    "encode_volume",
    "failure_row",
    "failures_table",
    "file_metadata",
    "part_name",
    "publish",
    "quantise",
    "read_boxes",
    "read_failures",
    "read_index",
    "read_tubes",
    "require_tubes",
    "shard_failure_rows",
    "shard_parts",
    "temp_path",
    "tube_files",
    "write_table_atomic",
]
