"""2DASL's losses, one named function each (2DASL.md §3), plus the curation-weighted pseudo-label loss.

Points are crop pixels; 2D/3D distances are divided by face size so every term is scale-free (NME-like).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _dist(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance over the last dim, exact; 0 with a zero (not NaN) gradient where a == b."""
    sq = (a - b).pow(2).sum(-1)
    return torch.where(sq > 0, sq.clamp_min(1e-20).sqrt(), torch.zeros_like(sq))


def face_size(points: Tensor) -> Tensor:
    """sqrt(w * h) of the points' x/y bounding box ([..., N, >=2] -> [...]), detached, at least 1 px."""
    xy = points[..., :2].detach()
    wh = xy.amax(-2) - xy.amin(-2)
    return (wh[..., 0] * wh[..., 1]).clamp_min(1.0).sqrt()


def _weighted_point_error(target: Tensor, pred: Tensor, point_weights: Tensor | None) -> Tensor:
    """Per face: sum_i v_i ||target_i - pred_i|| / face size, with v summing to 1 -> [B]."""
    dist = _dist(pred[..., :2], target[..., :2])  # [B, N]
    if point_weights is None:
        per_face = dist.mean(-1)
    else:
        v = point_weights.to(dist) / point_weights.sum().clamp_min(1e-12)
        per_face = (dist * v).sum(-1)
    return per_face / face_size(target)


def _face_mean(per_face: Tensor, face_weight: Tensor | None) -> Tensor:
    if face_weight is None:
        return per_face.mean() if per_face.numel() else per_face.sum()
    w = face_weight.to(per_face)
    return (per_face * w).sum() / w.sum().clamp_min(1e-12)


def landmark_2d_loss(pred_points: Tensor, pseudo_points: Tensor, face_weight: Tensor) -> Tensor:
    """Pseudo-label loss: mean point distance / face size per face, averaged with curation weights.

    pred_points, pseudo_points: [B, 68, 2] crop px; face_weight: [B] (0 = ignore the face).
    """
    return _face_mean(_weighted_point_error(pseudo_points, pred_points, None), face_weight)


def consistency_2d_loss(map_points_in: Tensor, map_points_pred: Tensor, point_weights: Tensor | None = None,
                        face_weight: Tensor | None = None) -> Tensor:
    """2DASL L_2d-con: the points drawn into the input map (X_2d) vs the same points of Proj(pass 1).

    [B, N, 2] each; `point_weights` [N] are 2DASL's v_i (uniform when None); `face_weight` [B] optional.
    """
    return _face_mean(_weighted_point_error(map_points_in, map_points_pred, point_weights), face_weight)


def consistency_3d_loss(landmarks_3d_pass1: Tensor, landmarks_3d_pass2: Tensor) -> Tensor:
    """2DASL L_3d-con: 3D landmarks X_3d = L3D(pass 1) vs X̂_3d = L3D(pass 2), [B, 68, 3] each.

    Gradient flows into both passes (both are the regressor's outputs, 2DASL.md §3.3).
    """
    dist = _dist(landmarks_3d_pass2, landmarks_3d_pass1)  # [B, 68]
    per_face = dist.mean(-1) / face_size(landmarks_3d_pass1)
    return per_face.mean() if per_face.numel() else per_face.sum()


def cycle_loss(map_points_in: Tensor, map_points_cycle: Tensor, point_weights: Tensor | None = None,
               face_weight: Tensor | None = None) -> Tensor:
    """2DASL L_cyc: the input map points X_2d vs X̂_2d = Proj(pass 2), the end of the 2D->3D->2D->3D->2D cycle."""
    return _face_mean(_weighted_point_error(map_points_in, map_points_cycle, point_weights), face_weight)


def wpdc_loss(pred_params: Tensor, target_params: Tensor, param_std: Tensor,
              points_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """2DASL L_3d: sum_i w_i (α̂_i - α*_i)^2 on whitened params, w_i from landmark reprojection.

    w_i = ||H(α* with coefficient i from α̂) - H(α*)|| / sum_j (same); H = `points_fn(params)`, the 68
    landmarks in 3D (x, y and depth, as 3DDFA's WPDC weighs vertices in 3D: with x, y alone the
    depth row of the pose, params 8-11, would get weight 0). Weights are detached (stop-grad).
    pred_params, target_params: [B, 62] de-whitened; param_std: [62] (the whitening std).
    """
    if pred_params.shape[0] == 0:
        return pred_params.sum() * 0.0
    n = pred_params.shape[-1]
    with torch.no_grad():
        pred, target = pred_params.detach().float(), target_params.float()
        idx = torch.arange(n, device=pred.device)
        perturbed = target[:, None, :].repeat(1, n, 1)  # [B, 62, 62]: row i = α* with α̂_i
        perturbed[:, idx, idx] = pred
        moved = points_fn(perturbed)  # [B, 62, 68, 3]
        base = points_fn(target)[:, None]  # [B, 1, 68, 3]
        err = (moved - base).flatten(2).norm(dim=-1)  # [B, 62]
        weights = err / err.sum(-1, keepdim=True).clamp_min(1e-12)
    diff = (pred_params.float() - target_params.float()) / param_std.float()
    return (weights * diff.pow(2)).sum(-1).mean()


def anchor_loss(params: Tensor, teacher_params: Tensor) -> Tensor:
    """MSE between whitened params and the teacher's whitened params ([B, 62] each).

    Rows whose teacher params are missing (NaN) are ignored; no rows -> 0 (with a graph).
    """
    valid = torch.isfinite(teacher_params).all(-1)
    if not bool(valid.any()):
        return params.sum() * 0.0
    return (params[valid].float() - teacher_params[valid].float()).pow(2).mean()


def critic_losses(d_real: Tensor, d_fake: Tensor) -> tuple[Tensor, Tensor]:
    """2DASL L_sc as BCE on critic logits: (loss_D, loss_G).

    loss_D = BCE(D(real), 1) + BCE(D(fake), 0) trains the critic; loss_G = BCE(D(fake), 1) trains the
    regressor (non-saturating form). Backpropagate each only into its own side's parameters.
    """
    ones_real, zeros_fake = torch.ones_like(d_real), torch.zeros_like(d_fake)
    loss_d = (F.binary_cross_entropy_with_logits(d_real.float(), ones_real.float())
              + F.binary_cross_entropy_with_logits(d_fake.float(), zeros_fake.float()))
    loss_g = F.binary_cross_entropy_with_logits(d_fake.float(), torch.ones_like(d_fake).float())
    return loss_d, loss_g


def label_goodness(map_nme_pct: Tensor, good_pct: float = 3.0, bad_pct: float = 8.0) -> Tensor:
    """The label critic's soft target from the given label's NME (%) against the best label: 1 at or
    under `good_pct` (the noise of a clean label), 0 at or over `bad_pct` (the "bad label" line the
    reports use), linear between; NaN (an empty map) stays NaN."""
    return ((bad_pct - map_nme_pct) / (bad_pct - good_pct)).clamp(0.0, 1.0)


def label_critic_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE of the label critic's logits against soft targets in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


TRUST_GOOD = 0.03  # a given point within this fraction of the face size of the best label is "right"


def trust_loss(trust: Tensor, given: Tensor, target: Tensor) -> Tensor:
    """BCE of the reader's per-point trust ([B, 68], or [B, steps, 68]: every step's) against whether each
    given point is within TRUST_GOOD of the best label's (both [B, 68, 2] crop px); missing points (NaN)
    are left out."""
    present = torch.isfinite(given).all(-1)
    if not bool(present.any()):
        return trust.sum() * 0.0
    err = _dist(torch.nan_to_num(given), target) / face_size(target)[:, None]
    right = (err < TRUST_GOOD).float()
    if trust.dim() == 3:
        steps = trust.shape[1]
        present, right = present[:, None].expand(-1, steps, -1), right[:, None].expand(-1, steps, -1)
    p = trust[present].float().clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(p, right[present])
