"""The retrain flow: one 2DASL training round on a dataset version, then rescoring and the report.

Triggered by the build's `facecurate.dataset.landed` event (its resource names the version). The
idempotency key is the dataset version: a round that completed is not run again, a running one is
not duplicated (lock), and a crashed one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from prefect import flow, get_run_logger

from flows.catalog import load_catalog
from flows.events import ref_from_resource_id
from pipeline.catalog import store_for_ref
from pipeline.shards import DatasetLock, LockedError, resolve_version, write_atomic


@flow(name="retrain")
def retrain(catalog_path: str = "catalog.yaml", dataset_ref: str | None = None,
            resource_id: str | None = None) -> dict:
    """Train on `dataset_ref` (or the version a landed event's `resource_id` names), rescore, report."""
    from flows.report import report_version
    from trainer.checkpoint import load_predictor
    from trainer.config import train_config
    from trainer.evaluate import evaluate_version
    from trainer.rescore import rescore, write_scores
    from trainer.train import train

    logger = get_run_logger()
    catalog = load_catalog(catalog_path)
    ref = dataset_ref or (ref_from_resource_id(resource_id) if resource_id else catalog.dataset)
    store, version = store_for_ref(catalog, ref)
    version = resolve_version(store, version)
    fs, where = store.fs, store.round_dir(version)
    done = f"{where}/done.json"
    if fs.exists(done):
        logger.info("%s@v%d was already trained: %s", store.dataset, version, done)
        with fs.open(done, "rb") as f:
            return {**json.loads(f.read()), "skipped": "already trained"}
    fs.makedirs(where, exist_ok=True)
    try:
        lock = DatasetLock(store, folder=where).acquire()
    except LockedError as err:
        logger.warning("not starting a second round on %s@v%d: %s", store.dataset, version, err)
        return {"dataset": store.dataset, "version": version, "skipped": "running elsewhere"}
    try:
        cfg = train_config(catalog.training, {"dataset_root": catalog.output_root,
                                              "dataset": f"{store.dataset}@v{version}",
                                              "checkpoint_dir": f"{where}/checkpoints", "resume": True})
        result = train(cfg)
        logger.info("trained %d steps on %s@v%d: %s (last total loss %.4g)", result.steps, store.dataset, version,
                    result.checkpoint, result.final_losses.get("total", float("nan")))
        predictor = load_predictor(result.checkpoint, device=cfg.device)
        scores = rescore(predictor, store, version, round_index=version)
        scores_file = write_scores(store, version, scores, version)
        evaluation = evaluate_version(predictor, store, version)  # on the version's reference (eval) faces
        if evaluation is not None:
            write_atomic(fs, f"{where}/eval.json", json.dumps(evaluation, indent=1).encode())
            logger.info("round on v%d: balanced NME %.2f%% vs references on %d eval faces (pseudo-labels %.2f%%; "
                        "%d labelled training faces left out)", version, evaluation["model"]["balanced"],
                        evaluation["faces"], evaluation["pseudo_labels"]["balanced"],
                        evaluation["labelled_train_faces_skipped"])
        record = {"dataset": store.dataset, "version": version, "checkpoint": result.checkpoint,
                  "steps": result.steps, "scores": scores_file, "faces_scored": scores.num_rows,
                  "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_atomic(fs, done, json.dumps(record, indent=1).encode())  # last: a round without it did not finish
    finally:
        lock.release()
    record["report"] = report_version(catalog_path=str(catalog.path), dataset_ref=f"{store.dataset}@v{version}")
    return record
