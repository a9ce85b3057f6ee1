"""A version's faces, read: the whole table, its schema, or shard by shard; its side tables."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.files import open_for_arrow, read_table_file
from pipeline.store.layout import Store, resolve_version
from pipeline.store.manifest import Manifest
from pipeline.store.schema import FACES_SCHEMA


def read_faces(store: Store, version: int | None = None, columns: list[str] | None = None,
               filters=None) -> pa.Table:
    """All face rows of a version (the latest by default) as one Arrow table."""
    version = resolve_version(store, version)
    manifest = Manifest.read(store, version)
    vdir = store.version_dir(version)
    tables = []
    for shard in manifest.shards:
        with open_for_arrow(store.fs, f"{vdir}/{shard.file}") as f:
            tables.append(_read_shard(f, columns, filters))
    if not tables:
        schema = FACES_SCHEMA if columns is None else pa.schema([FACES_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    # Shards linked from a parent may predate a nullable column: the union, missing values null.
    return pa.concat_tables(tables, promote_options="default")


def _read_shard(f, columns: list[str] | None, filters) -> pa.Table:
    """One shard; asked-for FACES_SCHEMA columns the shard predates come back as nulls."""
    if columns is None:
        return pq.read_table(f, filters=filters)
    names = set(pq.ParquetFile(f).schema_arrow.names)
    f.seek(0)
    absent = [c for c in columns if c not in names and c in FACES_SCHEMA.names and FACES_SCHEMA.field(c).nullable]
    table = pq.read_table(f, columns=[c for c in columns if c not in absent], filters=filters)  # others: its error
    for c in absent:
        table = table.append_column(FACES_SCHEMA.field(c), pa.nulls(table.num_rows, FACES_SCHEMA.field(c).type))
    return table.select(columns)


def faces_schema(store: Store, version: int | None = None) -> pa.Schema:
    """The schema a version's face shards were written with (older versions lack newer columns)."""
    version = resolve_version(store, version)
    manifest = Manifest.read(store, version)
    if not manifest.shards:
        return FACES_SCHEMA
    with open_for_arrow(store.fs, f"{store.version_dir(version)}/{manifest.shards[0].file}") as f:
        return pq.read_schema(f)


def iter_face_batches(store: Store, version: int, columns: list[str] | None = None,
                      batch_size: int = 256) -> Iterable[pa.RecordBatch]:
    """Stream a version's faces shard by shard (the trainer and rescoring never load it whole)."""
    manifest = Manifest.read(store, version)
    vdir = store.version_dir(version)
    for shard in manifest.shards:
        with open_for_arrow(store.fs, f"{vdir}/{shard.file}") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def read_side_table(store: Store, version: int, name: str) -> pa.Table:
    """images | quarantine | scores of a version."""
    return read_table_file(store.fs, f"{store.version_dir(version)}/{name}.parquet")

