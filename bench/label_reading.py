"""Does the student read the label it is given? Cross-fitted on a version's wild crops (AFLW-21 references).

For each fold k, the checkpoint trained without fold k (`facecurate train --holdout-fold k`) reads every
face of fold k with the face's own label as its map; the references are never read by the trainer. Per
face: the label's NME and the student's answer's NME against the references (does it refine the label?),
the answer given another face's label or none (the map ablation), and the trainer's judgements of
the label: its cycle error (label -> answer -> answer again, 2DASL's 2D->3D->2D), its self-critic, and
how far the label lies from the student's own estimate from the image alone (2DASL's self-prediction
consistency, with no label read). Their ROC-AUC at "label NME > 8%" / "> 5%", alone and added to the
verifier's predicted NME (a logistic fit on one fold, scored on the other), with a paired bootstrap
interval for what the trainer's scores add to the verifier refit alone.

Usage: .venv/bin/python bench/label_reading.py --dataset wild@v1 --checkpoints CK_FOLD0 CK_FOLD1 --json out.json
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from common import emit, header

from pipeline.crops import apply_affine, invert_affine
from pipeline.landmarks import nme_pct, roc_auc, yaw_bins
from pipeline.references import nme21_pct
from pipeline.store.faces import read_faces
from pipeline.store.layout import Store, parse_ref, resolve_version
from trainer.checkpoint import load_predictor
from trainer.data import fold_of
from trainer.evaluate import blank_map_params, derangement

THRESHOLDS = (8.0, 5.0)
BOOTSTRAP_DRAWS = 1000


def logistic_fit(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Weights of a ridge-regularised logistic regression (Newton's method); x gets a bias column."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-xb @ w))
        grad = xb.T @ (p - y) + ridge * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + ridge * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def cross_fitted_logit(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold scores of a logistic fit on standardised features."""
    out = np.zeros(len(x))
    for k in np.unique(folds):
        fit, held = folds != k, folds == k
        mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-9
        w = logistic_fit((x[fit] - mu) / sd, y[fit].astype(float))
        out[held] = np.hstack([(x[held] - mu) / sd, np.ones((held.sum(), 1))]) @ w
    return out


def auc_gain_interval(with_scores: np.ndarray, without: np.ndarray, bad: np.ndarray, seed: int = 0) -> list[float]:
    """95% interval of ROC-AUC(with_scores) - ROC-AUC(without) over faces resampled with replacement
    (paired: both scores on the same draw), so a gain inside the sampling noise reads as one."""
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(BOOTSTRAP_DRAWS):
        draw = rng.integers(0, len(bad), len(bad))
        if bad[draw].all() or not bad[draw].any():
            continue
        gains.append(roc_auc(with_scores[draw], bad[draw]) - roc_auc(without[draw], bad[draw]))
    return [round(float(np.percentile(gains, 2.5)), 4), round(float(np.percentile(gains, 97.5)), 4)]


def load_faces(root: str, dataset: str, checkpoints: list[str]) -> dict:
    """The version's faces with references in the folds that have a checkpoint, as arrays (crop px)."""
    name, version = parse_ref(dataset)
    store = Store(root, name)
    version = resolve_version(store, version)
    faces = read_faces(store, version, columns=["face_id", "crop", "crop_affine", "landmarks", "ref_points21",
                                                "yaw_deg", "verifier_nme_pct"])
    faces = faces.filter(pc.is_valid(faces.column("ref_points21")))
    fold = np.array([fold_of(f, len(checkpoints)) for f in faces.column("face_id").to_pylist()])
    scored = np.isin(fold, [k for k, spec in enumerate(checkpoints) if spec != "-"])
    faces, fold = faces.filter(pa.array(scored)), fold[scored]
    n = faces.num_rows
    affine = np.asarray(faces.column("crop_affine").to_pylist(), np.float32).reshape(n, 6)
    label = np.asarray(faces.column("landmarks").to_pylist(), np.float32).reshape(n, 68, 2)
    return {"dataset": f"{name}@v{version}", "fold": fold,
            "label": np.stack([apply_affine(p, a) for p, a in zip(label, affine)]),
            "back": np.stack([invert_affine(a) for a in affine]),
            "ref": np.asarray(faces.column("ref_points21").to_pylist(), np.float64).reshape(n, 21, 2),
            "bins": yaw_bins(faces.column("yaw_deg").to_numpy(zero_copy_only=False)),
            "verifier": faces.column("verifier_nme_pct").to_numpy(zero_copy_only=False).astype(np.float64),
            "crops": np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
                               for b in faces.column("crop").to_pylist()])}


def read_with_students(faces: dict, checkpoints: list[str]) -> dict:
    """Each fold's faces read by the student that never trained on them: its answer given the label,
    the answer given back to it (the cycle), given another face's label and given none, and its critic."""
    label, crops = faces["label"], faces["crops"]
    out = {k: np.zeros_like(label) for k in ("answer", "cycle", "shuffled", "blank")}
    out["critic"] = np.full(len(label), np.nan)
    for k, spec in enumerate(checkpoints):
        if spec == "-":
            continue
        idx = np.flatnonzero(faces["fold"] == k)
        model = load_predictor(spec, device="cpu")
        _, out["answer"][idx], out["critic"][idx] = model.read_labels(crops[idx], label[idx])
        out["cycle"][idx] = model.answer(crops[idx], out["answer"][idx])
        out["shuffled"][idx] = model.answer(crops[idx], label[idx][derangement(len(idx), seed=k)])
        out["blank"][idx] = model.points(blank_map_params(model, crops[idx]))
    return out


def measure(faces: dict, read: dict) -> dict:
    """NME against the references per yaw bin, and each score's ROC-AUC for bad labels."""
    bins, fold, label, verifier = faces["bins"], faces["fold"], faces["label"], faces["verifier"]

    def nme21(points_crop: np.ndarray) -> np.ndarray:
        return nme21_pct(np.stack([apply_affine(p, b) for p, b in zip(points_crop, faces["back"])]), faces["ref"])

    def by_bin(v: np.ndarray) -> dict:
        return {"bins": [round(float(np.nanmean(v[bins == b])), 3) for b in range(3)],
                "mean": round(float(np.nanmean(v)), 3),
                "balanced": round(float(np.mean([np.nanmean(v[bins == b]) for b in range(3)])), 3)}

    label_nme = nme21(label)
    residual, cycle, critic = nme_pct(read["answer"], label), nme_pct(read["cycle"], label), read["critic"]
    image_only = nme_pct(read["blank"], label)  # the label against the student's estimate from the image alone
    result = {"nme21": {"label": by_bin(label_nme), "answer_given_label": by_bin(nme21(read["answer"])),
                        "answer_given_other_label": by_bin(nme21(read["shuffled"])),
                        "answer_given_none": by_bin(nme21(read["blank"]))}, "auc": {}}
    logit = np.log(np.clip(critic, 1e-6, 1 - 1e-6) / np.clip(1 - critic, 1e-6, 1))
    cross = len(np.unique(fold)) > 1
    # The logistic fits' features (log scale: the errors are skewed), the same at every threshold.
    log_verifier = np.log(verifier)
    trainer_feats = [np.log(cycle + 1e-3), np.log(residual + 1e-3), logit]
    image_only_feat = np.log(image_only + 1e-3)
    added = (("verifier_plus_trainer", trainer_feats), ("verifier_plus_image_only", [image_only_feat]),
             ("verifier_plus_all", [*trainer_feats, image_only_feat]))
    for t in THRESHOLDS:
        bad = label_nme > t
        aucs = {"bad": int(bad.sum()),
                "cycle_error": round(roc_auc(cycle, bad), 4),
                "residual": round(roc_auc(residual, bad), 4),
                "one_minus_critic": round(roc_auc(1 - critic, bad), 4),
                "image_only_vs_label": round(roc_auc(image_only, bad), 4),
                "verifier": round(roc_auc(verifier, bad), 4)}
        if cross:
            alone = cross_fitted_logit(log_verifier[:, None], bad, fold)
            aucs["verifier_refit"] = round(roc_auc(alone, bad), 4)
            for name, feats in added:
                scores = cross_fitted_logit(np.column_stack([log_verifier, *feats]), bad, fold)
                aucs[name] = round(roc_auc(scores, bad), 4)
                aucs[f"{name}_gain_ci95"] = auc_gain_interval(scores, alone, bad)
        result["auc"][f"gt_{t:g}"] = aucs
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="wild@v1")
    ap.add_argument("--root", default="out/datasets")
    ap.add_argument("--checkpoints", nargs="+", required=True,
                    help="one per fold, in fold order ('-': skip that fold's faces)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    faces = load_faces(args.root, args.dataset, args.checkpoints)
    result = {"dataset": faces["dataset"], "faces": len(faces["label"]), "checkpoints": args.checkpoints,
              **measure(faces, read_with_students(faces, args.checkpoints))}
    emit({**header(), **result}, args.json)


if __name__ == "__main__":
    main()
