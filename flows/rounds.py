"""Trainer rounds without Prefect: train on a version, rescore (and relabel) it, fold it into the next.

`train_round` is one round on one version, made idempotent by its `done.json` (the served retrain flow
runs it too); `run_rounds` is the round trip behind `facecurate rounds`: build the catalog's dataset if
it needs it, then N times train -> rescore -> build the next version with the scores.

Resuming is by what the store already holds, never by a record of its own: a version whose manifest
folds a round (`round_folded`) counts as one round done on its parent, a round folder with `done.json`
is a finished round (its checkpoint and scores are reused), and a round folder without one resumes
training from its newest checkpoint. So a rerun after a crash at any point creates no version twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from pipeline.catalog import Catalog, store_of
from pipeline.store.files import write_atomic
from pipeline.store.layout import Store
from pipeline.store.lock import DatasetLock
from pipeline.store.manifest import Manifest

log = logging.getLogger(__name__)


def _read_json(store: Store, path: str) -> dict:
    with store.fs.open(path, "rb") as f:
        return json.loads(f.read())


def round_record(store: Store, version: int) -> dict | None:
    """The finished round on `version` (its done.json: checkpoint, scores, counts), or None."""
    done = f"{store.round_dir(version)}/done.json"
    return _read_json(store, done) if store.fs.exists(done) else None


def train_round(catalog: Catalog, store: Store, version: int, *, overrides: dict | None = None,
                evaluate: bool = True, logger: logging.Logger | logging.LoggerAdapter = log) -> dict:
    """Train on `store`@`version`, rescore every face with the checkpoint (relabelling where the chain
    has a verifier) and write the scores; returns the round's record, also written as done.json, last.

    The catalog's `training:` section is the config, `overrides` (command flags) on top; the checkpoints
    go to the version's round folder with resume on, so a crashed round continues where it stopped. A
    round with done.json is not run again (its record comes back with `skipped`); one running in
    another process raises LockedError.
    """
    from trainer.checkpoint import load_predictor
    from trainer.config import train_config
    from trainer.evaluate import evaluate_version
    from trainer.rescore import rescore, write_scores
    from trainer.train import train

    fs, where = store.fs, store.round_dir(version)
    done = f"{where}/done.json"
    if (record := round_record(store, version)) is not None:
        logger.info("%s@v%d was already trained: %s", store.dataset, version, done)
        return {**record, "skipped": "already trained"}
    fs.makedirs(where, exist_ok=True)
    lock = DatasetLock(store, folder=where).acquire()
    try:
        cfg = train_config(catalog.training, {"dataset_root": catalog.output_root,
                                              "dataset": f"{store.dataset}@v{version}",
                                              "checkpoint_dir": f"{where}/checkpoints", "resume": True,
                                              **(overrides or {})})
        result = train(cfg)
        logger.info("trained %d steps on %s@v%d: %s (last total loss %.4g)", result.steps, store.dataset, version,
                    result.checkpoint, result.final_losses.get("total", float("nan")))
        predictor = load_predictor(result.checkpoint, device=cfg.device)
        # round index = the version it scores: the name a relabelled face's label_source carries
        scores = rescore(predictor, store, version, round_index=version, chain=catalog.detectors)
        scores_file = write_scores(store, version, scores, version)
        evaluation = evaluate_version(predictor, store, version) if evaluate else None
        if evaluation is not None:  # on the version's reference (eval) faces
            write_atomic(fs, f"{where}/eval.json", json.dumps(evaluation, indent=1).encode())
            logger.info("round on v%d: balanced NME %.2f%% vs references on %d eval faces (pseudo-labels %.2f%%; "
                        "%d labelled training faces left out)", version, evaluation["model"]["balanced"],
                        evaluation["faces"], evaluation["pseudo_labels"]["balanced"],
                        evaluation["labelled_train_faces_skipped"])
        record = {"dataset": store.dataset, "version": version, "round": version, "checkpoint": result.checkpoint,
                  "steps": result.steps, "scores": scores_file, "faces_scored": scores.num_rows,
                  "faces_relabelled": scores.num_rows - scores.column("relabel_landmarks").null_count,
                  "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
        write_atomic(fs, done, json.dumps(record, indent=1).encode())  # last: a round without it did not finish
    finally:
        lock.release()
    return record


def rounds_done(store: Store, version: int) -> int:
    """How many rounds in a row `version`'s lineage folds: v3 folding v2's round, which folded v1's, is 2.
    A version that only adds images or changes rules starts the count again (its data is new)."""
    count = 0
    while version is not None:
        manifest = Manifest.read(store, version)
        if not manifest.round_folded or manifest.parent is None:
            return count
        count, version = count + 1, manifest.parent
    return count


def _build(catalog: Catalog, scores_path: str | None = None) -> int:
    """The library build in this process (no Prefect, no dask): the round trip runs anywhere."""
    from pipeline.build import build

    with ThreadPoolExecutor(catalog.execution.threads_per_worker or 1) as pool:
        version, _ = build(catalog, map_batches=pool.map, scores_path=scores_path)
    return version


def _kept(store: Store, version: int) -> str:
    counts = Manifest.read(store, version).counts
    return f"{counts.faces_kept} of {counts.faces} faces kept"


def run_rounds(catalog: Catalog, rounds: int, *, overrides: dict | None = None,
               say: Callable[[str], None] = print) -> str:
    """Build the catalog's dataset if it needs it, then make its latest version hold `rounds` rounds in a
    row: train on the latest version, rescore and relabel it, build the next version with the scores.
    Rounds the lineage already holds are not run again. Returns the last round's checkpoint path."""
    if rounds < 1:
        raise ValueError(f"rounds: {rounds} must be >= 1")
    store = store_of(catalog)
    version = _build(catalog)
    done = rounds_done(store, version)
    say(f"dataset {store.dataset}@v{version}: {_kept(store, version)}; {done} of {rounds} rounds done")
    record = None
    for n in range(done + 1, rounds + 1):
        record = train_round(catalog, store, version, overrides=overrides)
        reused = " (finished earlier, reused)" if record.get("skipped") else ""
        say(f"round {n}/{rounds} on {store.dataset}@v{version}: {record['steps']} steps{reused}, "
            f"{record['faces_scored']} faces rescored, {record['faces_relabelled']} relabelled -> "
            f"{record['checkpoint']}")
        folded = _build(catalog, record["scores"])
        counts = Manifest.read(store, folded).counts
        say(f"built {store.dataset}@v{folded} (parent v{version}): {_kept(store, folded)}, "
            f"{counts.faces_relabelled} faces relabelled by round {n}")
        version = folded
    if record is None:  # every round was done before: the last one's checkpoint
        parent = Manifest.read(store, version).parent
        record = round_record(store, parent)
        if record is None:
            raise FileNotFoundError(f"{store.dataset}@v{version} folds a round on v{parent}, but "
                                    f"{store.round_dir(parent)}/done.json is missing")
    return record["checkpoint"]
