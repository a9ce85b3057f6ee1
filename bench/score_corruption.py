"""Which rescoring signals find bad pseudo-labels - measured on the *training* split, not the eval one.

Takes faces of a training version, corrupts a known fraction of their pseudo-labels the ways real
labels go wrong (the whole shape shifted or scaled off the face, the jaw contour drifting, another
face's shape, per-point jitter), rescores every face with a checkpoint, and prints the ROC-AUC of
each signal and of each way of combining them for "this label was corrupted". The eval split
(aflw2000-dev) stays untouched, so a choice made from these numbers is not tuned on it.

Usage: .venv/bin/python bench/score_corruption.py --dataset wild@v2 --checkpoint CKPT
       [--root out/datasets] [--faces 600] [--corrupt 0.15] [--strength 1] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import emit, header

from pipeline.crops import apply_affine
from pipeline.landmarks import nme_pct
from pipeline.store.faces import iter_face_batches
from pipeline.store.layout import Store, parse_ref, resolve_version
from trainer.checkpoint import load_predictor
from trainer.rescore import _decode_crops, combine, roc_auc, score_batch

JAW = slice(0, 17)


def corrupt(points: np.ndarray, kind: str, rng: np.random.Generator, donor: np.ndarray,
            strength: float = 1.0) -> np.ndarray:
    """One pseudo-label (68, 2) in crop px made wrong in the way `kind` names; `strength` scales
    how far (0.5 puts the corrupted labels near the line between ordinary and bad labels; their median
    NME per strength: docs/rounds.md, 'The critic, checked off the eval split')."""
    centre = points.mean(0)
    size = float(np.sqrt(np.prod(points.max(0) - points.min(0)))) * strength
    out = points.copy()
    if kind == "shift":  # the whole shape slid off the face
        angle = rng.uniform(0, 2 * np.pi)
        out += rng.uniform(0.10, 0.20) * size * np.array([np.cos(angle), np.sin(angle)])
    elif kind == "scale":  # too small or too large a face
        factor = rng.choice([rng.uniform(0.75, 0.85), rng.uniform(1.18, 1.3)])
        out = centre + (out - centre) * (1 + (factor - 1) * strength)
    elif kind == "jaw":  # the contour drifting off the cheek (the commonest real failure at large yaw)
        side = rng.choice([-1.0, 1.0])
        out[JAW, 0] += side * rng.uniform(0.12, 0.25) * size
    elif kind == "donor":  # another face's shape on this face (a mismatched label)
        d = donor - donor.mean(0)
        swapped = centre + d * float(np.sqrt(np.prod(points.max(0) - points.min(0)))) / float(
            np.sqrt(np.prod(donor.max(0) - donor.min(0))))
        out = out + (swapped - out) * min(strength, 1.0)
    elif kind == "jitter":  # every point off by itself
        out += rng.normal(0, 0.08 * size, out.shape)
    return out.astype(np.float32)


KINDS = ("shift", "scale", "jaw", "donor", "jitter")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--root", default="out/datasets")
    parser.add_argument("--faces", type=int, default=600)
    parser.add_argument("--corrupt", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=1.0, help="corruption size (1: ~10%% NME, 0.5: ~5%%)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    name, version = parse_ref(args.dataset)
    store = Store(args.root, name)
    version = resolve_version(store, version)
    crops, labels = [], []
    for batch in iter_face_batches(store, version, columns=["face_id", "crop", "landmarks", "crop_affine",
                                                            "split", "keep"]):
        rows = batch.to_pydict()
        for i in range(batch.num_rows):
            if rows["split"][i] != "train" or not rows["keep"][i]:
                continue  # the faces a round trains on; eval faces are never touched
            crop, ok = _decode_crops([rows["crop"][i]], [rows["face_id"][i]])
            if not ok[0]:
                continue
            pts = np.asarray(rows["landmarks"][i], np.float32).reshape(68, 2)
            crops.append(crop[0])
            labels.append(apply_affine(pts, rows["crop_affine"][i]))
    rng = np.random.default_rng(args.seed)
    take = rng.permutation(len(crops))[: args.faces]
    crops = np.stack([crops[i] for i in take])
    clean = np.stack([labels[i] for i in take])
    n = len(take)
    bad = np.zeros(n, bool)
    bad[rng.permutation(n)[: int(round(args.corrupt * n))]] = True
    kinds = np.full(n, "", dtype=object)
    noisy = clean.copy()
    for j, i in enumerate(np.flatnonzero(bad)):  # the kinds in turn, equally often
        kinds[i] = KINDS[j % len(KINDS)]
        noisy[i] = corrupt(clean[i], kinds[i], rng, clean[rng.integers(n)], args.strength)
    damage = np.asarray(nme_pct(noisy, clean))

    predictor = load_predictor(args.checkpoint, device=args.device)
    raw = {k: [] for k in ("landmark_residual", "cycle_error", "critic_score")}
    for start in range(0, n, 128):
        out = score_batch(predictor, crops[start:start + 128], noisy[start:start + 128])
        for k in raw:
            raw[k].append(out[k])
    raw = {k: np.concatenate(v).astype(np.float64) for k, v in raw.items()}
    weights = {
        "round_weight": combine(raw["landmark_residual"], raw["cycle_error"], raw["critic_score"]),
        "round_weight_critic_floor_0.5": combine(raw["landmark_residual"], raw["cycle_error"],
                                                 raw["critic_score"], critic_floor=0.5),
    }
    result = {**header(), "dataset": f"{name}@v{version}", "checkpoint": args.checkpoint, "faces": n,
              "corrupted": int(bad.sum()), "strength": args.strength, "corruption_nme_pct_median": float(np.median(damage[bad])),
              "auc_landmark_residual": roc_auc(raw["landmark_residual"], bad),
              "auc_cycle_error": roc_auc(raw["cycle_error"], bad),
              "auc_combined_error": roc_auc(np.fmax(raw["landmark_residual"], raw["cycle_error"]), bad),
              "auc_one_minus_critic": roc_auc(1 - raw["critic_score"], bad)}
    for label, w in weights.items():
        result[f"auc_one_minus_{label}"] = roc_auc(1 - np.asarray(w, np.float64), bad)
    for kind in KINDS:  # per kind: residual AUC against the clean faces
        mask = (kinds == kind) | ~bad
        result[f"auc_residual_{kind}"] = roc_auc(raw["landmark_residual"][mask], bad[mask])
        result[f"auc_critic_{kind}"] = roc_auc(1 - raw["critic_score"][mask], bad[mask])
    emit(result, args.json)


if __name__ == "__main__":
    main()
