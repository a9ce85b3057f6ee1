"""The build without Prefect or dask: the library's `build`, its batches on a thread pool in this process.

The one build every command and flow that runs without Prefect uses (`build --in-process`, `round
--in-process`, `rounds`, `verifier-train`, the benches): no flow run, no `dataset.landed` event, no
report, for machines without Prefect and for debugging. `flows/build.py` is the same build as a flow.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pipeline.build import build
from pipeline.catalog import Catalog
from pipeline.threads import batches_per_worker


def build_in_process(catalog: Catalog, *, scores_path: str | None = None, threads: int | None = None) -> dict:
    """Build the next version of the catalog's dataset (folding a round's scores file where given) with
    `threads` batches at once (None: `pipeline.threads.batches_per_worker`, one per core on CPU).
    Returns {'dataset', 'version' (the new one, or the unchanged latest), 'created', 'processed'}."""
    with ThreadPoolExecutor(threads or batches_per_worker(catalog.execution.threads_per_worker, 1)) as pool:
        version, plan = build(catalog, map_batches=pool.map, scores_path=scores_path)
    created = version is not None and version != plan.parent
    return {"dataset": catalog.dataset, "version": version, "created": created,
            "processed": plan.new_items if created else 0}
