"""Build a dataset version: plan what is new (`pipeline.plan`), process it in batches (`pipeline.batch`,
resumable), commit one immutable version (`pipeline.commit`).

`build` composes the three under the dataset's lock with any executor: this process, a thread pool
(`map_batches=pool.map`), dask's client, or the Prefect flow's task runner (`flows/build.py`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import pyarrow as pa

from pipeline.batch import BatchResult, check_models, process_batch
from pipeline.catalog import Catalog, store_for_ref, store_of
from pipeline.commit import commit_version
from pipeline.plan import Batch, BuildPlan, check_scores_parent, clean_abandoned, plan_build
from pipeline.store.files import read_table_file
from pipeline.store.lock import DatasetLock
from pipeline.threads import model_threads as model_threads_for
from pipeline.threads import using_model_threads

log = logging.getLogger(__name__)

# Re-exported: callers of the build import these from here.
__all__ = ["Batch", "BatchResult", "BuildPlan", "build", "check_models", "check_scores_parent", "clean_abandoned",
           "commit_version", "plan_build", "process_batch", "store_for_ref", "store_of"]


def build(catalog: Catalog, *, map_batches: Callable | None = None, progress: Callable | None = None,
          lock_wait_s: float = 0.0, scores: pa.Table | None = None, scores_for_version: int | None = None,
          scores_path: str | None = None, model_threads: int | None = None) -> tuple[int | None, BuildPlan]:
    """Run a whole build: in this process, or with `map_batches(fn, batches) -> results` (`pool.map`,
    a dask client's map, the flow's task runner).

    `model_threads`: threads per model in every process that runs a batch (None: the catalog's local
    layout decides, `pipeline.threads.model_threads`). This process's torch threads are restored after.

    With a trainer round's scores for the latest version (`scores_path`, a file the store names; or the
    `scores` table and the version it is for) the new version folds them in, even when no image is new.
    Returns (the new version or the unchanged latest, the plan).
    """
    store = store_of(catalog)
    threads = model_threads or model_threads_for(catalog.execution)
    # Threads set before the models load: ONNX sessions take their thread count when they are made.
    with using_model_threads(threads), DatasetLock(store, wait_s=lock_wait_s):
        for path in clean_abandoned(catalog):
            log.info("removed abandoned %s", path)
        plan = plan_build(catalog)
        if scores_path is not None:
            scores = read_table_file(store.fs, scores_path)
            scores_for_version = store.scores_version(scores_path)
        check_scores_parent(plan, scores, scores_for_version)
        log.info("%s: %d items listed, %d unchanged, %d new in %d batches%s", catalog.dataset, plan.listed,
                 plan.unchanged, plan.new_items, len(plan.batches), ", rules changed" if plan.rules_changed else "")
        if plan.nothing_to_do and scores is None:
            return plan.parent, plan
        if plan.batches:
            check_models(catalog)  # a model that cannot load stops here, before anything is written
        run_batch = functools.partial(process_batch, catalog, plan.staging_key, model_threads=threads)
        if map_batches is None:
            results = []
            for batch in plan.batches:
                results.append(run_batch(batch))
                if progress:
                    progress(len(batch.items))
        else:
            results = list(map_batches(run_batch, plan.batches))
        return commit_version(catalog, plan, results, scores=scores), plan
