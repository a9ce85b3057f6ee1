"""Trainer rounds without Prefect: train on a version, rescore (and relabel) it, fold it into the next.

A round's index is the version it trains on and scores: round 3 is the round on v3, its scores are
`scores/v0003-r03.parquet` and its student is the candidate `student:r3`. So the index says which
labels the student learned from, names one round whatever command ran it, and grows along a lineage.

`score_round` is a round short of the build, made idempotent by its `done.json` (the served retrain
flow stops there: folding is an explicit step); `run_round` is a whole round, train -> rescore -> build
the next version with the scores (`facecurate round`, with a given checkpoint instead of training);
`run_rounds` is N of them behind `facecurate rounds`, after building the catalog's dataset if it needs it.

Resuming is by what the store holds, never by a record of its own: a version whose manifest
folds a round (`round_folded`) counts as one round done on its parent, a round folder with `done.json`
is a finished round (its checkpoint and scores are reused), and a round folder without one resumes
training from its newest checkpoint. So a rerun after a crash at any point creates no version twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from flows.inprocess import build_in_process
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


def score_round(catalog: Catalog, store: Store, version: int, *, checkpoint: str | None = None,
                overrides: dict | None = None, evaluate: bool = True,
                logger: logging.Logger | logging.LoggerAdapter = log) -> dict:
    """Round `version` short of the build: train on `store`@`version` (or take `checkpoint`, 'teacher' or a
    path), rescore every face with the model (relabelling where the chain has a verifier) and write the
    scores; returns the round's record, also written as done.json, last.

    The catalog's `training:` section is the config, `overrides` (command flags) on top; the checkpoints
    go to the version's round folder with resume on, so a crashed round continues where it stopped. A
    trained round with done.json is not run again (its record comes back with `skipped`); a given
    checkpoint is always scored (the caller chose the model), replacing the round's record. A round
    running in another process raises LockedError.
    """
    fs, where = store.fs, store.round_dir(version)
    done = f"{where}/done.json"
    if checkpoint is None and (record := round_record(store, version)) is not None:
        logger.info("%s@v%d was already trained: %s", store.dataset, version, done)
        return {**record, "skipped": "already trained"}
    fs.makedirs(where, exist_ok=True)
    lock = DatasetLock(store, folder=where).acquire()
    try:
        record = _score_round_locked(catalog, store, version, checkpoint, overrides, evaluate, logger)
        write_atomic(fs, done, json.dumps(record, indent=1).encode())  # last: a round without it did not finish
    finally:
        lock.release()
    return record


def _score_round_locked(catalog: Catalog, store: Store, version: int, checkpoint: str | None,
                        overrides: dict | None, evaluate: bool, logger) -> dict:
    """`score_round`'s work under the round's lock; returns the record."""
    from trainer.checkpoint import load_predictor
    from trainer.config import train_config
    from trainer.evaluate import evaluate_version
    from trainer.rescore import rescore, write_scores
    from trainer.train import train

    where = store.round_dir(version)
    cfg = train_config(catalog.training, {"dataset_root": catalog.output_root, "dataset": f"{store.dataset}@v{version}",
                                          "checkpoint_dir": f"{where}/checkpoints", "resume": True,
                                          **(overrides or {})})
    steps = None
    if checkpoint is None:
        result = train(cfg)
        checkpoint, steps = result.checkpoint, result.steps
        logger.info("trained %d steps on %s@v%d: %s (last total loss %.4g)", result.steps, store.dataset, version,
                    result.checkpoint, result.final_losses.get("total", float("nan")))
    predictor = load_predictor(checkpoint, device=cfg.training.device)
    scores = rescore(predictor, store, version, round_index=version, chain=catalog.detectors,
                     drop_worst_pct=cfg.round.drop_worst_pct)
    scores_file = write_scores(store, version, scores, version)
    evaluation = evaluate_version(predictor, store, version) if evaluate else None
    if evaluation is not None:  # on the version's reference (eval) faces
        write_atomic(store.fs, f"{where}/eval.json", json.dumps(evaluation, indent=1).encode())
        logger.info("round on v%d: balanced NME %.2f%% vs references on %d eval faces (pseudo-labels %.2f%%; "
                    "%d labelled training faces left out)", version, evaluation["model"]["balanced"],
                    evaluation["faces"], evaluation["pseudo_labels"]["balanced"],
                    evaluation["labelled_train_faces_skipped"])
    return {"dataset": store.dataset, "version": version, "round": version, "checkpoint": checkpoint,
            "steps": steps, "scores": scores_file, "faces_scored": scores.num_rows,
            "faces_relabelled": scores.num_rows - scores.column("relabel_landmarks").null_count,
            "faces_dropped": scores.num_rows - scores.column("drop_reason").null_count,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}


def run_round(catalog: Catalog, store: Store, version: int, *, checkpoint: str | None = None,
              overrides: dict | None = None, evaluate: bool = True,
              build: Callable[[str], int] | None = None,
              scored: Callable[[dict], None] = lambda record: None) -> tuple[dict, int]:
    """One whole round on `store`@`version`: `score_round`, `scored(record)` (to say so before the build
    starts), then the next version built with the round's scores by `build(scores path) -> version`
    (default: `build_in_process`). Returns (the round's record, the version that folds it)."""
    record = score_round(catalog, store, version, checkpoint=checkpoint, overrides=overrides, evaluate=evaluate)
    scored(record)
    if build is None:
        return record, build_in_process(catalog, scores_path=record["scores"])["version"]
    return record, build(record["scores"])


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


def _kept(store: Store, version: int) -> str:
    counts = Manifest.read(store, version).counts
    return f"{counts.faces_kept} of {counts.faces} faces kept"


def _round_line(record: dict, n: int, rounds: int) -> str:
    trained = f"{record['steps']} steps" if record["steps"] is not None else "a given checkpoint"
    reused = " (finished earlier, reused)" if record.get("skipped") else ""
    dropped = f", {record['faces_dropped']} dropped" if "faces_dropped" in record else ""  # older records lack it
    return (f"round {n}/{rounds} on {record['dataset']}@v{record['version']}: {trained}{reused}, "
            f"{record['faces_scored']} faces rescored, {record['faces_relabelled']} relabelled{dropped} -> "
            f"{record['checkpoint']}")


def run_rounds(catalog: Catalog, rounds: int, *, overrides: dict | None = None,
               say: Callable[[str], None] = print) -> str:
    """Build the catalog's dataset if it needs it, then make its latest version hold `rounds` rounds in a
    row: train on the latest version, rescore and relabel it, build the next version with the scores.
    Rounds the lineage already holds are not run again. Returns the last round's checkpoint path."""
    if rounds < 1:
        raise ValueError(f"rounds: {rounds} must be >= 1")
    store = store_of(catalog)
    version = build_in_process(catalog)["version"]
    done = rounds_done(store, version)
    say(f"dataset {store.dataset}@v{version}: {_kept(store, version)}; {done} of {rounds} rounds done")
    record = None
    for n in range(done + 1, rounds + 1):
        record, folded = run_round(catalog, store, version, overrides=overrides,
                                   scored=lambda record, n=n: say(_round_line(record, n, rounds)))
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
