"""The build-dataset flow: the library's `build`, its batches mapped on the flow's dask cluster.

All behaviour (lock, clean-up, plan, incremental, resumable, atomic commit) is `pipeline.build`'s; the
flow adds what operating it needs: progress in the UI, the `dataset.landed` event and the report.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import uuid4

from distributed import as_completed
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import get_run_context
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.catalog import load_catalog
from flows.events import emit_landed
from flows.report import publish_report
from flows.runtime import batches_run_in_this_process, dask_task_runner, default_task_runner
from flows.server import TemporaryServer
from pipeline.batch import check_models
from pipeline.build import Batch, BatchResult, build
from pipeline.catalog import store_of
from pipeline.summary import format_summary, version_summary
from pipeline.threads import model_threads, using_model_threads


def _on_dask(dataset: str) -> Callable:
    """The executor the library build maps its batches with: each batch one dask task on the flow's
    cluster (its task runner's client), retried once, with progress twice (rich on the terminal, a
    progress artifact in the Prefect UI).

    Why dask tasks and not a Prefect task per batch (design note 29): a Prefect task serialises and
    rebuilds Prefect's whole settings model, runs its engine and sends its state events to the server,
    for every batch (what that cost a build: docs/benchmarks.md, ninth session).
    The flow run, its logs, the progress artifact, the report and the `dataset.landed` event stay
    Prefect's; a failed batch fails the flow with the batch's own error, as a failed task did."""

    def map_batches(run_batch: Callable[[Batch], BatchResult], batches: list[Batch]) -> list[BatchResult]:
        client = get_run_context().task_runner.client
        # Named by the batch's content key (what a dask dashboard shows), made unique per submission
        # so that nothing is taken from an earlier build's result under the same name.
        sizes = {client.submit(run_batch, batch, key=f"process-batch-{batch.key}-{uuid4().hex[:8]}", retries=1):
                 len(batch.items) for batch in batches}
        total = sum(sizes.values())
        results, done = [], 0
        artifact = create_progress_artifact(0.0, description=f"labelling {total} images of {dataset}")
        with Progress(TextColumn("[bold]labelling"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                      TimeElapsedColumn(), transient=False) as bar:
            job = bar.add_task("images", total=total)
            for future in as_completed(sizes, loop=client.loop):  # this client, not a default one
                results.append(future.result())
                done += sizes[future]
                bar.advance(job, sizes[future])
                update_progress_artifact(artifact, 100.0 * done / max(total, 1))
        return results

    return map_batches


@flow(name="build-dataset", task_runner=default_task_runner())
def build_dataset(catalog_path: str = "catalog.yaml", lock_wait_s: float = 0.0, scores_path: str | None = None,
                  model_threads: int | None = None) -> dict:
    """Build the next version of the catalog's dataset; returns {'dataset', 'version', 'created', ...}.

    `scores_path`: a trainer round's scores table (`facecurate rescore`) folded into the new version.
    `model_threads`: threads per model where the batches run (None: `pipeline.threads` decides).
    """
    logger = get_run_logger()
    catalog = load_catalog(catalog_path)
    version, plan = build(catalog, map_batches=_on_dask(catalog.dataset),
                          lock_wait_s=lock_wait_s, scores_path=scores_path, model_threads=model_threads)
    if version == plan.parent:  # nothing new, or only retries of quarantined items that all failed again
        logger.info("nothing new: %s@v%d stays the latest", catalog.dataset, plan.parent)
        return {"dataset": catalog.dataset, "version": plan.parent, "created": False, "processed": 0}
    store = store_of(catalog)
    summary = version_summary(store, version)
    logger.info("committed %s\n%s", summary["ref"], format_summary(summary))
    # The manifest is committed: tell whoever listens (the retrain deployment's trigger).
    emit_landed(catalog.dataset, version, {"root": catalog.output_root, "counts": summary["manifest"].counts.to_dict()})
    # The report from the summary just made, under this run (the `report` flow would read it all again)
    publish_report(store, version, summary)
    return {"dataset": catalog.dataset, "version": version, "created": True, "processed": plan.new_items,
            "root": catalog.output_root}


def run_build(catalog_path: str, *, dask_address: str | None = None, workers: int | None = None,
              scores_path: str | None = None, temporary_server: TemporaryServer | None = None) -> dict:
    """Run the flow with the dask runner the catalog (or the caller) asks for.

    `temporary_server`: the command's own Prefect server (`flows.server`), still starting: the models
    load meanwhile, in this process, for the local worker threads to share."""
    catalog = load_catalog(catalog_path)  # fail fast, before any Prefect or dask start-up
    ex = catalog.execution
    workers = workers or ex.dask_workers
    address = dask_address or ex.dask_address
    temporary = temporary_server is not None
    runner = dask_task_runner(address, workers, ex.dask_processes, cuda=ex.dask_cuda,
                              threads=ex.threads_per_worker, temporary_server=temporary)
    # Sized for this machine's cores and the worker count actually used (--workers may override the
    # catalog's); a remote cluster's workers have cores of their own: the catalog's model_threads is theirs.
    threads = model_threads(ex, workers=workers)
    if temporary:
        if batches_run_in_this_process(address, ex.dask_processes, ex.dask_cuda, temporary):
            with using_model_threads(threads):  # the build's own check then finds them loaded
                check_models(catalog)
        temporary_server.wait_ready()
    return build_dataset.with_options(task_runner=runner)(catalog_path=str(catalog.path), scores_path=scores_path,
                                                          model_threads=threads)
