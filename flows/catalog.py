"""The catalog as the commands and flows read it: the pipeline's validation, then the `training:`
section checked against the trainer's config (the pipeline itself never imports the trainer)."""

from __future__ import annotations

from pathlib import Path

from pipeline.catalog import Catalog, CatalogError
from pipeline.catalog import load_catalog as _load_pipeline_catalog


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate catalog.yaml; a bad `training:` entry fails here as `<file>: training.<field>: ...`."""
    catalog = _load_pipeline_catalog(path)
    if catalog.training:
        from trainer.config import TrainConfig

        try:
            TrainConfig.from_dict(dict(catalog.training), where="training")
        except ValueError as err:  # names the field: training.<field>: ...
            raise CatalogError(f"{Path(catalog.path).name}: {err}") from None
        except TypeError as err:  # a value of the wrong type
            raise CatalogError(f"{Path(catalog.path).name}: training: {err}") from None
    return catalog
