"""Run-directory storage: hidden-state arrays in TensorStore, step/example tables in parquet,
all through one filesystem layer (local paths, file://, gs://, s3://)."""

from fcjax.store.fs import FsError, Location, location
from fcjax.store.hidden import (
    HiddenReader,
    HiddenStore,
    HiddenStoreError,
    plan_row_ranges,
    read_hidden,
)
from fcjax.store.tables import TableError, read_table, write_json_atomic, write_table_atomic

__all__ = [
    "FsError",
    "HiddenReader",
    "HiddenStore",
    "HiddenStoreError",
    "Location",
    "TableError",
    "location",
    "plan_row_ranges",
    "read_hidden",
    "read_table",
    "write_json_atomic",
    "write_table_atomic",
]
