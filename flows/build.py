"""The build-dataset flow: plan on the flow's process, label batches on dask, commit one version.

A thin composition of `pipeline.build`; all behaviour (incremental, resumable, atomic) lives there.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.events import emit_landed
from flows.runtime import dask_task_runner, default_task_runner
from pipeline import shards
from pipeline.build import (Batch, BatchResult, check_models, check_scores_parent, clean_abandoned, commit_version,
                            plan_build, process_batch, scores_version, store_of)
from pipeline.catalog import Catalog, load_catalog
from pipeline.summary import format_summary, version_summary


@task(name="process-batch", cache_policy=NONE, retries=1, retry_delay_seconds=2)
def process_batch_task(catalog: Catalog, staging_key: str, batch: Batch) -> BatchResult:
    return process_batch(catalog, staging_key, batch)


@flow(name="build-dataset", task_runner=default_task_runner())
def build_dataset(catalog_path: str = "catalog.yaml", lock_wait_s: float = 0.0, scores_path: str | None = None) -> dict:
    """Build the next version of the catalog's dataset; returns {'dataset', 'version', 'created', ...}.

    `scores_path`: a trainer round's scores table (`facecurate rescore`) folded into the new version.
    """
    logger = get_run_logger()
    catalog = load_catalog(catalog_path)
    store = store_of(catalog)
    with shards.DatasetLock(store, wait_s=lock_wait_s):
        for path in clean_abandoned(catalog):
            logger.info("removed abandoned %s", path)
        plan = plan_build(catalog)
        scores = shards.read_table_file(store.fs, scores_path) if scores_path else None
        check_scores_parent(plan, scores, scores_version(scores_path) if scores_path else None)
        logger.info("%s: %d items listed, %d unchanged, %d new in %d batches%s", catalog.dataset, plan.listed,
                    plan.unchanged, plan.new_items, len(plan.batches), ", rules changed" if plan.rules_changed else "")
        if plan.nothing_to_do and scores is None:
            logger.info("nothing new: %s@v%d stays the latest", catalog.dataset, plan.parent)
            return {"dataset": catalog.dataset, "version": plan.parent, "created": False, "processed": 0}
        if plan.batches:
            check_models(catalog)  # a model that cannot load stops the flow before any batch or staging
        futures = process_batch_task.map(unmapped(catalog), unmapped(plan.staging_key), plan.batches)
        sizes = {f.task_run_id: len(b.items) for f, b in zip(futures, plan.batches)}
        results, done = [], 0
        # Progress twice: rich on the terminal, a progress artifact in the Prefect UI.
        artifact = create_progress_artifact(0.0, description=f"labelling {plan.new_items} images of {catalog.dataset}")
        with Progress(TextColumn("[bold]labelling"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                      TimeElapsedColumn(), transient=False) as bar:
            job = bar.add_task("images", total=plan.new_items)
            for future in as_completed(futures):
                results.append(future.result())
                done += sizes[future.task_run_id]
                bar.advance(job, sizes[future.task_run_id])
                update_progress_artifact(artifact, 100.0 * done / max(plan.new_items, 1))
        version = commit_version(catalog, plan, results, scores=scores)
        if version == plan.parent:  # only retries of quarantined items, all failing again
            logger.info("nothing new: %s@v%d stays the latest", catalog.dataset, plan.parent)
            return {"dataset": catalog.dataset, "version": plan.parent, "created": False, "processed": 0}
    summary = version_summary(store, version)
    logger.info("committed %s\n%s", summary["ref"], format_summary(summary))
    # The manifest is committed: tell whoever listens (the retrain deployment's trigger).
    emit_landed(catalog.dataset, version, {"root": catalog.output_root, "counts": summary["manifest"]["counts"]})
    from flows.report import report_version

    report_version(catalog_path=str(catalog.path), dataset_ref=summary["ref"])
    return {"dataset": catalog.dataset, "version": version, "created": True, "processed": plan.new_items,
            "root": catalog.output_root}


def run_build(catalog_path: str, *, dask_address: str | None = None, workers: int | None = None,
              scores_path: str | None = None) -> dict:
    """Run the flow with the dask runner the catalog (or the caller) asks for."""
    catalog = load_catalog(catalog_path)  # fail fast, before any Prefect or dask start-up
    ex = catalog.execution
    runner = dask_task_runner(dask_address or ex.dask_address, workers or ex.dask_workers, ex.dask_processes,
                              cuda=ex.dask_cuda, threads=ex.threads_per_worker)
    return build_dataset.with_options(task_runner=runner)(catalog_path=str(catalog.path), scores_path=scores_path)
