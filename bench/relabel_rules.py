"""What a round's relabelling would do, cross-fitted: each fold's faces judged by the student that never
trained on them, the decision measured against the wild crops' AFLW-21 references.

Per face it records the current label and the two proposals (the student's answer given the label, and
the fusion of the face's candidates with it), the verifier's predicted NME of each in the rules' units,
the trainer's cycle error and self-critic of the current label, and every one's NME against the
references; then it applies the relabelling rule at several settings and reports, per setting: the share
relabelled, the share of relabelled labels that moved closer to the references, and the kept labels'
NME per yaw bin before and after (kept: the catalog's per-bin bound on the predicted NME).

Usage: .venv/bin/python bench/relabel_rules.py --catalog docs/catalogs/wild-only.yaml --dataset wild@v1 \
           --checkpoints CK_FOLD0 CK_FOLD1 --json out.json [--npz faces.npz]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.compute as pc
from common import emit, header

from pipeline.crops import apply_affine, invert_affine
from pipeline.landmarks import yaw_bins
from pipeline.references import nme21_pct
from pipeline.store.faces import read_faces
from pipeline.store.layout import Store, parse_ref, resolve_version
from trainer.checkpoint import load_predictor
from trainer.data import fold_of
from trainer.rescore import Relabeller, _candidates, _decode_crops, score_batch


def collect(catalog, store: Store, version: int, checkpoints: list[str], batch: int = 128) -> dict[str, np.ndarray]:
    faces = read_faces(store, version, columns=["face_id", "crop", "crop_affine", "landmarks", "ref_points21",
                                                "yaw_deg", "alt_landmarks", "pose", "verifier_nme_pct"])
    faces = faces.filter(pc.is_valid(faces.column("ref_points21")))
    folds = np.array([fold_of(f, len(checkpoints)) for f in faces.column("face_id").to_pylist()])
    relabeller = Relabeller.for_chain(catalog.detectors)
    relabeller.min_gain_pct, relabeller.min_gain_rel = -np.inf, -np.inf  # record every proposal; rules below
    relabeller.critic_relabel = -np.inf
    keys = ("label", "student", "fused", "pred_label", "pred_student", "pred_fused", "critic", "cycle", "residual")
    out = {k: [] for k in keys + ("ref", "bin", "fold", "affine")}
    for k, spec in enumerate(checkpoints):
        if spec == "-":  # that fold's faces are not scored
            continue
        model = load_predictor(spec, device="cpu")
        part = faces.filter(np.asarray(folds == k))
        for start in range(0, part.num_rows, batch):
            rows = part.slice(start, batch)
            n = rows.num_rows
            crops, ok = _decode_crops(rows.column("crop").to_pylist(), rows.column("face_id").to_pylist())
            affine = np.asarray(rows.column("crop_affine").to_pylist(), np.float32).reshape(n, 6)
            label = apply_affine(np.asarray(rows.column("landmarks").to_pylist(), np.float32).reshape(n, 68, 2), affine)
            raw = score_batch(model, crops, label)
            poses = np.asarray(rows.column("pose").to_pylist(), np.float32)
            proposed = relabeller.propose(crops, ok, label, _candidates(rows.column("alt_landmarks").to_pylist(), affine),
                                          raw["points"], poses, round_index=1, critic=None)
            fused = np.stack([label[i] if f is None else f for i, f in enumerate(proposed["fused_crop"])])
            out["label"].append(label)
            out["student"].append(raw["points"])
            out["fused"].append(fused)
            out["pred_label"].append(np.array(proposed["label_nme_pred"], np.float64))
            out["pred_student"].append(np.array(proposed["student_label_nme_pred"], np.float64))
            out["pred_fused"].append(np.array([np.nan if v is None else v for v in proposed["fused_label_nme_pred"]]))
            out["critic"].append(raw["critic_score"])
            out["cycle"].append(raw["cycle_error"])
            out["residual"].append(raw["landmark_residual"])
            out["ref"].append(np.asarray(rows.column("ref_points21").to_pylist(), np.float64).reshape(n, 21, 2))
            out["bin"].append(yaw_bins(rows.column("yaw_deg").to_numpy(zero_copy_only=False)))
            out["fold"].append(np.full(n, k))
            out["affine"].append(affine)
    data = {k: np.concatenate(v) for k, v in out.items()}
    back = np.stack([invert_affine(a) for a in data["affine"]])
    for key in ("label", "student", "fused"):
        image = np.stack([apply_affine(p, b) for p, b in zip(data[key], back)])
        data[f"nme_{key}"] = nme21_pct(image, data["ref"])
    return data


def apply_rule(d: dict, bounds: np.ndarray, *, min_gain: float, min_rel: float, critic_relabel: float,
               use: tuple[str, ...] = ("student", "fused")) -> dict:
    """The relabelling rule (trainer.rescore.Relabeller._decide) on the recorded faces -> what it changes,
    measured on the references: the self-critic's verdict first (the student's answer where the critic
    gives the label a chance of at most `critic_relabel`), else the verifier's margin over the better
    proposal."""
    pred = {k: d[f"pred_{k}"] for k in use}
    best = np.argmin(np.column_stack([np.nan_to_num(pred[k], nan=np.inf) for k in use]), axis=1)
    proposed = np.column_stack([pred[k] for k in use])[np.arange(len(best)), best]
    new_nme = np.column_stack([d[f"nme_{k}"] for k in use])[np.arange(len(best)), best]
    by_margin = (d["pred_label"] - proposed >= np.maximum(min_gain, min_rel * d["pred_label"])) & np.isfinite(proposed)
    by_critic = d["critic"] <= critic_relabel
    change = by_critic | by_margin
    new_nme = np.where(by_critic, d["nme_student"], new_nme)
    proposed = np.where(by_critic, d["pred_student"], proposed)
    after = np.where(change, new_nme, d["nme_label"])
    pred_after = np.where(change, proposed, d["pred_label"])
    bins = d["bin"]
    kept_before = d["pred_label"] <= bounds[np.maximum(bins, 0)]
    kept_after = pred_after <= bounds[np.maximum(bins, 0)]

    def per_bin(v, mask):
        return [round(float(v[mask & (bins == b)].mean()), 3) for b in range(3)]

    closer = (after < d["nme_label"])[change]
    return {"relabelled": int(change.sum()), "by_critic": int(by_critic.sum()), "by_margin": int(by_margin.sum()),
            "relabelled_share": round(float(change.mean()), 4),
            "moved_closer_share": round(float(closer.mean()), 4) if change.any() else None,
            "mean_change_pct": round(float((after - d["nme_label"])[change].mean()), 3) if change.any() else None,
            "kept_before": int(kept_before.sum()), "kept_after": int(kept_after.sum()),
            "kept_nme_before": per_bin(d["nme_label"], kept_before), "kept_nme_after": per_bin(after, kept_after),
            "all_nme_before": per_bin(d["nme_label"], np.ones_like(change)),
            "all_nme_after": per_bin(after, np.ones_like(change))}


def selector_ceiling(d: dict, shares=(0.01, 0.03, 0.05)) -> dict:
    """How often a proposal is closer to the references than the label, among the faces a score ranks
    first, per fold: the best any rule on that score could do when it relabels that share of faces."""
    ok = np.isfinite(d["nme_label"]) & np.isfinite(d["nme_student"])
    scores = {"critic (low first)": -d["critic"], "cycle": d["cycle"], "residual": d["residual"],
              "verifier gain of the answer": d["pred_label"] - d["pred_student"],
              "verifier gain of the fusion": d["pred_label"] - d["pred_fused"],
              "verifier's figure for the label": d["pred_label"]}
    out = {}
    for proposal in ("student", "fused"):
        closer = d[f"nme_{proposal}"] < d["nme_label"]
        out[f"{proposal}: closer among all faces"] = round(float(closer[ok].mean()), 3)
        for name, score in scores.items():
            score = np.where(np.isfinite(score), score, -np.inf)
            for share in shares:
                per_fold = []
                for fold in sorted(set(d["fold"].tolist())):
                    idx = np.flatnonzero(ok & (d["fold"] == fold))
                    top = idx[np.argsort(-score[idx], kind="stable")[: int(share * len(idx))]]
                    per_fold.append(round(float(closer[top].mean()), 3))
                out[f"{proposal} by {name}, top {share:.0%}"] = per_fold
    return out


def main() -> None:
    from flows.catalog import load_catalog

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default="docs/catalogs/wild-only.yaml")
    ap.add_argument("--dataset", default="wild@v1")
    ap.add_argument("--checkpoints", nargs="+", required=True, help="one per fold, in fold order")
    ap.add_argument("--json", default=None)
    ap.add_argument("--npz", default=None, help="keep the per-face records here (or read them if it exists)")
    args = ap.parse_args()
    catalog = load_catalog(args.catalog)
    name, version = parse_ref(args.dataset)
    store = Store(catalog.output_root, name)
    version = resolve_version(store, version)
    import os

    if args.npz and os.path.exists(args.npz):
        data = dict(np.load(args.npz))
    else:
        data = collect(catalog, store, version, args.checkpoints)
        if args.npz:
            np.savez_compressed(args.npz, **data)
    bounds = np.asarray(catalog.rules.drop[0].max_by_yaw_bin, np.float64)
    result = {"dataset": f"{name}@v{version}", "faces": int(len(data["bin"])), "checkpoints": args.checkpoints,
              "nme21_mean": {k: round(float(np.nanmean(data[f"nme_{k}"])), 3) for k in ("label", "student", "fused")},
              "rules": {}}
    for min_gain in (0.1, 0.3):
        for critic_relabel in (-1.0, 0.3, 0.5, 0.7):  # -1: the verifier's margin alone
            for fold in sorted(set(data["fold"].tolist())) + ["all"]:
                part = data if fold == "all" else {k: v[data["fold"] == fold] for k, v in data.items()}
                key = f"gain>={min_gain} critic<={critic_relabel} fold={fold}"
                result["rules"][key] = apply_rule(part, bounds, min_gain=min_gain, min_rel=0.03,
                                                  critic_relabel=critic_relabel)
    result["closer_share_among_the_top_ranked"] = selector_ceiling(data)
    emit({**header(), **result}, args.json)


if __name__ == "__main__":
    main()
