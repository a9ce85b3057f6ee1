"""A version's faces laid out at commit: rows in order into files of `shard_rows` rows, each cut into
row groups of `row_group_rows`, so a version's file count follows its size, not its batch count.

The writer works inside the version folder being committed, which has no manifest yet: a crash
mid-way leaves a folder that does not exist as a version (the next commit removes it), and the
build's staging parts it reads from are removed only after the manifest lands.
"""

from __future__ import annotations

import hashlib
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.files import parquet_options
from pipeline.store.schema import FACES_SCHEMA, conform_faces

_HASH_CHUNK = 8 << 20


def _file_entry(fs: fsspec.AbstractFileSystem, path: str, rows: int) -> dict:
    """A manifest entry for a finished file (hashed by reading it back in chunks: never whole in memory)."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"file": path.rsplit("/", 1)[-1], "rows": rows, "bytes": size, "sha256": digest.hexdigest()}


class FacesWriter:
    """Face rows in the order given -> `<dir>/<prefix>-NNNNN.parquet` files in FACES_SCHEMA.

    `add` takes tables of any size (a batch's part, a chunk of a parent's file); rows are buffered
    until a whole row group is there, so row groups do not follow the batches. `link` puts an
    existing file into the sequence as it is (a parent's full file), when no file is half written.
    `close` returns the manifest entries, in row order. Each file is written under a temp name and
    renamed when whole.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str, prefix: str, *, shard_rows: int,
                 row_group_rows: int):
        if not 1 <= row_group_rows <= shard_rows:
            raise ValueError(f"row_group_rows ({row_group_rows}) must be in [1, shard_rows ({shard_rows})]")
        self.fs, self.folder, self.prefix = fs, folder, prefix
        self.shard_rows, self.row_group_rows = shard_rows, row_group_rows
        self.entries: list[dict] = []
        self._pending: list[pa.Table] = []  # rows not yet in a row group
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink = None
        self._tmp = self._path = ""
        self._file_rows = 0  # rows already in the open file's row groups
        self._next = 0

    @property
    def at_file_boundary(self) -> bool:
        """No rows are buffered or half written: a whole file may be linked in next."""
        return self._writer is None and self._pending_rows == 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(conform_faces(table))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._group_size():
            self._write_group(self._group_size())

    def link(self, entry: dict) -> None:
        """An existing whole file, already placed in the folder by the caller, as the next one."""
        if not self.at_file_boundary:
            raise RuntimeError("FacesWriter.link: rows are still buffered; link only at a file boundary")
        self.entries.append(dict(entry))

    def close(self) -> list[dict]:
        while self._pending_rows:
            self._write_group(min(self._pending_rows, self._group_size()))
        self._finish_file()
        return self.entries

    def abort(self) -> None:
        """Drop a half-written file (its temp name), after a failure."""
        if self._writer is not None:
            try:
                self._writer.close()
                self._sink.close()
            finally:
                self._writer = None
                if self.fs.exists(self._tmp):
                    self.fs.rm(self._tmp)

    def __enter__(self) -> FacesWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()

    # -------------------------------------------------------------------------------- internals

    def _group_size(self) -> int:
        """Rows of the next row group: a full one, or what the open file still has room for."""
        return min(self.row_group_rows, self.shard_rows - self._file_rows)

    def _write_group(self, rows: int) -> None:
        buffered = pa.concat_tables(self._pending)
        group, rest = buffered.slice(0, rows), buffered.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        if self._writer is None:
            self._open_file()
        self._writer.write_table(group.combine_chunks(), row_group_size=rows)
        self._file_rows += rows
        if self._file_rows >= self.shard_rows:
            self._finish_file()

    def _open_file(self) -> None:
        self._path = f"{self.folder}/{self.prefix}-{self._next:05d}.parquet"
        self._next += 1
        self._tmp = f"{self._path}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(self.folder, exist_ok=True)
        self._sink = self.fs.open(self._tmp, "wb")
        self._writer = pq.ParquetWriter(self._sink, FACES_SCHEMA, **parquet_options(FACES_SCHEMA))
        self._file_rows = 0

    def _finish_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self._writer = None
        self.fs.mv(self._tmp, self._path)
        self.entries.append(_file_entry(self.fs, self._path, self._file_rows))
        self._file_rows = 0
