"""Run-directory storage: hidden-state arrays in TensorStore, step/example tables in parquet."""

from fcjax.store.hidden import (
    HiddenReader,
    HiddenStore,
    HiddenStoreError,
    plan_row_ranges,
    read_hidden,
)
from fcjax.store.tables import TableError, read_table, write_json_atomic, write_table_atomic

__all__ = [
    "HiddenReader",
    "HiddenStore",
    "HiddenStoreError",
    "TableError",
    "plan_row_ranges",
    "read_hidden",
    "read_table",
    "write_json_atomic",
    "write_table_atomic",
]
