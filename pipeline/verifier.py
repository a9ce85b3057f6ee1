"""The label verifier: a face crop and a candidate 68-point label in, the label's error (NME %) out.

It looks at the image and the label together: the teacher network's feature maps are sampled at
each of the label's points (so the same image with a good and a bad label gives different inputs),
joined with where the other candidates put that point and the head pose, and a small per-point
network predicts each point's error. The face's predicted NME is the mean over the points the
error is measured on (`REGIONS`). No references are needed to run it; they are needed to train it
(`trainer/verifier.py`), and the weights ship with the package (`pipeline/assets/`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.crops import CROP_SIZE
from pipeline.device import resolve_batch_size
from pipeline.label_score import LabelScore, score_features
from pipeline.references import AFLW21_FROM_68

log = logging.getLogger(__name__)

# The independent candidates whose points give each label its geometric context, in a fixed order.
# A chain without one of them marks it absent; the verifier was trained with random absences too.
CONTEXT = ("tddfa_mb05", "tddfa_mb05.flip", "peppa68", "openseeface")
SHIPPED_WEIGHTS = Path(__file__).parent / "assets" / "verifier.pt"
Maps = tuple[Tensor, Tensor]  # the trunk's maps of N crops: [N, C, 30, 30], [N, C', 15, 15]
# A pass's maps as it made them, one Maps per chunk of `batch_size` faces: joining them into one pair
# would copy every map of the batch only for the next pass to cut them up the same way again.
ChunkMaps = list[Maps]
_TRUNK = ("dw2_1", "dw2_2", "dw3_1", "dw3_2", "dw4_1")  # up to 15x15: local appearance, not identity

# Face regions for per-region fusion (iBUG-68 indices).
REGIONS = {"jaw": list(range(0, 17)), "brows": list(range(17, 27)), "nose": list(range(27, 36)),
           "eyes": list(range(36, 48)), "mouth": list(range(48, 68))}


def group_matrix(groups) -> Tensor:
    """[G, 68] averaging matrix: row g averages the 68-point values of group g."""
    m = torch.zeros(len(groups), 68)
    for g, ix in enumerate(groups):
        m[g, ix] = 1.0 / len(ix)
    return m


class VerifierHead(nn.Module):
    """Per-point features -> per-point error (% of face size, >= 0).

    The first layer over the image features is a 1x1 convolution on each face's maps, applied before
    sampling (bilinear sampling is linear, so this equals a linear layer on the sampled features):
    it runs once per face instead of once per label and point."""

    def __init__(self, map_channels: tuple[int, int] = (64, 128), feat: int = 32, n_context: int = len(CONTEXT),
                 hidden: int = 64, glob: int = 32, signed_geo: bool = True, visibility: bool = True):
        super().__init__()
        self.proj30 = nn.Conv2d(map_channels[0], feat, 1)
        self.proj15 = nn.Conv2d(map_channels[1], feat, 1)
        self.point_embed = nn.Embedding(68, 16)
        # The whole crop's look (blur, occlusion, resolution), pooled from the same maps: whether every
        # candidate failed on a face shows in the image, not in where the candidates disagree.
        self.glob = nn.Linear(sum(map_channels), glob) if glob else None
        # signed_geo=False is the first shipped head's: its input ReLU also cut the negative half of
        # every signed offset (kept so that head's file still loads as trained).
        self.signed_geo = signed_geo
        geo = n_context * 3 + 2 + 3  # offsets to each context candidate + presence, offset to their median, pose
        self.net = nn.Sequential(  # the Identity keeps the layers' state-dict names of the first head's files
            nn.Identity(), nn.Linear(2 * feat + geo + 16 + glob, hidden), nn.ReLU(), nn.Linear(hidden, 48), nn.ReLU(),
            nn.Linear(48, 1))
        # Point errors talk to each other: a label's shape is wrong as a whole as often as point by point.
        self.face = nn.Sequential(nn.Linear(68, 64), nn.ReLU(), nn.Linear(64, 68))
        # Whether an annotator would mark the point (logit): the measured NME averages over the marked
        # points only and is normalised by their box, so a face with few marked points (self-occluded,
        # hidden by hair, hands, glasses) measures a higher NME for the same label (docs/labels.md).
        self.vis = nn.Linear(48, 1) if visibility else None

    def forward(self, feats: Tensor, geo: Tensor, glob: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """feats [B, 68, 2*feat] sampled maps, geo [B, 68, G] (`geometry`), glob [B, glob] the crop's pooled
        maps through `self.glob` (`predict_points` projects them once per face, not once per label).
        Returns the per-point errors [B, 68] and, when the head has them, visibility logits [B, 68]."""
        b = feats.shape[0]
        emb = self.point_embed.weight.unsqueeze(0).expand(b, -1, -1)
        parts = [F.relu(feats), geo if self.signed_geo else F.relu(geo), emb]
        if self.glob is not None:
            parts.append(glob[:, None, :].expand(b, 68, -1))
        hidden = self.net[:-1](torch.cat(parts, -1))
        per_point = self.net[-1](hidden).squeeze(-1)  # [B, 68] log-error
        vis = self.vis(hidden).squeeze(-1) if self.vis is not None else None
        return F.softplus(per_point + self.face(per_point)), vis


def trunk_maps(net: nn.Module, crops_bgr_norm: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's feature maps at 30x30 (dw3_1) and 15x15 (dw4_1) for normalised BGR crops."""
    x = net.relu(net.bn1(net.conv1(crops_bgr_norm)))
    outs = []
    for name in _TRUNK:
        x = getattr(net, name)(x)
        if name in ("dw3_1", "dw4_1"):
            outs.append(x)
    return outs[0], outs[1]


def sample_at(maps: Tensor, points_crop: Tensor) -> Tensor:
    """[B, C, H, W] maps sampled at [B, P, 2] crop-pixel points -> [B, P, C] (bilinear, zeros outside)."""
    grid = (points_crop + 0.5) / CROP_SIZE * 2 - 1
    return F.grid_sample(maps, grid.unsqueeze(1), mode="bilinear", padding_mode="zeros",
                         align_corners=False).squeeze(2).transpose(1, 2)


def geometry(label: Tensor, context: Tensor, present: Tensor, pose_deg: Tensor) -> Tensor:
    """Where the other candidates put each point, relative to this label, in units of face size.

    label [B, 68, 2], context [B, K, 68, 2], present [B, K] bool, pose_deg [B, 3] -> [B, 68, 3K + 5].
    """
    b, k = present.shape
    w = present.float()[..., None, None]
    ctx = torch.where(present[..., None, None], context, label.unsqueeze(1))  # absent: no disagreement
    centre = (ctx * w).sum(1) / w.sum(1).clamp_min(1)  # mean of the present candidates
    span = centre.amax(1) - centre.amin(1)
    size = (span[:, 0] * span[:, 1]).clamp_min(1.0).sqrt()[:, None, None]  # [B, 1, 1]
    offsets = (ctx - label.unsqueeze(1)) / size.unsqueeze(1)  # [B, K, 68, 2]
    med = ctx.median(dim=1).values
    parts = [offsets.permute(0, 2, 1, 3).reshape(b, 68, 2 * k),
             present.float()[:, None, :].expand(b, 68, k),
             ((med - label) / size),
             (torch.nan_to_num(pose_deg, nan=0.0) / 90.0)[:, None, :].expand(b, 68, 3)]
    scale = [10.0] * (2 * k) + [1.0] * k + [10.0] * 2 + [1.0] * 3  # offsets are a few % of the face
    return torch.cat(parts, -1) * torch.tensor(scale, device=label.device)


def visibility21(vis_logits: Tensor) -> Tensor:
    """[B, 68] visibility logits -> [B, 21] probability that AFLW's annotators marked each of their points."""
    return torch.sigmoid(vis_logits @ group_matrix(AFLW21_FROM_68).to(vis_logits).T)


def face_nme(per_point: Tensor) -> Tensor:
    """[B, 68] predicted point errors -> [B] predicted NME over the AFLW-21 measurement points."""
    return (per_point @ group_matrix(AFLW21_FROM_68).to(per_point).T).mean(-1)


@dataclass
class VerifierInputs:
    """One face: the teacher's 120x120 crop and every label to judge, in crop pixels."""

    crop_rgb: np.ndarray  # (120, 120, 3) uint8
    labels: np.ndarray  # (L, 68, 2) the labels to score
    context: np.ndarray  # (K, 68, 2) the context candidates in CONTEXT order (anything where absent)
    present: np.ndarray  # (K,) bool
    pose_deg: np.ndarray  # (3,) yaw, pitch, roll (NaN: unknown)

    @classmethod
    def of(cls, crop_rgb: np.ndarray, labels: np.ndarray, candidates: list[tuple[str, np.ndarray]],
           pose_deg: np.ndarray) -> VerifierInputs:
        """A face's inputs from its named candidates [(name, (68, 2))], crop px: the context in CONTEXT
        order, the first candidate standing in where one is absent."""
        by_name = dict(candidates)
        return cls(crop_rgb=crop_rgb, labels=labels, context=np.stack([by_name.get(n, candidates[0][1]) for n in CONTEXT]),
                   present=np.array([n in by_name for n in CONTEXT]), pose_deg=pose_deg)


class Verifier:
    """The shipped verifier: the teacher's trunk (from the teacher weights) + the trained head."""

    def __init__(self, teacher_net: nn.Module, head: VerifierHead, *, device: torch.device | str = "cpu",
                 batch_size: int | None = None, tau_pct: float = 2.0, label_score: LabelScore | None = None):
        self.tau_pct = tau_pct  # the fusion softness chosen when it was trained
        self.label_score = label_score  # None: a file from before it, the head's own figure is the label's
        self.device = torch.device(device)
        self.trunk = teacher_net.eval().to(self.device)
        self.head = head.eval().to(self.device)
        self.batch_size = resolve_batch_size(batch_size, self.device, cpu=16, gpu=256)

    @classmethod
    def load(cls, teacher_net: nn.Module, weights: str | Path | None = None, **kw) -> Verifier:
        path = Path(weights) if weights else SHIPPED_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"verifier weights not found: {path} (train them with "
                                    f"`facecurate verifier-train`, or point `verifier.weights` at a file)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = VerifierHead(**{"glob": 0, "signed_geo": False, "visibility": False, **state["config"]})  # older files
        head.load_state_dict(state["head"])
        tau = (state.get("meta", {}).get("report") or {}).get("tau_pct", 2.0)
        return cls(teacher_net, head, tau_pct=tau, label_score=LabelScore.from_dict(state.get("label_score")), **kw)

    @torch.inference_mode()
    def maps(self, crops_rgb: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(crops_rgb)).to(self.device).permute(0, 3, 1, 2).float()
        x = (x.flip(1) - 127.5) / 128.0  # RGB -> BGR, the teacher's input
        return trunk_maps(self.trunk, x)

    def _predict(self, faces: list[VerifierInputs], maps: ChunkMaps | None = None):
        """The head over `faces` a chunk at a time: yields (chunk, errors [B, L, 68], visibility logits
        [B, L, 68] or None, the chunk's maps), L the chunk's most labels (shorter stacks padded with their
        first label). `maps`: the chunks' trunk maps from an earlier pass over the same crops, in order."""
        for start in range(0, len(faces), self.batch_size):
            chunk = faces[start:start + self.batch_size]
            if maps is None:
                m30, m15 = self.maps(np.stack([f.crop_rgb for f in chunk]))
            else:
                m30, m15 = maps[start // self.batch_size]
                if len(m30) != len(chunk):
                    raise ValueError(f"maps of {len(m30)} crops for a chunk of {len(chunk)} faces: not the pass "
                                     "over these faces")
            t = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=self.device)  # noqa: E731
            n_max = max(len(f.labels) for f in chunk)
            labels = t(np.stack([np.concatenate([f.labels, np.repeat(f.labels[:1], n_max - len(f.labels), 0)])
                                 for f in chunk]))
            err, vis = predict_points(self.head, m30, m15, labels, t(np.stack([f.context for f in chunk])),
                                      torch.as_tensor(np.stack([f.present for f in chunk]), device=self.device),
                                      t(np.stack([f.pose_deg for f in chunk])))
            yield chunk, err, vis, (m30, m15)

    @torch.inference_mode()
    def score(self, faces: list[VerifierInputs], maps: ChunkMaps | None = None) -> list[np.ndarray]:
        """Per face, per label: predicted per-point errors [L, 68] (% of face size). `maps`: the trunk's
        maps of these faces' crops from an earlier pass (`Scored.maps`), so the trunk does not run again."""
        return [p[:len(f.labels)] for chunk, err, _, _ in self._predict(faces, maps)
                for p, f in zip(err.cpu().numpy(), chunk)]

    @torch.inference_mode()
    def score_with_visibility(self, faces: list[VerifierInputs]) -> Scored:
        """`score`, and from the same pass each face's marked-point chances (`visibility`), read where one
        of its labels is its first context candidate (the teacher's points). A face none of whose labels
        is that candidate gets a pass of its own."""
        teacher = [_teacher_row(f) for f in faces]
        errs: list[np.ndarray] = []
        chances: list[np.ndarray] = []
        maps: ChunkMaps = []
        for chunk, err, vis, chunk_maps in self._predict(faces):
            maps.append(chunk_maps)
            errs.extend(p[:len(f.labels)] for p, f in zip(err.cpu().numpy(), chunk))
            if vis is not None:
                rows = [max(r, 0) for r in teacher[len(errs) - len(chunk):len(errs)]]
                chances.append(visibility21(vis[list(range(len(chunk))), rows]).cpu().numpy())
        if self.head.vis is None:
            return Scored(errs, None, maps)
        chances = np.concatenate(chances).astype(np.float64) if chances else np.zeros((0, 21))
        missing = [i for i, r in enumerate(teacher) if r < 0]
        if missing:
            chances[missing] = self.visibility([faces[i] for i in missing])
        return Scored(errs, chances, maps)

    @torch.inference_mode()
    def visibility(self, faces: list[VerifierInputs]) -> np.ndarray | None:
        """[N, 21] the chance that each AFLW point of each face would be marked by an annotator, read at the
        first context candidate's points (the teacher's); None for a head without that output."""
        if self.head.vis is None:
            return None
        at_teacher = [replace(f, labels=f.context[:1]) for f in faces]
        out = [visibility21(vis[:, 0]).cpu().numpy() for _, _, vis, _ in self._predict(at_teacher)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 21))

    def label_nme(self, faces: list[VerifierInputs], label_nme: np.ndarray, context_nme: np.ndarray,
                  visibility: np.ndarray | None = None) -> np.ndarray:
        """The predicted NME (%) of each face's label: `label_score` over the head's figures for the label
        (label_nme [N]) and for the face's CONTEXT candidates (context_nme [N, K], NaN where absent).
        `visibility` [N, 21]: the faces' marked-point chances where a `score_with_visibility` pass has them
        (they depend on the face, not on the label judged); None computes them when the score reads them."""
        label_nme = np.asarray(label_nme, np.float64)
        if self.label_score is None or not len(faces):
            return label_nme
        if not self.label_score.uses_visibility:
            visibility = None
        elif self.head.vis is None:
            raise ValueError("the verifier file's label score reads marked-point chances its head does not "
                             "give: retrain the verifier with `facecurate verifier-train`")
        elif visibility is None:
            visibility = self.visibility(faces)
        return self.label_score(score_features(label_nme, context_nme, np.stack([f.present for f in faces]),
                                               np.stack([f.context for f in faces]),
                                               np.stack([f.pose_deg for f in faces]), visibility))


@dataclass
class Scored:
    """One verifier pass over faces: per face the per-point errors [L, 68] of its labels, [N, 21] the
    faces' marked-point chances (None for a head without them), and the trunk's maps of their crops
    (another pass over the same crops reads them instead of running the trunk again)."""

    point_err: list[np.ndarray]
    visibility: np.ndarray | None
    maps: ChunkMaps | None = None


def _teacher_row(face: VerifierInputs) -> int:
    """The index of the face's first label that is its first context candidate, -1 where none is."""
    same = np.flatnonzero((np.asarray(face.labels) == np.asarray(face.context[0])).all((1, 2)))
    return int(same[0]) if len(same) else -1


def context_nme(names: list[str], nme: np.ndarray) -> np.ndarray:
    """Predicted NMEs of a face's named candidates ([K'] in `names` order) -> [len(CONTEXT)] in CONTEXT
    order, NaN where a context candidate is absent."""
    at = {n: i for i, n in enumerate(names)}
    return np.array([nme[at[n]] if n in at else np.nan for n in CONTEXT], np.float64)


def predict_points(head: VerifierHead, m30: Tensor, m15: Tensor, labels: Tensor, context: Tensor,
                   present: Tensor, pose: Tensor) -> tuple[Tensor, Tensor | None]:
    """The head on already computed maps, one face per map: labels [B, L, 68, 2] -> [B, L, 68] errors
    and [B, L, 68] visibility logits (None for a head without them).

    Every label of a face samples that face's maps (no copy of the maps per label)."""
    b, n_labels = labels.shape[:2]
    flat = labels.reshape(b, n_labels * 68, 2)
    feats = torch.cat([sample_at(head.proj30(m30), flat), sample_at(head.proj15(m15), flat)], -1)
    feats = feats.reshape(b * n_labels, 68, -1)
    rep = lambda t: t.repeat_interleave(n_labels, 0)  # noqa: E731 - small per-face tensors only
    geo = geometry(labels.reshape(b * n_labels, 68, 2), rep(context), rep(present), rep(pose))
    glob = F.relu(head.glob(torch.cat([m30.mean((2, 3)), m15.mean((2, 3))], -1))) if head.glob is not None else None
    err, vis = head(feats, geo, rep(glob) if glob is not None else None)
    return err.reshape(b, n_labels, 68), vis.reshape(b, n_labels, 68) if vis is not None else None


def save_head(head: VerifierHead, path: str | Path, config: dict, meta: dict,
              label_score: LabelScore | None = None) -> None:
    buf = io.BytesIO()
    torch.save({"head": {k: v.half().float() for k, v in head.state_dict().items()}, "config": config,
                "meta": meta, "label_score": label_score.to_dict() if label_score else None}, buf)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(buf.getvalue())
