"""The dataset store, one module per concern: `schema` (the pinned Parquet schemas and how older
tables read in them), `layout` (where every version, staging folder and trainer round lives),
`files` (atomic writes, Parquet files), `manifest` (a version's manifest.json, typed), `faces`
(reading a version's faces) and `lock` (one writer per dataset).

A version is `<root>/<dataset>/vNNNN/` with faces-*.parquet, images.parquet, quarantine.parquet and
manifest.json, written last; a version without a manifest does not exist. Any fsspec filesystem works.
"""
