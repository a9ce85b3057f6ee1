"""Store files: atomic writes, Parquet tables written and read whole, files shared between versions."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a temp name beside `path`, then rename: readers see the whole file or none."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def parquet_options(schema: pa.Schema) -> dict:
    """How every store file is written: zstd, and dictionary encoding only for flat columns, whose
    values repeat (sources, reasons, flags). A face's crop bytes and point lists are unique to it: the
    writer would build their dictionaries only to drop them, which cost about half of a write. The
    values read back are the same either way."""
    nested_or_bytes = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_list, pa.types.is_large_list,
                       pa.types.is_fixed_size_list, pa.types.is_struct, pa.types.is_map)
    flat = [f.name for f in schema if not any(test(f.type) for test in nested_or_bytes)]
    return {"compression": "zstd", "use_dictionary": flat}


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=4096, **parquet_options(table.schema))
    return sink.getvalue()


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> dict:
    """Write `table` atomically; returns its manifest entry (file name, rows, bytes, sha256)."""
    data = table_bytes(table)
    write_atomic(fs, path, data)
    return {"file": path.rsplit("/", 1)[-1], "rows": table.num_rows, "bytes": len(data), "sha256": sha256_bytes(data)}


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return getattr(fs, "protocol", None) in ("file", ("file", "local"), "local") or fs.__class__.__name__ == "LocalFileSystem"


@contextmanager
def open_for_arrow(fs: fsspec.AbstractFileSystem, path: str) -> Iterator:
    """`path` open for pyarrow to read: natively when the store is local, else through fsspec.

    Arrow reads a Python file object from its own IO threads, and they take the GIL to do it. A
    thread still at that when the interpreter exits aborts the process ("terminate called without an
    active exception", exit -6) after everything was read and written (how often: docs/design-notes.md,
    note 26). A native file never calls into Python."""
    if is_local(fs):
        with pa.OSFile(fs._strip_protocol(path), "rb") as f:
            yield f
    else:
        with fs.open(path, "rb") as f:
            yield f


def link_or_copy(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Immutable files are shared between versions by hard link where the filesystem allows."""
    if is_local(fs):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    fs.copy(src, dst)


def read_table_file(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    """One Parquet file (a shard, a side table, a trainer round's scores) as an Arrow table."""
    try:
        with open_for_arrow(fs, path) as f:
            return pq.read_table(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such table: {path}") from None
