"""The retrain flow: one 2DASL training round on a dataset version, then rescoring and the report.

Triggered by the build's `facecurate.dataset.landed` event (its resource names the version). The
idempotency key is the dataset version: a round that completed is not run again, a running one is
not duplicated (lock), and a crashed one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger

from flows.events import ref_from_resource_id
from pipeline.catalog import load_catalog
from pipeline.build import store_for_ref
from pipeline.shards import DatasetLock, LockedError, Store, resolve_version


def round_dir(store: Store, version: int) -> Path:
    return Path(store.dir) / "rounds" / f"v{version:04d}"


@flow(name="retrain")
def retrain(catalog_path: str = "catalog.yaml", dataset_ref: str | None = None,
            resource_id: str | None = None) -> dict:
    """Train on `dataset_ref` (or the version a landed event's `resource_id` names), rescore, report."""
    from flows.report import report_version
    from trainer.checkpoint import load_predictor
    from trainer.config import TrainConfig
    from trainer.evaluate import evaluate_version
    from trainer.rescore import rescore, write_scores
    from trainer.train import train

    logger = get_run_logger()
    catalog = load_catalog(catalog_path)
    ref = dataset_ref or (ref_from_resource_id(resource_id) if resource_id else catalog.dataset)
    store, version = store_for_ref(catalog, ref)
    version = resolve_version(store, version)
    where = round_dir(store, version)
    done = where / "done.json"
    if done.exists():
        logger.info("%s@v%d was already trained: %s", store.dataset, version, done)
        return {**json.loads(done.read_text()), "skipped": "already trained"}
    where.mkdir(parents=True, exist_ok=True)
    try:
        lock = DatasetLock(store, name=f"rounds/v{version:04d}/.lock").acquire()
    except LockedError as err:
        logger.warning("not starting a second round on %s@v%d: %s", store.dataset, version, err)
        return {"dataset": store.dataset, "version": version, "skipped": "running elsewhere"}
    try:
        cfg = TrainConfig.from_dict({**catalog.training, "dataset_root": catalog.output_root,
                                     "dataset": f"{store.dataset}@v{version}",
                                     "checkpoint_dir": str(where / "checkpoints"), "resume": True})
        result = train(cfg)
        logger.info("trained %d steps on %s@v%d: %s (last total loss %.4g)", result.steps, store.dataset, version,
                    result.checkpoint, result.final_losses.get("total", float("nan")))
        predictor = load_predictor(result.checkpoint, device=cfg.device)
        scores = rescore(predictor, store, version, round_index=version)
        scores_file = write_scores(store, version, scores, version)
        evaluation = evaluate_version(predictor, store, version)  # on the version's reference (eval) faces
        if evaluation is not None:
            (where / "eval.json").write_text(json.dumps(evaluation, indent=1))
            logger.info("round on v%d: balanced NME %.2f%% vs references on %d eval faces (pseudo-labels %.2f%%; "
                        "%d labelled training faces left out)", version, evaluation["model"]["balanced"],
                        evaluation["faces"], evaluation["pseudo_labels"]["balanced"],
                        evaluation["labelled_train_faces_skipped"])
        record = {"dataset": store.dataset, "version": version, "checkpoint": result.checkpoint,
                  "steps": result.steps, "scores": scores_file, "faces_scored": scores.num_rows,
                  "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(done)  # written last: a round without it did not finish
    finally:
        lock.release()
    record["report"] = report_version(catalog_path=str(catalog.path), dataset_ref=f"{store.dataset}@v{version}")
    return record
