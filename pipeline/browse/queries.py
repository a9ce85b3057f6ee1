"""The filter / sort / page query over one version's face shards, in place (duckdb + pyarrow).

Nothing is copied to disk: opening a version reads its narrow columns (ids, source, split, the
decision, every numeric column) into one in-memory Arrow table, every view is one duckdb query
over it, and the heavy columns (crop, points, ...) of a page's rows are read from their own shards by
row number. Columns are discovered from the shards' schemas, so columns added later (e.g.
`verifier_nme_pct`, more `alt_landmarks`) are filterable and sortable without a change here.

A shard that cannot be read is left out and reported (`VersionFaces.unavailable`): its faces are
unavailable, the rest are served.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.landmarks import YAW_BINS, YAW_EDGES_DEG
from pipeline.store.files import open_for_arrow
from pipeline.store.layout import Store, resolve_version
from pipeline.store.manifest import Manifest
from pipeline.store.schema import FACES_SCHEMA

STATUSES = ("kept", "dropped")
# The worst-first default view: the first of these that the version has (all are higher = worse).
WORST_FIRST = ("verifier_nme_pct", "flip_nme_pct", "agreement_nme_pct")
PAGE_SIZE = 48
MAX_PAGE_SIZE = 200
# Read for a page's cards beside the scalar columns: the stored crop and what draws the label on it.
CARD_COLUMNS = ("crop", "crop_affine", "landmarks")
_THREADS = 4  # shard reads in flight (I/O and decompression, outside the GIL)
# Scalar columns no view filters or sorts on: left out of the in-memory index (read per face).
_NOT_INDEXED = ("image_id", "uri", "detector", "landmarker")


class BadView(ValueError):
    """A query parameter names no column of this version, or is not a number where one is needed."""


@dataclass(frozen=True)
class Shard:
    index: int  # position in the manifest's shard list (what URLs and rows refer to, never a path)
    file: str  # the file name inside the version dir
    path: str  # where it is read from
    rows: int


@dataclass(frozen=True)
class View:
    """What a grid shows: filters, sort and page. Round-trips through URL query parameters."""

    source: tuple[str, ...] = ()
    split: tuple[str, ...] = ()
    status: str = ""  # kept | dropped | "" (both)
    reason: tuple[str, ...] = ()  # the rule's feature, the first word of reject_reason
    yaw: tuple[str, ...] = ()  # YAW_BINS labels
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()  # (column, min, max), inclusive
    sort: str = ""  # "" = the version's worst-first default
    order: str = ""  # asc | desc | "" (desc for the default sort, asc otherwise)
    page: int = 1
    per_page: int = PAGE_SIZE

    @classmethod
    def from_params(cls, params: Mapping[str, list[str]] | Iterable[tuple[str, str]]) -> View:
        """Parse query parameters (repeated keys allowed); empty values mean 'no filter'.
        Column names are not checked here: `VersionFaces` checks them against the schema."""
        multi: dict[str, list[str]] = {}
        items = params.items() if isinstance(params, Mapping) else params
        for key, values in items:
            for value in [values] if isinstance(values, str) else values:
                if value is not None and str(value).strip() != "":
                    multi.setdefault(key, []).append(str(value).strip())
        ranges: dict[str, list[float | None]] = {}
        for key, values in multi.items():
            for bound, prefix in ((0, "min_"), (1, "max_")):
                if key.startswith(prefix) and len(key) > len(prefix):
                    ranges.setdefault(key[len(prefix):], [None, None])[bound] = _number(key, values[-1])
        status = _one(multi, "status")
        if status not in ("", *STATUSES):
            raise BadView(f"status must be one of {STATUSES}, got {status!r}")
        order = _one(multi, "order")
        if order not in ("", "asc", "desc"):
            raise BadView(f"order must be asc or desc, got {order!r}")
        bad_yaw = [y for y in multi.get("yaw", []) if y not in YAW_BINS]
        if bad_yaw:
            raise BadView(f"yaw bins are {YAW_BINS}, got {bad_yaw}")
        return cls(
            # Sets, in one order: the same view is the same URL.
            source=_set(multi, "source"), split=_set(multi, "split"), status=status,
            reason=_set(multi, "reason"), yaw=_set(multi, "yaw"),
            ranges=tuple((c, lo, hi) for c, (lo, hi) in sorted(ranges.items())),
            sort=_one(multi, "sort"), order=order,
            page=max(1, int(_number("page", _one(multi, "page") or "1"))),
            per_page=min(MAX_PAGE_SIZE, max(1, int(_number("per_page", _one(multi, "per_page") or "48")))),
        )

    def to_params(self, **changes) -> list[tuple[str, str]]:
        """The query parameters that reopen this view (with `changes` applied, e.g. page=3)."""
        view = replace(self, **changes) if changes else self
        out: list[tuple[str, str]] = []
        for key in ("source", "split", "reason", "yaw"):
            out += [(key, v) for v in getattr(view, key)]
        if view.status:
            out.append(("status", view.status))
        for column, lo, hi in view.ranges:
            out += [(f"min_{column}", format_number(lo))] if lo is not None else []
            out += [(f"max_{column}", format_number(hi))] if hi is not None else []
        out += [("sort", view.sort)] if view.sort else []
        out += [("order", view.order)] if view.order else []
        out += [("page", str(view.page))] if view.page != 1 else []
        out += [("per_page", str(view.per_page))] if view.per_page != PAGE_SIZE else []
        return out


def _set(multi: dict[str, list[str]], key: str) -> tuple[str, ...]:
    return tuple(sorted(set(multi.get(key, []))))


def _one(multi: dict[str, list[str]], key: str) -> str:
    return multi.get(key, [""])[-1]


def _number(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise BadView(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise BadView(f"{key} must be a finite number, got {value!r}")
    return number


def format_number(value: float) -> str:
    """A bound as a URL writes it: exact (repr), without a '.0' on whole numbers."""
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class Page:
    view: View
    sort: str  # the column actually sorted by
    descending: bool
    total: int  # faces matching the filters
    rows: list[dict] = field(default_factory=list)  # scalar columns + CARD_COLUMNS + _shard, _row

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.view.per_page))


def _is_float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t)


def _is_scalar(t: pa.DataType) -> bool:
    return not (pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t))


def _indexed(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if _is_scalar(f.type) and f.name not in _NOT_INDEXED]


class VersionFaces:
    """One committed version's faces, queried in place. Safe to share between request threads.

    Opening reads the version's narrow columns (ids, source, split, the decision and every numeric
    column: what filters and sorts need, a small share of the bytes) from each shard into one Arrow table
    held in memory; every view is one duckdb SQL query over it. Crops, points and the rest stay in
    the Parquet files and are read per page, one row group per row shown. Scanning the files per
    request instead costs a read of every file's columns each time (docs/benchmarks.md).
    """

    def __init__(self, store: Store, version: int | None = None):
        self.store = store
        self.version = resolve_version(store, version)
        self.manifest = Manifest.read(store, self.version)
        self.ref = f"{store.dataset}@v{self.version}"
        self._fs = store.fs
        vdir = store.version_dir(self.version)
        self.shards: list[Shard] = []
        self.unavailable: list[dict] = []  # {"file", "rows", "error"} of shards that cannot be read
        parts: list[pa.Table] = []
        schemas: list[pa.Schema] = []
        listed = [Shard(i, e.file, f"{vdir}/{e.file}", e.rows) for i, e in enumerate(self.manifest.shards)]
        with ThreadPoolExecutor(_THREADS) as pool:  # pyarrow reads without the GIL: opening in parallel
            for shard, (part, schema) in zip(listed, pool.map(self._read_narrow, listed)):
                if isinstance(part, Exception):
                    self._unavailable(shard, part)
                    continue
                parts.append(part)
                schemas.append(schema)
                self.shards.append(shard)
        # Shards linked from a parent may predate a column: the union, missing values read as null.
        self.schema = pa.unify_schemas(schemas) if schemas else FACES_SCHEMA
        self.scalar_columns = _indexed(self.schema)
        self.float_columns = [f.name for f in self.schema if _is_float(f.type)]
        self.numeric_columns = [f.name for f in self.schema
                                if _is_float(f.type) or pa.types.is_integer(f.type)]
        self.default_sort = next((c for c in WORST_FIRST if c in self.float_columns),
                                 self.float_columns[0] if self.float_columns else "face_id")
        self._by_index = {s.index: s for s in self.shards}
        # Where each readable shard's rows start in the index: a page's rows are taken from it by position.
        sizes = np.cumsum([0] + [p.num_rows for p in parts])
        self._starts = {s.index: int(start) for s, start in zip(self.shards, sizes)}
        # One contiguous Arrow table that duckdb scans in place (copying it into a duckdb table costs
        # several times its size in RSS); one connection, so queries take turns (each is short).
        # Figures: docs/benchmarks.md, 'Browsing a version: 1,000 vs 100,000 faces'.
        self._index = pa.concat_tables(parts, promote_options="default").combine_chunks() if parts else None
        del parts
        self._con = duckdb.connect(config={"threads": 2})
        if self._index is not None:
            self._con.register("faces", self._index)
        self._lock = threading.Lock()
        self._facets: dict | None = None

    def _read_narrow(self, shard: Shard) -> tuple[pa.Table | Exception, pa.Schema | None]:
        """A shard's indexed columns plus its (_shard, _row) address, or the error that stops it."""
        try:
            with open_for_arrow(self._fs, shard.path) as f:
                pf = pq.ParquetFile(f)
                part = pf.read(columns=_indexed(pf.schema_arrow))
        except Exception as err:  # noqa: BLE001 - missing, truncated, garbled...: not served, whatever it is
            return err, None
        n = part.num_rows
        part = part.append_column("_shard", pa.array(np.full(n, shard.index, dtype=np.int32)))
        return part.append_column("_row", pa.array(np.arange(n, dtype=np.int32))), pf.schema_arrow

    def _unavailable(self, shard: Shard, err: Exception) -> None:
        self.unavailable.append({"file": shard.file, "rows": shard.rows,
                                 "error": f"{type(err).__name__}: {err}"})

    # ------------------------------------------------------------------------------ sql helpers

    def _query(self, sql: str, params: list | None = None) -> pa.Table:
        if not self.shards:
            raise _NoShards()
        with self._lock:
            return self._con.sql(sql, params=params or None).to_arrow_table()

    def _where(self, view: View) -> tuple[str, list]:
        clauses, params = [], []

        def member(column: str, values: tuple[str, ...], expr: str | None = None) -> None:
            if values and column in self.schema.names:
                clauses.append(f"{expr or quote_ident(column)} IN ({', '.join('?' * len(values))})")
                params.extend(values)
            elif values:
                clauses.append("false")

        member("source", view.source)
        member("split", view.split)
        member("reject_reason", view.reason, "split_part(reject_reason, ' ', 1)")
        if view.status:
            clauses.append(f"keep = {'true' if view.status == 'kept' else 'false'}")
        if view.yaw:
            lo, hi = YAW_EDGES_DEG[0], YAW_EDGES_DEG[1]
            bins = {YAW_BINS[0]: f"abs(yaw_deg) <= {lo}",
                    YAW_BINS[1]: f"abs(yaw_deg) > {lo} AND abs(yaw_deg) <= {hi}",
                    YAW_BINS[2]: f"abs(yaw_deg) > {hi}"}
            # NaN compares as the largest number in duckdb: an unmeasured yaw is in no bin.
            clauses.append("(NOT isnan(yaw_deg) AND (" + " OR ".join(f"({bins[b]})" for b in view.yaw) + "))")
        for column, lo, hi in view.ranges:
            if column not in self.numeric_columns:
                raise BadView(f"{self.ref} has no numeric column {column!r}")
            col = quote_ident(column)
            not_nan = f"NOT isnan({col})" if column in self.float_columns else "true"
            if lo is not None:
                clauses.append(f"({col} >= ? AND {not_nan})")
                params.append(lo)
            if hi is not None:
                clauses.append(f"({col} <= ? AND {not_nan})")
                params.append(hi)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _order(self, view: View) -> tuple[str, str, bool]:
        sort = view.sort or self.default_sort
        if sort not in self.scalar_columns:
            raise BadView(f"{self.ref} has no sortable column {sort!r}")
        descending = view.order == "desc" or (not view.order and not view.sort)
        col = quote_ident(sort)
        # Unmeasured (NaN / null) values last in either direction; face_id breaks ties, so a page is stable.
        missing = f"({col} IS NULL OR isnan({col}))" if sort in self.float_columns else f"({col} IS NULL)"
        return f" ORDER BY {missing}, {col} {'DESC' if descending else 'ASC'}, face_id", sort, descending

    # ---------------------------------------------------------------------------------- queries

    def facets(self) -> dict:
        """The values the filter form offers: sources, splits, reasons (computed once)."""
        if self._facets is None:
            try:
                t = self._query("SELECT source, split, split_part(reject_reason, ' ', 1) AS reason, "
                                "count(*) AS n FROM faces GROUP BY ALL")
                rows = t.to_pylist()
            except _NoShards:
                rows = []
            self._facets = {
                "source": sorted({r["source"] for r in rows}), "split": sorted({r["split"] for r in rows}),
                "reason": sorted({r["reason"] for r in rows if r["reason"]}),
                "faces": sum(r["n"] for r in rows),
            }
        return self._facets

    def page(self, view: View) -> Page:
        """The view's page of faces; a page past the end is the last page (the returned Page's view
        says which), so no page number, however large, reaches the query's OFFSET."""
        where, params = self._where(view)
        order, sort, descending = self._order(view)
        try:
            total = self._query("SELECT count(*) AS n FROM faces" + where, params).column("n")[0].as_py()
        except _NoShards:
            return Page(replace(view, page=1), sort, descending, 0)
        last = max(1, math.ceil(total / view.per_page))
        if view.page > last:
            view = replace(view, page=last)
        offset = (view.page - 1) * view.per_page
        # The sort carries only the rows' addresses (a deep OFFSET sorts every matching row, and the
        # payload it drags along is what costs); the page's columns are then taken by position.
        hits = self._query(f"SELECT _shard, _row FROM faces{where}{order} "
                           f"LIMIT {int(view.per_page)} OFFSET {int(offset)}", params)
        positions = [self._starts[s] + r for s, r in zip(hits.column("_shard").to_pylist(),
                                                         hits.column("_row").to_pylist())]
        rows = self._index.take(pa.array(positions, pa.int64())).select(
            [*self.scalar_columns, "_shard", "_row"]).to_pylist()
        self._attach(rows, CARD_COLUMNS)
        return Page(view, sort, descending, total, rows)

    def face(self, face_id: str) -> dict | None:
        """Every column of one face (`_error` says why its stored columns could not be read), or
        None where no readable shard holds it."""
        try:
            hits = self._query("SELECT _shard, _row FROM faces WHERE face_id = ? LIMIT 1", [face_id])
        except _NoShards:
            return None
        if hits.num_rows == 0:
            return None
        row = hits.to_pylist()[0]
        self._attach([row], tuple(self.schema.names))
        return row

    def _attach(self, rows: list[dict], columns: tuple[str, ...]) -> None:
        """Read `columns` of each row from its own shard, only the row groups holding the rows. A
        shard that fails now (deleted or damaged since opening) leaves its rows' columns None with
        the reason in `_error`; the other rows are served."""
        by_shard: dict[int, list[dict]] = {}
        for row in rows:
            row.update({c: row.get(c) for c in columns}, _error=None)
            by_shard.setdefault(row["_shard"], []).append(row)
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(lambda item: self._read_rows(item[0], item[1], columns), by_shard.items()))

    def _read_rows(self, index: int, shard_rows: list[dict], columns: tuple[str, ...]) -> None:
        shard = self._by_index[index]
        try:
            with open_for_arrow(self._fs, shard.path) as f:
                pf = pq.ParquetFile(f)
                present = [c for c in columns if c in pf.schema_arrow.names]
                meta = pf.metadata
                starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
                groups: dict[int, pa.Table] = {}
                for row in shard_rows:
                    g = int(np.searchsorted(starts, row["_row"], side="right")) - 1
                    if g not in groups:
                        groups[g] = pf.read_row_group(g, columns=present)
                    row.update(groups[g].slice(row["_row"] - int(starts[g]), 1).to_pylist()[0])
        except Exception as err:  # noqa: BLE001 - served as "unavailable", never a crash
            for row in shard_rows:
                row["_error"] = f"{shard.file}: {type(err).__name__}: {err}"


class _NoShards(Exception):
    """Every shard is unavailable (or the version has none): the views are empty."""
