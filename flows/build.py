"""The build-dataset flow: the library's `build`, its batches mapped on the flow's task runner (dask).

All behaviour (lock, clean-up, plan, incremental, resumable, atomic commit) is `pipeline.build`'s; the
flow adds what operating it needs: progress in the UI, the `dataset.landed` event and the report.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
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
from pipeline.threads import batches_per_worker, model_threads, using_model_threads


@task(name="process-batch", cache_policy=NONE, retries=1, retry_delay_seconds=2)
def process_batch_task(run_batch: Callable[[Batch], BatchResult], batch: Batch) -> BatchResult:
    return run_batch(batch)


def submit_head_first(submit: Callable, items: Iterable, head: int | None) -> Iterator:
    """`submit(item)` for every item, the first `head` (at least one) alone and the rest once one of those
    is done (None: all at once); yields the futures as they finish.

    Why: submitting a Prefect task serialises Prefect's whole settings, holding the GIL (3.8.8; figures in
    docs/benchmarks.md). Submitted all at once, the first batches wait for the rest's submission before
    they can start; submitted at each batch's end instead, the next batch waits for it there. The head
    starts at once, and the rest go in one burst while the head's other batches run their networks."""
    finished: queue.SimpleQueue = queue.SimpleQueue()
    items = list(items)
    head = len(items) if head is None else max(head, 1)  # 0 would submit nothing, and wait for nothing
    first, rest = items[:head], items[head:]
    for item in first:
        submit(item).add_done_callback(finished.put)
    in_flight = len(first)
    while in_flight:
        future = finished.get()
        for item in rest:
            submit(item).add_done_callback(finished.put)
        in_flight += len(rest) - 1
        rest = []
        yield future


def _on_task_runner(dataset: str, batches_first: int | None) -> Callable:
    """The executor the library build maps its batches with: one Prefect task per batch on the flow's
    task runner, `batches_first` of them submitted first (`submit_head_first`), with progress twice (rich
    on the terminal, a progress artifact in the Prefect UI)."""

    def map_batches(run_batch: Callable[[Batch], BatchResult], batches: list[Batch]) -> list[BatchResult]:
        sizes: dict = {}

        def submit(batch: Batch):
            future = process_batch_task.submit(run_batch, batch)
            sizes[future.task_run_id] = len(batch.items)
            return future

        total = sum(len(b.items) for b in batches)
        results, done = [], 0
        artifact = create_progress_artifact(0.0, description=f"labelling {total} images of {dataset}")
        with Progress(TextColumn("[bold]labelling"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                      TimeElapsedColumn(), transient=False) as bar:
            job = bar.add_task("images", total=total)
            for future in submit_head_first(submit, batches, batches_first):
                results.append(future.result())
                done += sizes[future.task_run_id]
                bar.advance(job, sizes[future.task_run_id])
                update_progress_artifact(artifact, 100.0 * done / max(total, 1))
        return results

    return map_batches


@flow(name="build-dataset", task_runner=default_task_runner())
def build_dataset(catalog_path: str = "catalog.yaml", lock_wait_s: float = 0.0, scores_path: str | None = None,
                  model_threads: int | None = None, batches_first: int | None = None) -> dict:
    """Build the next version of the catalog's dataset; returns {'dataset', 'version', 'created', ...}.

    `scores_path`: a trainer round's scores table (`facecurate rescore`) folded into the new version.
    `model_threads`: threads per model where the batches run (None: `pipeline.threads` decides).
    `batches_first`: batch tasks submitted before the rest, which follow once one of them is done (None:
    every batch at once).
    """
    logger = get_run_logger()
    catalog = load_catalog(catalog_path)
    version, plan = build(catalog, map_batches=_on_task_runner(catalog.dataset, batches_first),
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
    # One batch for each of a local cluster's batch slots first; another cluster's slots are not known
    # here, so every batch is submitted at once there.
    first = None
    if not address and not ex.dask_cuda:
        first = workers * batches_per_worker(ex.threads_per_worker, workers)
    if temporary:
        if batches_run_in_this_process(address, ex.dask_processes, ex.dask_cuda, temporary):
            with using_model_threads(threads):  # the build's own check then finds them loaded
                check_models(catalog)
        temporary_server.wait_ready()
    return build_dataset.with_options(task_runner=runner)(catalog_path=str(catalog.path), scores_path=scores_path,
                                                          model_threads=threads, batches_first=first)
