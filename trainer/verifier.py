"""Train the label verifier (pipeline/verifier.py) on labels whose errors are measured.

Training faces are a version's training-split faces that carry reference points (the wild crops'
AFLW-21 references). Every face gives several labels of the *same image*: each candidate, their
median, and corrupted copies (shifted, scaled, rotated, a drifting jaw, a displaced region, another
face's shape, jitter; graded strengths), each with its error measured against the references, so the
image alone cannot tell a good label from a bad one. K-fold cross-fitting gives every training face
a prediction from a verifier that never saw it; the shipped verifier then trains on all of them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.fusion import fusion_weights, voters
from pipeline.label_score import LabelScore, score_features
from pipeline.landmarks import nme_pct, roc_auc, yaw_bins
from pipeline.references import AFLW21_FROM_68, aflw21_from_68
from pipeline.store.faces import read_faces
from pipeline.verifier import (
    CONTEXT,
    REGIONS,
    VerifierHead,
    face_nme,
    group_matrix,
    predict_points,
    save_head,
    trunk_maps,
    visibility21,
)

log = logging.getLogger(__name__)

JAW = REGIONS["jaw"]
JAW_VOTERS = voters(CONTEXT)  # the candidates are in CONTEXT order: 2D landmarkers do not vote on the jaw
PARTS = [REGIONS[k] for k in ("brows", "eyes", "nose", "mouth")]


@dataclass
class VerifierTrainConfig:
    epochs: int = 20
    feat: int = 48  # head size (pipeline.verifier.VerifierHead)
    hidden: int = 96
    glob: int = 32  # pooled whole-crop features (pipeline.verifier.VerifierHead)
    signed_geo: bool = True
    visibility: bool = True  # also learn which AFLW points the annotators marked (pipeline.verifier.VerifierHead)
    vis_weight: float = 0.1
    batch_faces: int = 48
    lr: float = 2e-3
    n_corrupt: int = 2  # corrupted labels per face and step
    absent_p: float = 0.15  # chance a context candidate is hidden (chains without it still work)
    folds: int = 5
    seed: int = 0
    target_clean: float = 0.985  # the rule's bounds keep this share of kept labels under 8% (training split)
    threads: int = 0  # torch threads (0: leave as is)


@dataclass
class VerifierData:
    """Training or evaluation faces, everything in the 120x120 crop's pixels."""

    face_ids: list[str]
    m30: Tensor  # [N, 64, 30, 30] float16 teacher maps
    m15: Tensor  # [N, 128, 15, 15]
    context: Tensor  # [N, K, 68, 2] candidates in CONTEXT order
    present: Tensor  # [N, K] bool
    pose: Tensor  # [N, 3] teacher's yaw, pitch, roll (degrees)
    ref21: Tensor  # [N, 21, 2] AFLW-21 reference points, NaN where not annotated
    yaw_ref: Tensor  # [N] the reference's yaw (for per-bin reports)


def teacher_maps(net: torch.nn.Module, crops_rgb: np.ndarray, batch: int = 256) -> tuple[Tensor, Tensor]:
    m30, m15 = [], []
    with torch.inference_mode():
        for s in range(0, len(crops_rgb), batch):
            x = torch.from_numpy(np.ascontiguousarray(crops_rgb[s:s + batch])).permute(0, 3, 1, 2).float()
            a, b = trunk_maps(net, (x.flip(1) - 127.5) / 128.0)
            m30.append(a.half())
            m15.append(b.half())
    return torch.cat(m30), torch.cat(m15)


_G21 = group_matrix(AFLW21_FROM_68)


def measured_errors(labels: Tensor, ref21: Tensor) -> tuple[Tensor, Tensor]:
    """labels [B, 68, 2], ref21 [B, 21, 2] (NaN: not annotated) -> per-point errors [B, 21] (NaN where
    not annotated) and NME [B], % of sqrt(w*h) of the annotated reference points' box (the README's
    protocol for the wild crops)."""
    pred = _G21.to(labels) @ labels
    seen = ~torch.isnan(ref21).any(-1)
    ref = torch.nan_to_num(ref21, nan=0.0)
    big = torch.full_like(ref, 1e9)
    lo = torch.where(seen[..., None], ref, big).amin(1)
    hi = torch.where(seen[..., None], ref, -big).amax(1)
    span = hi - lo
    norm = (span[:, 0] * span[:, 1]).clamp_min(1.0).sqrt()
    err = (pred - ref).norm(dim=-1) / norm[:, None] * 100.0
    err = torch.where(seen, err, torch.full_like(err, float("nan")))
    return err, torch.nanmean(err, 1)


def median_label(context: Tensor) -> Tensor:
    """Per point, the median of the K candidates ([B, K, 68, 2] -> [B, 68, 2]; even K: mean of the middle two)."""
    s = context.sort(1).values
    k = s.shape[1]
    return s[:, k // 2] if k % 2 else (s[:, k // 2 - 1] + s[:, k // 2]) / 2


def corrupt(labels: Tensor, donors: Tensor, gen: torch.Generator) -> Tensor:
    """Labels [B, 68, 2] made wrong the ways real labels go wrong, each with a random strength."""
    b = labels.shape[0]
    centre = labels.mean(1, keepdim=True)
    span = labels.amax(1) - labels.amin(1)
    size = (span[:, 0] * span[:, 1]).clamp_min(1.0).sqrt()[:, None, None]
    kind = torch.randint(0, 7, (b,), generator=gen)
    strength = torch.rand(b, generator=gen)[:, None, None]
    angle = torch.rand(b, generator=gen) * 2 * math.pi
    shift = torch.stack([angle.cos(), angle.sin()], -1)[:, None, :] * (0.02 + 0.25 * strength) * size
    factor = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * 0.35)[:, None, None]
    a = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(30)
    rot = torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)
    jaw = labels.clone()
    side = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)[:, None]
    jaw[:, JAW, 0] += side * (0.03 + 0.3 * strength[:, :, 0]) * size[:, :, 0]
    part = labels.clone()
    which = torch.randint(0, len(PARTS), (b,), generator=gen)
    for k, ix in enumerate(PARTS):
        rows = (which == k).nonzero()[:, 0]
        part[rows[:, None], torch.tensor(ix)[None, :]] += shift[rows]
    d = donors - donors.mean(1, keepdim=True)
    dspan = donors.amax(1) - donors.amin(1)
    swapped = centre + d * size / (dspan[:, 0] * dspan[:, 1]).clamp_min(1.0).sqrt()[:, None, None]
    options = [
        labels + shift,  # the whole shape slid off the face
        centre + (labels - centre) * factor,  # too small or too large
        centre + (labels - centre) @ rot.transpose(1, 2),  # rotated
        jaw,  # the contour drifting off the cheek
        part,  # one region (brows, eyes, nose, mouth) displaced
        labels + (swapped - labels) * (0.3 + 0.7 * strength),  # another face's shape
        labels + torch.randn(labels.shape, generator=gen) * (0.01 + 0.09 * strength) * size,  # jitter
    ]
    out = torch.stack(options, 1)[torch.arange(b), kind]
    return out


def label_set(context: Tensor, gen: torch.Generator | None, n_corrupt: int) -> Tensor:
    """[B, K, 68, 2] candidates -> [B, L, 68, 2] labels to learn from: the candidates, their median and
    a random per-region mixture of them (the kinds of label fusion makes), and `n_corrupt` corrupted
    copies of random candidates."""
    b, k = context.shape[:2]
    mix = torch.zeros(b, k, 68)
    for ix in PARTS + [JAW]:
        mix[:, :, ix] = torch.distributions.Dirichlet(torch.ones(k)).sample((b,))[:, :, None]
    labels = [context[:, i] for i in range(k)] + [median_label(context), (mix[..., None] * context).sum(1)]
    for _ in range(n_corrupt):
        src = context[torch.arange(b), torch.randint(0, k, (b,), generator=gen)]
        donors = context[torch.randperm(b, generator=gen), 0]
        labels.append(corrupt(src, donors, gen))
    return torch.stack(labels, 1)


def head_config(cfg: VerifierTrainConfig) -> dict:
    return {"feat": cfg.feat, "hidden": cfg.hidden, "glob": cfg.glob, "signed_geo": cfg.signed_geo,
            "visibility": cfg.visibility}


def _run(head: VerifierHead, data: VerifierData, idx: Tensor, labels: Tensor,
         present: Tensor) -> tuple[Tensor, Tensor | None]:
    return predict_points(head, data.m30[idx].float(), data.m15[idx].float(), labels, data.context[idx], present,
                          data.pose[idx])


def fit(data: VerifierData, idx: Tensor, cfg: VerifierTrainConfig) -> VerifierHead:
    """Train a head on faces `idx`: per-point errors (log scale) and the face's NME."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = VerifierHead(**head_config(cfg))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * math.ceil(len(idx) / cfg.batch_faces)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
    g21 = _G21
    for epoch in range(cfg.epochs):
        t0, total = time.time(), 0.0
        order = idx[torch.randperm(len(idx), generator=gen)]
        for s in range(0, len(order), cfg.batch_faces):
            batch = order[s:s + cfg.batch_faces]
            labels = label_set(data.context[batch], gen, cfg.n_corrupt)
            present = (torch.rand(len(batch), data.context.shape[1], generator=gen) > cfg.absent_p) & data.present[batch]
            present[:, 0] = data.present[batch, 0]  # the teacher's label is always the trunk's
            n_labels = labels.shape[1]
            point_err, vis = _run(head, data, batch, labels, present)
            pred = point_err.reshape(-1, 68) @ g21.T  # [B*L, 21]
            err, nme = measured_errors(labels.reshape(-1, 68, 2), data.ref21[batch].repeat_interleave(n_labels, 0))
            seen = ~torch.isnan(err)
            loss = F.smooth_l1_loss(torch.log1p(pred[seen]), torch.log1p(err[seen])) + \
                F.smooth_l1_loss(torch.log1p(pred.mean(1)), torch.log1p(nme))
            if vis is not None:  # read at the candidates' points, where the landmarks are (not the corrupted copies)
                k = data.context.shape[1]
                marked = ~torch.isnan(data.ref21[batch]).any(-1)  # [B, 21]
                logits = vis[:, :k] @ g21.T  # [B, K, 21]
                loss = loss + cfg.vis_weight * F.binary_cross_entropy_with_logits(
                    logits, marked[:, None, :].expand_as(logits).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
        log.info("verifier epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, cfg.epochs, total / len(order), time.time() - t0)
    return head.eval()


@torch.no_grad()
def predict(head: VerifierHead, data: VerifierData, idx: Tensor, labels: Tensor, batch: int = 128) -> Tensor:
    """Predicted point errors [n, L, 68] of labels [n, L, 68, 2] on faces `idx`, every context present
    as the data says."""
    return predict_with_visibility(head, data, idx, labels, batch)[0]


@torch.no_grad()
def predict_with_visibility(head: VerifierHead, data: VerifierData, idx: Tensor, labels: Tensor,
                            batch: int = 128) -> tuple[Tensor, Tensor | None]:
    """`predict`, and from the same pass [n, 21] the chance each AFLW point is marked, read at the first
    label, as `pipeline.verifier.Verifier` reads it when that label is the teacher's points (the first
    candidate); None for a head without that output."""
    errs, chances = [], []
    for s in range(0, len(idx), batch):
        part = idx[s:s + batch]
        err, vis = _run(head, data, part, labels[s:s + batch], data.present[part])
        errs.append(err)
        if vis is not None:
            chances.append(visibility21(vis[:, 0]))
    err = torch.cat(errs) if errs else torch.zeros(0, labels.shape[1], 68)
    if head.vis is None:
        return err, None
    return err, torch.cat(chances) if chances else torch.zeros(0, 21)


def fold_of(face_ids: list[str], folds: int) -> np.ndarray:
    """A face's fold from its id alone (sha256 prefix), so folds do not depend on row order."""
    return np.array([int(f.split(":")[0][:8], 16) % folds for f in face_ids])


def cross_fit(data: VerifierData, cfg: VerifierTrainConfig) -> list[tuple[VerifierHead, Tensor]]:
    """One head per fold, trained on the other folds, with the faces it must score (never its own)."""
    fold = torch.as_tensor(fold_of(data.face_ids, cfg.folds))
    heads = []
    for k in range(cfg.folds):
        train_idx, test_idx = (fold != k).nonzero()[:, 0], (fold == k).nonzero()[:, 0]
        log.info("fold %d/%d: %d training faces, %d held out", k + 1, cfg.folds, len(train_idx), len(test_idx))
        heads.append((fit(data, train_idx, cfg), test_idx))
    return heads


# ------------------------------------------------------------------------------ from a version


def _crop_frame(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    m = np.asarray(affine, np.float64).reshape(2, 3)
    return (points @ m[:, :2].T + m[:, 2]).astype(np.float32)


def load_faces(store, version: int, teacher_net: torch.nn.Module, *, split: str | None = "train",
               reference: str = "aflw21") -> tuple[VerifierData, dict]:
    """The version's faces that carry references (`aflw21`: AFLW's 21 points; `68`: a .mat source's
    68 points) and its candidates, in crop pixels, with the teacher's maps of their stored crops.

    Returns the data and per-face extras: `ref68` [N, 68, 2] crop px (reference '68'), `source`."""
    import cv2


    column = "ref_points21" if reference == "aflw21" else "ref_landmarks"
    faces = read_faces(store, version, columns=["face_id", "split", "source", "crop", "crop_affine",
                                                       "alt_landmarks", "pose", "ref_pose", column])
    faces = faces.filter(pc.is_valid(faces.column(column)))
    if split is not None:
        faces = faces.filter(pc.equal(faces.column("split"), split))
    rows = faces.to_pylist()
    if not rows:
        raise ValueError(f"{store.dataset}@v{version} has no {split or ''} faces with {column}: build a catalog "
                         f"whose source has `labels: {'aflw21' if reference == 'aflw21' else 'mat'}`")
    crops = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(r["crop"], np.uint8), cv2.IMREAD_COLOR),
                                   cv2.COLOR_BGR2RGB) for r in rows])
    m30, m15 = teacher_maps(teacher_net, crops)
    context = np.zeros((len(rows), len(CONTEXT), 68, 2), np.float32)
    present = np.zeros((len(rows), len(CONTEXT)), bool)
    refs = []
    for i, r in enumerate(rows):
        by_name = {a["name"]: np.asarray(a["points"], np.float32).reshape(68, 2) for a in r["alt_landmarks"] or []}
        for k, name in enumerate(CONTEXT):
            if name in by_name:
                context[i, k] = _crop_frame(by_name[name], r["crop_affine"])
                present[i, k] = True
        context[i, ~present[i]] = context[i, 0]
        n_ref = 21 if reference == "aflw21" else 68
        refs.append(_crop_frame(np.asarray(r[column], np.float32).reshape(n_ref, 2), r["crop_affine"]))
    refs = np.stack(refs)
    pose = np.asarray([r["pose"] for r in rows], np.float32)
    ref_yaw = np.asarray([(r["ref_pose"] or [np.nan])[0] for r in rows], np.float32)
    ref_yaw = np.where(np.isfinite(ref_yaw), ref_yaw, pose[:, 0])  # bins by the reference's yaw where known
    ref21 = refs if reference == "aflw21" else np.stack([aflw21_from_68(x) for x in refs]).astype(np.float32)
    data = VerifierData([r["face_id"] for r in rows], m30, m15, torch.from_numpy(context), torch.from_numpy(present),
                        torch.from_numpy(pose), torch.from_numpy(ref21), torch.from_numpy(ref_yaw))
    return data, {"ref68": refs if reference != "aflw21" else None, "source": [r["source"] for r in rows]}


# --------------------------------------------------------------------------- the verifier's fusions, measured


def predict_and_fuse(head: VerifierHead, data: VerifierData, idx: Tensor, tau: float) -> dict[str, Tensor]:
    """On faces `idx`: each candidate's and the fused label's predicted point errors and points."""
    cands = data.context[idx]
    pred, vis = predict_with_visibility(head, data, idx, cands)  # [n, K, 68], read at the teacher's points
    pred = torch.where(data.present[idx][..., None], pred, torch.full_like(pred, 1e3))  # absent: never chosen
    w = torch.from_numpy(np.stack([fusion_weights(p.numpy(), tau, JAW_VOTERS) for p in pred]))  # [n, K, 68]
    fused = (w[..., None] * cands).sum(1)
    fused_pred = predict(head, data, idx, fused[:, None])[:, 0]
    out = {"cand_points": cands, "cand_pred": pred, "fused": fused, "fused_pred": fused_pred}
    if vis is not None:
        out["visibility"] = vis
    return out


def cross_fitted_fusions(data: VerifierData, heads: list[tuple[VerifierHead, Tensor]],
                            tau: float) -> dict[str, Tensor]:
    """`predict_and_fuse` for every face, each by the head of the fold that did not train on it."""
    out: dict[str, Tensor] = {}
    for head, test_idx in heads:
        part = predict_and_fuse(head, data, test_idx, tau)
        for key, value in part.items():
            out.setdefault(key, torch.zeros(len(data.face_ids), *value.shape[1:]))[test_idx] = value
    return out


TAUS_PCT = (0.25, 0.5, 1.0, 2.0, 4.0)


def choose_tau(outcomes: dict[float, dict], teacher_bins: list) -> float:
    """The fusion softness whose curated dataset is best on the (cross-fitted) training faces: the
    largest share of faces the rule keeps at its target cleanliness, among the taus no yaw bin of
    whose fused labels is worse than the teacher's. The lowest mean NME is not the aim: a sharper
    vote (small tau) lowers the mean but makes more labels that are badly wrong, and those cost the
    rule more faces than the mean gains (docs/labels.md)."""
    fair = [t for t, o in outcomes.items() if all(f <= g for f, g in zip(o["table"]["bins"], teacher_bins))]
    return max(fair or list(outcomes), key=lambda t: outcomes[t]["keep"].mean())


def calibrate_yaw_thresholds(pred_nme: np.ndarray, true_nme: np.ndarray, abs_yaw: np.ndarray, *,
                             bad_pct: float = 8.0, target_clean: float = 0.985) -> tuple[list[float], float]:
    """Per yaw bin, the predicted-NME bound that keeps the same share g of each bin's good labels
    (pose-fair), with g the largest share whose kept labels are at least `target_clean` under `bad_pct`.
    Returns the three bounds and g."""
    bins = yaw_bins(abs_yaw)
    good = true_nme <= bad_pct
    best = None
    for g in np.arange(0.999, 0.499, -0.001):
        bounds = [float(np.quantile(pred_nme[(bins == b) & good], g)) if ((bins == b) & good).any() else np.inf
                  for b in range(3)]
        keep = pred_nme <= np.asarray(bounds)[np.maximum(bins, 0)]
        if keep.any() and (true_nme[keep] <= bad_pct).mean() >= target_clean:
            best = (bounds, float(g))
            break
    if best is None:  # an untrained or tiny run: say so, and keep half of each bin's good labels
        log.warning("no share of good labels keeps %.1f%% of kept labels under %g%%; using 50%%",
                    target_clean * 100, bad_pct)
        best = (bounds, 0.5)
    return best


# ------------------------------------------------------------------------------------ the command


def _bin_means(values: np.ndarray, yaw: np.ndarray) -> list[float | None]:
    bins = yaw_bins(yaw)
    return [float(np.nanmean(values[bins == b])) if (bins == b).any() else None for b in range(3)]


def _label_table(nme: np.ndarray, yaw: np.ndarray) -> dict:
    means = _bin_means(nme, yaw)
    return {"bins": means, "balanced": float(np.mean([m for m in means if m is not None])),
            "mean": float(np.nanmean(nme)), "over_8_pct": float((nme > 8).mean() * 100)}


def _rule_outcome(keep: np.ndarray, nme: np.ndarray, yaw: np.ndarray) -> dict:
    bins = yaw_bins(yaw)
    good = nme <= 8.0
    per_bin = []
    for b in range(3):
        sel = bins == b
        per_bin.append({"faces": int(sel.sum()), "kept_share": float(keep[sel].mean()) if sel.any() else None,
                        "good_kept_share": float(keep[sel & good].mean()) if (sel & good).any() else None,
                        "kept_nme": float(nme[sel & keep].mean()) if (sel & keep).any() else None,
                        "dropped_nme": float(nme[sel & ~keep].mean()) if (sel & ~keep).any() else None})
    return {"kept_share": float(keep.mean()), "kept_under_8_share": float(good[keep].mean()) if keep.any() else None,
            "per_yaw_bin": per_bin, "kept_nme": float(nme[keep].mean()) if keep.any() else None,
            "dropped_nme": float(nme[~keep].mean()) if (~keep).any() else None}


def rule_keeps(pred_nme: np.ndarray, abs_yaw: np.ndarray, bounds) -> np.ndarray:
    """What `max_by_yaw_bin: bounds` keeps (pipeline.quality's rule; an unknown pose takes the loosest bound)."""
    bins = yaw_bins(abs_yaw)
    bound = np.asarray(bounds, np.float64)[np.maximum(bins, 0)]
    bound[bins < 0] = max(bounds)
    return pred_nme <= bound


def label_features(fusions: dict[str, Tensor], data: VerifierData) -> np.ndarray:
    """`score_features` of the fused labels of `predict_and_fuse` over every face of `data`."""
    k = fusions["cand_pred"].shape[1]
    cand_nme = np.stack([face_nme(fusions["cand_pred"][:, j]).numpy() for j in range(k)], 1)
    vis = fusions.get("visibility")
    return score_features(face_nme(fusions["fused_pred"]).numpy(), cand_nme, data.present.numpy(),
                          data.context.numpy(), data.pose.numpy(), None if vis is None else vis.numpy())


def fusion_report(fusions: dict[str, Tensor], nme_of, yaw: np.ndarray, rule, label_nme: np.ndarray | None = None) -> dict:
    """Candidates vs the fused label, the verifier's ROC-AUC, and the per-yaw-bin rule's outcome.

    `nme_of(points [N, 68, 2]) -> [N]` measures against the references; `rule(fused predicted NME,
    fused measured NME) -> (keep, bounds)` decides the faces (the cross-fitted report fits each fold's
    bounds on the other folds). `label_nme` is the fused labels' predicted NME as the build gives it
    (the label score); the head's own figure is reported beside it as `head_auc_*`."""
    out = {"candidates": {}}
    for k, name in enumerate(CONTEXT):
        nme = nme_of(fusions["cand_points"][:, k].numpy())
        pred = face_nme(fusions["cand_pred"][:, k]).numpy()
        out["candidates"][name] = {**_label_table(nme, yaw), "auc_8": roc_auc(pred, nme > 8),
                                   "auc_5": roc_auc(pred, nme > 5)}
    fused_nme = nme_of(fusions["fused"].numpy())
    head_pred = face_nme(fusions["fused_pred"]).numpy()
    fused_pred = head_pred if label_nme is None else label_nme
    out["fused"] = {**_label_table(fused_nme, yaw), "auc_8": roc_auc(fused_pred, fused_nme > 8),
                    "auc_5": roc_auc(fused_pred, fused_nme > 5), "head_auc_8": roc_auc(head_pred, fused_nme > 8),
                    "head_auc_5": roc_auc(head_pred, fused_nme > 5)}
    keep, bounds = rule(fused_pred, fused_nme)
    out["rule"] = {"max_by_yaw_bin": [float(b) for b in bounds], **_rule_outcome(keep, fused_nme, yaw)}
    return out


def train_verifier(store, version: int, teacher_net: torch.nn.Module, out_path, cfg: VerifierTrainConfig,
                   tau: float | None = None) -> dict:
    """Cross-fitted report on the version's training faces with AFLW-21 references, the shipped head
    trained on all of them (with the rule's bounds calibrated on the cross-fitted predictions), and
    the shipped head measured on the evaluation split's 68-point references where the version has them."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data, _ = load_faces(store, version, teacher_net, split="train", reference="aflw21")
    log.info("verifier: %d training faces with AFLW-21 references", len(data.face_ids))
    heads = cross_fit(data, cfg)
    nme21 = lambda pts: np.asarray(measured_errors(torch.from_numpy(pts), data.ref21)[1])  # noqa: E731
    yaw, abs_yaw = data.yaw_ref.numpy(), np.abs(data.pose[:, 0].numpy())
    folds = fold_of(data.face_ids, cfg.folds)

    def cross_fitted_rule(pred, true):
        # Each fold's bounds come from the other folds: the rule's outcome is measured on faces it was
        # not fit on. The bounds reported are the folds' mean, for reading only.
        keep, fold_bounds = np.zeros(len(pred), bool), []
        for k in range(cfg.folds):
            other, this = folds != k, folds == k
            bounds, _ = calibrate_yaw_thresholds(pred[other], true[other], abs_yaw[other], target_clean=cfg.target_clean)
            keep[this] = rule_keeps(pred[this], abs_yaw[this], bounds)
            fold_bounds.append(bounds)
        return keep, np.mean(fold_bounds, axis=0)

    def outcome(tau: float) -> dict:
        """Everything cross-fitted at one fusion softness: the fused labels and their errors, the label
        score's figures (each fold's faces scored by a fit on the others: the score learns from the
        cross-fitted head outputs, how the head errs on faces it did not train on), the rule's keep."""
        fusions = cross_fitted_fusions(data, heads, tau)
        true = nme21(fusions["fused"].numpy())
        features = label_features(fusions, data)
        label_nme = np.zeros(len(true))
        for k in range(cfg.folds):
            other, this = folds != k, folds == k
            label_nme[this] = LabelScore.fit(features[other], true[other])(features[this])
        return {"fusions": fusions, "true": true, "features": features, "label_nme": label_nme,
                "table": _label_table(true, yaw), "keep": cross_fitted_rule(label_nme, true)[0]}

    if tau is None:
        outcomes = {t: outcome(t) for t in TAUS_PCT}
        teacher_bins = _label_table(nme21(data.context[:, 0].numpy()), yaw)["bins"]
        tau = choose_tau(outcomes, teacher_bins)
        tried = {str(t): {**o["table"], "kept_share": float(o["keep"].mean()),
                          "auc_8": roc_auc(o["label_nme"], o["true"] > 8), "auc_5": roc_auc(o["label_nme"], o["true"] > 5)}
                 for t, o in outcomes.items()}
        log.info("fusion tau %.2f (kept share by tau: %s)", tau, {t: round(v["kept_share"], 3) for t, v in tried.items()})
        chosen = outcomes[tau]
    else:
        tried, chosen = None, outcome(tau)
    fusions, fused_true, features = chosen["fusions"], chosen["true"], chosen["features"]
    label_score = LabelScore.fit(features, fused_true, uses_visibility="visibility" in fusions)

    report = {"faces": len(data.face_ids), "config": asdict(cfg), "tau_pct": tau, "version": version,
              "tau_tried": tried, "label_score": label_score.to_dict()}
    report["train_cross_fitted"] = fusion_report(fusions, nme21, yaw, cross_fitted_rule, chosen["label_nme"])
    bounds, share = calibrate_yaw_thresholds(label_score(features), fused_true, abs_yaw, target_clean=cfg.target_clean)
    report["shipped_rule"] = {"max_by_yaw_bin": [round(float(b), 2) for b in bounds], "good_kept_share": share}

    head = fit(data, torch.arange(len(data.face_ids)), cfg)
    try:
        dev, extra = load_faces(store, version, teacher_net, split="eval", reference="68")
    except ValueError:
        dev = None
    if dev is not None:
        dev_fusions = predict_and_fuse(head, dev, torch.arange(len(dev.face_ids)), tau)
        shipped = report["shipped_rule"]["max_by_yaw_bin"]
        dev_abs_yaw = np.abs(dev.pose[:, 0].numpy())
        report["eval_68"] = fusion_report(dev_fusions, lambda pts: nme_pct(pts, extra["ref68"]), dev.yaw_ref.numpy(),
                                          lambda pred, true: (rule_keeps(pred, dev_abs_yaw, shipped), shipped),
                                          label_score(label_features(dev_fusions, dev)))
        report["eval_68"]["faces"] = len(dev.face_ids)
    save_head(head, out_path, config=head_config(cfg), meta={"report": report, "context": list(CONTEXT)},
              label_score=label_score)
    return report


__all__ = ["VerifierTrainConfig", "VerifierData", "CONTEXT", "teacher_maps", "measured_errors", "median_label",
           "corrupt", "label_set", "fit", "predict", "predict_with_visibility", "cross_fit", "fold_of", "load_faces",
           "predict_and_fuse", "cross_fitted_fusions", "calibrate_yaw_thresholds", "label_features", "train_verifier",
           "fusion_report"]
