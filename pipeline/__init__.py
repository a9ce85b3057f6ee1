"""facecurate's curation library: catalog -> sources -> decode -> detect -> quality -> shards.

Pure library: no Prefect import, and no import of `trainer/` or `flows/`, which compose it. The build:
`plan` -> `batch` -> `commit`, composed by `build.build`; every store path is a `store.layout.Store` method.
"""
