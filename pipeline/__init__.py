"""facecurate's curation library: catalog -> sources -> decode -> detect -> quality -> shards.

Pure library: no Prefect import. `flows/` composes these functions.
"""
