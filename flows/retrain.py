"""The retrain flow: one 2DASL training round on a dataset version, then rescoring and the report.

Triggered by the build's `facecurate.dataset.landed` event (its resource names the version). The
idempotency key is the dataset version: a round that completed is not run again, a running one is
not duplicated (lock), and a crashed one resumes from its last checkpoint (`flows.rounds.score_round`,
the round short of the build that `facecurate round` and `rounds` run too; folding is an explicit step).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.catalog import load_catalog
from flows.events import ref_from_resource_id
from flows.rounds import score_round
from pipeline.catalog import store_for_ref
from pipeline.store.layout import resolve_version
from pipeline.store.lock import LockedError


@flow(name="retrain")
def retrain(catalog_path: str = "catalog.yaml", dataset_ref: str | None = None,
            resource_id: str | None = None) -> dict:
    """Train on `dataset_ref` (or the version a landed event's `resource_id` names), rescore, report."""
    from flows.report import report_version

    logger = get_run_logger()
    catalog = load_catalog(catalog_path)
    ref = dataset_ref or (ref_from_resource_id(resource_id) if resource_id else catalog.dataset)
    store, version = store_for_ref(catalog, ref)
    version = resolve_version(store, version)
    try:
        record = score_round(catalog, store, version, logger=logger)
    except LockedError as err:
        logger.warning("not starting a second round on %s@v%d: %s", store.dataset, version, err)
        return {"dataset": store.dataset, "version": version, "skipped": "running elsewhere"}
    if record.get("skipped"):
        return record
    record["report"] = report_version(catalog_path=str(catalog.path), dataset_ref=f"{store.dataset}@v{version}")
    return record
