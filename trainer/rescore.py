"""Rescoring: a trained model re-reads every face of a version and scores how much to trust its label.

Per face: landmark residual (model vs pseudo-label), cycle error (2DASL's 2D->3D->2D cycle), critic score.
Where the dataset's detector chain has a verifier, the round also relabels: the student's points join
the face's candidates, the verifier judges them all, and when their fusion is predicted better than
the current label by a margin the scores propose it as the face's new label (`Relabeller`); the next
version takes it (pipeline/rounds.py `apply_relabels`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.catalog import DetectorChain
from pipeline.crops import CROP_SIZE, apply_affine, invert_affine
from pipeline.landmarks import YAW_BINS, nme_pct, roc_auc, yaw_bins  # noqa: F401 - roc_auc lives with the other metrics
from pipeline.rounds import STUDENT_PREFIX, is_round_drop, round_drop_reason, student_name
from pipeline.store.faces import faces_schema, iter_face_batches, read_faces
from pipeline.store.files import open_for_arrow, write_table
from pipeline.store.layout import Store, resolve_version
from pipeline.store.schema import SCORES_SCHEMA, conform_scores
from trainer.config import RoundConfig
from trainer.data import TRAIN_SPLIT

log = logging.getLogger(__name__)

_COLUMNS = ["face_id", "crop", "landmarks", "crop_affine"]

# combine(): a label whose model residual is within RESIDUAL_OK_PCT keeps full weight (the teacher's
# own NME on AFLW2000-3D is a few percent - figures: README.md, 'Measured (2-core CPU, no GPU)' - so a
# few percent of disagreement is ordinary noise); beyond it the weight decays by e every
# RESIDUAL_SCALE_PCT. At the defaults 8% -> 0.37, 12% -> 0.14, 13.2% -> 0.1.
RESIDUAL_OK_PCT = 4.0
RESIDUAL_SCALE_PCT = 4.0
# The critic is a GAN discriminator, only a prior (2DASL.md §3.5): it may scale a weight down to
# CRITIC_FLOOR, linearly as its score falls from CRITIC_OK to 0. The default floor is 1, i.e. the
# critic is recorded but does not move the weight: measured, it finds no bad labels - at chance on
# synthetically corrupted labels of the *training* split for every kind of corruption
# (bench/score_corruption.py) and worse than chance on the eval split (figures: docs/rounds.md, 'The
# critic, checked off the eval split' and 'How well round 2's scores find bad labels'). It
# scores the params the model predicts from the label's map, and a model that leans on the image more
# than on the map predicts much the same params for a good and a bad label. Lower the floor (0.5 was
# the first default) for a critic that has shown it can tell.
CRITIC_OK = 0.5
CRITIC_FLOOR = 1.0

# Relabelling: a proposed label replaces the current one only when the verifier predicts it better by
# at least RELABEL_MIN_GAIN_PCT points of NME and by RELABEL_MIN_GAIN_REL of the current prediction.
# The absolute floor is above the prediction's own noise: the same label re-judged on the stored JPEG
# crop (the build judged the crop before encoding) moves by less than RELABEL_MIN_GAIN_PCT, so a
# smaller gain is noise (figures: docs/rounds.md, 'Relabelling (wild crops, cross-fitted ...)'). The
# relative part keeps a label the verifier already finds poor from flipping to a near-equal one:
# every change costs the next round a moving target.
RELABEL_MIN_GAIN_PCT = 0.1
RELABEL_MIN_GAIN_REL = 0.03
# The trainer's own judgement: a label whose self-critic chance of being right is at most this is
# replaced by the student's answer (the label read and corrected) whatever the verifier predicts.
# Chosen on one cross-fitting fold of the wild crops and checked on the other (docs/rounds.md).
CRITIC_RELABEL = 0.5
# The trainer's own drop: each round drops this share (%) of each yaw bin's kept faces, those whose
# cycle error it ranks worst (2DASL's cycle, label -> student -> student again, judges the label).
# Ranked per bin, not against a fixed bound: a student's errors have no fixed scale, and profile
# faces err more for every label. Chosen on one cross-fitting fold of the wild crops and checked on
# the other. A face a round drops stays dropped in later rounds until its label changes, so each
# round's drops add to the ones before. This is the default of the catalog's `training:
# {round_drop_worst_pct: N}` (`trainer.config.RoundConfig`); 0 turns the drop off, and earlier
# rounds' drops then lapse (figures: docs/rounds.md, 'The trainer's own drop').
ROUND_DROP_WORST_PCT = RoundConfig.drop_worst_pct


def combine(residual_pct: np.ndarray, cycle_pct: np.ndarray, critic: np.ndarray, *,
            residual_ok_pct: float = RESIDUAL_OK_PCT, residual_scale_pct: float = RESIDUAL_SCALE_PCT,
            critic_ok: float = CRITIC_OK, critic_floor: float = CRITIC_FLOOR) -> np.ndarray:
    """Per-face new weight in [0, 1] from the residual, the cycle error (both NME %) and the critic.

    error = max(residual, cycle): a label is only as good as the worse of the two checks (the cycle
    catches labels the model "agrees with" only because the map told it so, then drifts from on
    re-feeding). weight = exp(-max(error - ok, 0) / scale) x critic factor (1 when the critic is NaN,
    and at the default floor of 1).
    A face whose errors are not finite (undecodable crop, degenerate label) gets weight 0.
    """
    residual = np.asarray(residual_pct, dtype=np.float64)
    cycle = np.asarray(cycle_pct, dtype=np.float64)
    error = np.fmax(residual, cycle)  # fmax: a NaN cycle falls back to the residual and vice versa
    weight = np.exp(-np.maximum(error - residual_ok_pct, 0.0) / residual_scale_pct)
    critic = np.asarray(critic, dtype=np.float64)
    factor = 1.0 - (1.0 - critic_floor) * (1.0 - np.clip(critic / critic_ok, 0.0, 1.0))
    weight = weight * np.where(np.isfinite(critic), factor, 1.0)
    return np.where(np.isfinite(error), np.clip(weight, 0.0, 1.0), 0.0).astype(np.float32)


def _decode_crops(blobs: list[bytes], face_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """JPEG crops -> RGB uint8 [B,120,120,3] and a mask of the ones that decoded (others are black)."""
    crops = np.zeros((len(blobs), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    ok = np.zeros(len(blobs), dtype=bool)
    for i, blob in enumerate(blobs):
        bgr = cv2.imdecode(np.frombuffer(blob or b"", np.uint8), cv2.IMREAD_COLOR) if blob else None
        if bgr is None or bgr.shape[:2] != (CROP_SIZE, CROP_SIZE):
            log.warning("face %s: crop is not a decodable %dx%d JPEG; scored with weight 0",
                        face_ids[i], CROP_SIZE, CROP_SIZE)
            continue
        crops[i] = bgr[:, :, ::-1]
        ok[i] = True
    return crops, ok


def score_batch(predictor, crops_rgb: np.ndarray, pseudo_crop: np.ndarray) -> dict[str, np.ndarray]:
    """The three raw scores (and pass 1's points) for one batch: crops [B,120,120,3] RGB, pseudo-labels
    [B,68,2] crop px.

    Pass 1 gives the student the pseudo-label; its answer Y (the label read and corrected) gives the
    residual. Pass 2 gives it Y on the same crop (2DASL's cycle); its answer X̂ vs the pseudo-label gives
    the cycle error. Both are NME % normalised by sqrt(w*h) of the pseudo-label's box. The critic is
    the student's self-critic judging the pseudo-label.
    """
    _, points_y, critic = predictor.read_labels(crops_rgb, pseudo_crop)
    points_x_hat = predictor.answer(crops_rgb, points_y)
    return {
        "landmark_residual": np.asarray(nme_pct(points_y, pseudo_crop), dtype=np.float32),
        "cycle_error": np.asarray(nme_pct(points_x_hat, pseudo_crop), dtype=np.float32),
        "critic_score": np.asarray(critic, dtype=np.float32),
        "points": np.asarray(points_y, dtype=np.float32),  # the student's points, crop px
    }


def _to_image(points_crop: np.ndarray, affines: np.ndarray) -> np.ndarray:
    """[B, 68, 2] crop px -> image px, each face through the inverse of its own crop affine."""
    return np.stack([apply_affine(p, invert_affine(a)) for p, a in zip(points_crop, affines)]) if len(points_crop) \
        else np.zeros((0, 68, 2), np.float32)


@dataclass
class Relabeller:
    """The chain's verifier judging the student as one more candidate: proposes new labels.

    `fuse` follows the chain: a chain whose labels are fusions proposes the fusion of the face's
    candidates with the student (the student as an extra candidate, the chain's tau); a chain that
    keeps one candidate's points as the label proposes the student's own points."""

    verifier: object  # pipeline.verifier.Verifier
    tau_pct: float
    fuse: bool
    min_gain_pct: float = RELABEL_MIN_GAIN_PCT
    min_gain_rel: float = RELABEL_MIN_GAIN_REL
    critic_relabel: float = CRITIC_RELABEL

    @classmethod
    def for_chain(cls, chain: DetectorChain | None) -> Relabeller | None:
        """The relabeller of a catalog's chain, or None when the chain has no verifier (no relabelling)."""
        if chain is None or chain.verifier is None:
            return None
        from pipeline.labeling import get_chain  # the build's chain: the verifier over its tddfa_mb05 network

        verifier = get_chain(chain).verifier
        return cls(verifier, chain.verifier.tau_pct or verifier.tau_pct, chain.verifier.fuse)

    def propose(self, crops: np.ndarray, ok: np.ndarray, labels: np.ndarray, candidates: list[list[tuple[str, np.ndarray]]],
                student: np.ndarray, poses: np.ndarray, round_index: int,
                critic: np.ndarray | None = None) -> dict[str, list]:
        """One batch, crop px throughout: crops [B,120,120,3], ok [B] (decoded), labels [B,68,2] the current
        labels, candidates per face [(name, [68,2])] (earlier students left out), student [B,68,2], poses
        [B,3], critic [B] the self-critic's chance that each current label is right (None: no critic).
        Returns per-face lists (None where a face is not judged) for the relabelling columns.

        The student joins the face's candidates and they are judged as the build judges them
        (`judge_candidates`, the current label scored beside them). The proposal is their fusion or the
        student's own answer, whichever the verifier predicts better; it replaces the label when predicted
        better by the margin. Where the self-critic gives the current label a chance of at most
        `critic_relabel`, the student's answer replaces it whatever the verifier predicts."""
        from pipeline.fusion import region_weights
        from pipeline.judging import FaceCandidates, judge_candidates

        n = len(labels)
        out = {k: [None] * n for k in ("student_nme_pred", "label_nme_pred", "candidate_nme_pred", "relabel_crop",
                                       "relabel_nme_pred", "relabel_source", "relabel_reason", "relabel_fusion_weights")}
        todo = [i for i in range(n) if ok[i] and candidates[i] and np.isfinite(student[i]).all()]
        if not todo:
            return out
        name = student_name(round_index)
        judged = judge_candidates(self.verifier, [
            FaceCandidates(crops[i], candidates[i], poses[i], joining=[(name, student[i])], others=[labels[i]])
            for i in todo], tau_pct=self.tau_pct, fuse_labels=self.fuse)
        heads = [j.head_nme for j in judged.faces]  # the candidates', the student's, the current label's
        # The current label and the student's own answer (the label it was given, read and corrected) in
        # the rules' units, as the build measures a label, so that they and the fusion compare.
        label_nme = judged.measure(self.verifier, [labels[i] for i in todo], [h[-1] for h in heads])
        student_nme = dict(zip(todo, judged.measure(self.verifier, [student[i] for i in todo], [h[-2] for h in heads])))
        for i, head, current in zip(todo, heads, label_nme):
            out["candidate_nme_pred"][i] = head[:-1].tolist()
            out["student_nme_pred"][i], out["label_nme_pred"][i] = float(head[-2]), float(current)
        out["student_label_nme_pred"] = [student_nme.get(i) for i in range(n)]
        fused = dict(zip(todo, judged.faces)) if self.fuse else {}
        out["fused_crop"] = [fused[i].label if i in fused else None for i in range(n)]
        out["fused_label_nme_pred"] = [fused[i].label_nme if i in fused else None for i in range(n)]
        for i in todo:
            options = [(fused[i].label_nme, fused[i].label, fused[i].fusion_weights, f"fused+{name}",
                        "fused with")] if self.fuse else []
            weights = np.zeros((len(candidates[i]) + 1, 68), np.float32)
            weights[-1] = 1.0
            options.append((student_nme[i], student[i], region_weights(weights), name, "replaced by"))
            decision = self._decide(out["label_nme_pred"][i], options, None if critic is None else critic[i], name)
            if decision is not None:
                for key, value in zip(("relabel_nme_pred", "relabel_crop", "relabel_fusion_weights",
                                       "relabel_source", "relabel_reason"), decision):
                    out[key][i] = value
        return out

    def _decide(self, current: float, options: list[tuple], critic: float | None, name: str) -> tuple | None:
        """One face: (predicted NME, points, region weights as a list, source, reason) of its new label, or
        None to keep it. `options` are (predicted NME, points, region weights, source, verb), the student's
        own answer last."""
        proposed, points, region_w, source, verb = min(options, key=lambda o: o[0])
        reason = f"{verb} {name}: predicted NME {current:.2f}% -> {proposed:.2f}%"
        if critic is not None and np.isfinite(critic) and critic <= self.critic_relabel:
            # the self-critic finds the label wrong: the student's corrected label replaces it
            proposed, points, region_w, source = options[-1][:4]
            reason = f"the self-critic finds the label wrong ({critic:.2f}): replaced by {name}"
        elif not (np.isfinite(current) and np.isfinite(proposed)) or \
                current - proposed < max(self.min_gain_pct, self.min_gain_rel * current):
            return None
        return proposed, points, region_w.tolist(), source, reason


def _candidates(alt_column: list, affines: np.ndarray) -> list[list[tuple[str, np.ndarray]]]:
    """The rows' candidates in crop px, without earlier rounds' students (a face judges one student)."""
    out = []
    for alts, affine in zip(alt_column, affines):
        out.append([(a["name"], apply_affine(np.asarray(a["points"], np.float32).reshape(68, 2), affine))
                    for a in (alts or []) if not a["name"].startswith(STUDENT_PREFIX)])
    return out


def worst_by_yaw_bin(error: np.ndarray, keep: np.ndarray, yaw_deg: np.ndarray, pct: float) -> np.ndarray:
    """The kept faces whose `error` is among the worst `pct` % of their yaw bin (`yaw_bins`): per bin,
    round(pct% of its kept faces with a finite error) of them, highest error first (ties by position).
    Faces without a bin (no yaw) or without a finite error are never picked."""
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"worst_by_yaw_bin: pct={pct} must be in [0, 100]")
    error = np.asarray(error, np.float64)
    bins = yaw_bins(yaw_deg)
    picked = np.zeros(len(error), bool)
    for b in range(3):
        ranked = np.flatnonzero(np.asarray(keep, bool) & (bins == b) & np.isfinite(error))
        n = int(round(len(ranked) * pct / 100.0))
        if n:
            picked[ranked[np.argsort(-error[ranked], kind="stable")[:n]]] = True
    return picked


def _round_drops(table: pa.Table, keep: np.ndarray, yaw_deg: np.ndarray, reject_reason: list, pct: float,
                 round_index: int) -> pa.Table:
    """The round's drop (`ROUND_DROP_WORST_PCT`): new_weight 0 and a drop_reason for the faces an earlier
    round dropped (their reason carried, unless this round gave them a new label) and for the kept
    faces whose cycle error is among the worst `pct` % of their yaw bin."""
    error = table.column("cycle_error").to_numpy(zero_copy_only=False)
    relabelled = table.column("relabel_landmarks").is_valid().to_numpy(zero_copy_only=False)
    carried = np.array([is_round_drop(r) for r in reject_reason], bool) & ~relabelled
    picked = worst_by_yaw_bin(error, keep, yaw_deg, pct)
    if not (picked.any() or carried.any()):
        return table
    weight = table.column("new_weight").to_numpy(zero_copy_only=False).copy()
    weight[picked | carried] = 0.0
    bins = yaw_bins(yaw_deg)
    reasons = [round_drop_reason(round_index, error[i], pct, YAW_BINS[bins[i]]) if picked[i]
               else reject_reason[i] if carried[i] else None for i in range(len(picked))]
    for name, values in (("new_weight", pa.array(weight, pa.float32())), ("drop_reason", pa.array(reasons, pa.string()))):
        table = table.set_column(table.schema.get_field_index(name), SCORES_SCHEMA.field(name), values)
    log.info("round %d drops %d kept faces (cycle error among the worst %g%% of their yaw bin); %d stay dropped "
             "by earlier rounds", round_index, int(picked.sum()), pct, int(carried.sum()))
    return table


def _version_round_drops(table: pa.Table, store: Store, version: int, pct: float, round_index: int) -> pa.Table:
    """`_round_drops` with each scored face's keep, yaw and reject reason read from store@version. Only
    training faces are ranked: the student never saw the eval faces, so their errors run higher, and
    they are never trained on anyway."""
    faces = read_faces(store, version, columns=["face_id", "split", "keep", "yaw_deg", "reject_reason"])
    at = pc.index_in(table.column("face_id"), value_set=faces.column("face_id")).to_numpy(zero_copy_only=False)
    ranked = pc.and_(faces.column("keep"), pc.equal(faces.column("split"), TRAIN_SPLIT))
    return _round_drops(table, ranked.to_numpy(zero_copy_only=False)[at].astype(bool),
                        faces.column("yaw_deg").to_numpy(zero_copy_only=False)[at].astype(np.float64),
                        faces.column("reject_reason").take(pa.array(at)).to_pylist(), pct, round_index)


def rescore(predictor, store: Store, version: int, *, round_index: int, batch_size: int = 128,
            chain: DetectorChain | None = None, drop_worst_pct: float = ROUND_DROP_WORST_PCT) -> pa.Table:
    """Score EVERY face of `store`@`version` (streamed, never loaded whole) -> a SCORES_SCHEMA table.

    Dropped and eval faces are scored too: a later round may bring a dropped face back, and reports
    compare scores against reference labels on eval faces. With the catalog's detector `chain` and a
    verifier in it, faces are also judged for relabelling (`Relabeller`); a relabelled face's residual,
    cycle error, critic score and new weight are those of its new label, which is what the next
    version weighs. Without a verifier the relabelling columns stay null (the student's points aside).
    Then the kept faces whose cycle error is among the worst `drop_worst_pct` % of their yaw bin get
    new_weight 0 and a drop_reason, and so do the faces earlier rounds dropped (their label unchanged):
    the next version drops them (`ROUND_DROP_WORST_PCT`).
    """
    if batch_size < 1:
        raise ValueError(f"rescore: batch_size={batch_size} must be >= 1")
    version = resolve_version(store, version)
    relabeller = Relabeller.for_chain(chain)
    if relabeller is not None and "alt_landmarks" not in faces_schema(store, version).names:
        log.warning("%s@v%d has no candidate columns (shard schema v1): scored without relabelling",
                    store.dataset, version)
        relabeller = None
    columns = _COLUMNS + (["alt_landmarks", "pose"] if relabeller is not None else [])
    parts: list[pa.Table] = []
    started, n_faces, n_relabelled = time.perf_counter(), 0, 0
    for batch in iter_face_batches(store, version, columns=columns, batch_size=batch_size):
        n = batch.num_rows
        if n == 0:
            continue
        face_ids = batch.column("face_id").to_pylist()
        crops, decoded = _decode_crops(batch.column("crop").to_pylist(), face_ids)
        points_img = np.asarray(batch.column("landmarks").to_pylist(), dtype=np.float32).reshape(n, 68, 2)
        affines = np.asarray(batch.column("crop_affine").to_pylist(), dtype=np.float32).reshape(n, 6)
        pseudo = apply_affine(points_img, affines)  # image px -> crop px, each face through its own affine
        raw = score_batch(predictor, crops, pseudo)
        student = raw.pop("points")  # pass 1's points: the student's own label for the face
        proposed = {}
        if relabeller is not None:
            poses = np.asarray([p if p is not None else [np.nan] * 3 for p in batch.column("pose").to_pylist()],
                               np.float32)
            candidates = _candidates(batch.column("alt_landmarks").to_pylist(), affines)
            proposed = relabeller.propose(crops, decoded, pseudo, candidates, student, poses, round_index,
                                          critic=raw["critic_score"])
            changed = [i for i in range(n) if proposed["relabel_crop"][i] is not None]
            if changed:  # score the new labels: the next version weighs them, not the ones they replace
                again = score_batch(predictor, crops[changed], np.stack([proposed["relabel_crop"][i] for i in changed]))
                for key in ("landmark_residual", "cycle_error", "critic_score"):
                    raw[key][changed] = again[key]
                n_relabelled += len(changed)
        for key in ("landmark_residual", "cycle_error"):
            raw[key] = np.where(decoded, raw[key], np.nan).astype(np.float32)
        weight = combine(raw["landmark_residual"], raw["cycle_error"], raw["critic_score"])
        student_img = _to_image(student, affines).reshape(n, 136)
        relabel_img = [None if p is None else _to_image(p[None], affines[i:i + 1]).reshape(136)
                       for i, p in enumerate(proposed.get("relabel_crop", [None] * n))]
        nothing = [None] * n
        parts.append(pa.table({
            "face_id": pa.array(face_ids, pa.string()),
            "round": pa.array(np.full(n, round_index, np.int32)),
            "model_sha256": pa.array([predictor.sha256] * n, pa.string()),
            "cycle_error": pa.array(raw["cycle_error"]),
            "critic_score": pa.array(raw["critic_score"]),
            "landmark_residual": pa.array(raw["landmark_residual"]),
            "new_weight": pa.array(weight),
            "student_landmarks": [row.tolist() if ok else None for row, ok in zip(student_img, decoded)],
            **{key: proposed.get(key, nothing) for key in ("student_nme_pred", "label_nme_pred", "candidate_nme_pred")},
            "relabel_landmarks": [None if p is None else p.tolist() for p in relabel_img],
            **{key: proposed.get(key, nothing) for key in ("relabel_nme_pred", "relabel_source", "relabel_reason",
                                                            "relabel_fusion_weights")},
            "drop_reason": nothing,  # decided over the whole version, below
        }, schema=SCORES_SCHEMA))
        n_faces += n
    table = pa.concat_tables(parts) if parts else SCORES_SCHEMA.empty_table()
    if parts and drop_worst_pct > 0:  # ranked over the whole version, so after every batch
        table = _version_round_drops(table, store, version, drop_worst_pct, round_index)
    elapsed = time.perf_counter() - started
    log.info("rescored %s@v%d round %d: %d faces in %.1fs (%.0f faces/s), %d relabelled%s", store.dataset, version,
             round_index, n_faces, elapsed, n_faces / max(elapsed, 1e-9), n_relabelled,
             "" if relabeller is not None else " (no verifier in the chain: no relabelling)")
    return table


# ---------------------------------------------------------------------------------- storage


def write_scores(store: Store, version: int, table: pa.Table, round_index: int) -> str:
    """Write a round's scores atomically; returns the path. Refuses a table that is not SCORES_SCHEMA."""
    if not table.schema.equals(SCORES_SCHEMA, check_metadata=False):
        raise ValueError(f"write_scores: table schema {table.schema} is not SCORES_SCHEMA")
    rounds = pc.unique(table.column("round")).to_pylist()
    if table.num_rows and rounds != [round_index]:
        raise ValueError(f"write_scores: rows are for rounds {rounds}, not round {round_index}")
    path = store.scores_path(version, round_index)
    write_table(store.fs, path, table)
    return path


def read_scores(store: Store, version: int, round_index: int) -> pa.Table:
    """The scores a round wrote for `version` (FileNotFoundError naming the path when absent)."""
    path = store.scores_path(version, round_index)
    if not store.fs.exists(path):
        raise FileNotFoundError(f"no scores for {store.dataset}@v{version} round {round_index} at {path}: "
                                "run rescoring first")
    with open_for_arrow(store.fs, path) as f:
        return conform_scores(pq.read_table(f))  # files written before the relabelling columns read as null


def rescore_version(store: Store, version: int | None, checkpoint: str, *, round_index: int,
                    device: str = "auto", chain: DetectorChain | None = None,
                    drop_worst_pct: float = ROUND_DROP_WORST_PCT) -> tuple[int, str, pa.Table]:
    """Score every face of `store`@`version` (None: the latest) with `checkpoint` ('teacher' or a path)
    and write the round's scores file; returns (version, scores path, scores table). With the catalog's
    detector `chain` (and a verifier in it) the scores also propose new labels."""
    from trainer.checkpoint import load_predictor

    version = resolve_version(store, version)
    table = rescore(load_predictor(checkpoint, device=device), store, version, round_index=round_index, chain=chain,
                    drop_worst_pct=drop_worst_pct)
    return version, write_scores(store, version, table, round_index), table


# ------------------------------------------------------------------------ checking the scores


def scores_against_references(store: Store, version: int, scores: pa.Table, threshold_pct: float = 8.0) -> dict | None:
    """`score_auc` on the version's faces that carry 68-point reference labels, and the version's
    `label_quality` (the verifier's ROC-AUC, kept/dropped NME per yaw bin, every kind of reference);
    None when no face has a reference."""
    from pipeline.store.faces import faces_schema
    from pipeline.summary import label_quality

    present = set(faces_schema(store, version).names)
    wanted = ["face_id", "landmarks", "ref_landmarks", "verifier_nme_pct", "keep", "ref_pose", "landmarker",
              "alt_landmarks", "ref_points21", "label_source"]
    faces = read_faces(store, version, columns=[c for c in wanted if c in present])
    quality = label_quality(faces)
    if faces.column("ref_landmarks").null_count == faces.num_rows:
        return {"label_quality": quality} if quality else None
    return {**score_auc(scores, faces, threshold_pct=threshold_pct), "label_quality": quality}


def score_auc(scores: pa.Table, faces: pa.Table, threshold_pct: float = 8.0, *,
              weight_threshold: float = 0.1) -> dict:
    """How well each score finds bad pseudo-labels, on faces that carry reference landmarks.

    A label is bad when its NME against the reference (AFLW2000-3D protocol: sqrt(w*h) of the
    reference box) exceeds `threshold_pct`. Returns the ROC-AUC of landmark_residual, cycle_error,
    their max (combined_error), 1 - new_weight (and 1 - critic_score when finite), plus the label NME of faces kept vs dropped
    at `weight_threshold` (what fold_scores' drop_below would do).
    """
    extra = ["verifier_nme_pct"] if "verifier_nme_pct" in faces.column_names else []
    ref = faces.select(["face_id", "landmarks", "ref_landmarks", *extra]).filter(pc.is_valid(faces.column("ref_landmarks")))
    # Joined by hand: Arrow's join cannot carry the fixed-size list columns along.
    score_row = {f: i for i, f in enumerate(scores.column("face_id").to_pylist())}
    ref_ids = ref.column("face_id").to_pylist()
    take_ref = [i for i, f in enumerate(ref_ids) if f in score_row]
    take_scores = [score_row[ref_ids[i]] for i in take_ref]
    n = len(take_ref)
    if n == 0:
        return {"n": 0, "threshold_pct": threshold_pct, "auc": {}, "note": "no scored face has reference landmarks"}
    ref = ref.take(take_ref)
    joined = scores.take(take_scores)
    pseudo = np.asarray(ref.column("landmarks").to_pylist(), np.float32).reshape(n, 68, 2)
    reference = np.asarray(ref.column("ref_landmarks").to_pylist(), np.float32).reshape(n, 68, 2)
    label_nme = np.asarray(nme_pct(pseudo, reference), dtype=np.float64)
    bad = label_nme > threshold_pct
    col = {name: joined.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
           for name in ("landmark_residual", "cycle_error", "critic_score", "new_weight")}
    auc = {"landmark_residual": roc_auc(col["landmark_residual"], bad),
           "cycle_error": roc_auc(col["cycle_error"], bad),
           # the error the weight is computed from (combine); the weight itself saturates at 1 below
           # RESIDUAL_OK_PCT, so its AUC counts most good and mildly bad labels as ties
           "combined_error": roc_auc(np.fmax(col["landmark_residual"], col["cycle_error"]), bad),
           "one_minus_weight": roc_auc(1.0 - col["new_weight"], bad)}
    if np.isfinite(col["critic_score"]).any():
        auc["one_minus_critic"] = roc_auc(1.0 - col["critic_score"], bad)
    if extra:  # the build's verifier: the label's predicted error, judged on the same faces
        auc["verifier_nme_pct"] = roc_auc(ref.column("verifier_nme_pct").to_numpy(zero_copy_only=False), bad)
    kept = col["new_weight"] >= weight_threshold

    def _mean(mask: np.ndarray) -> float | None:
        return float(label_nme[mask].mean()) if mask.any() else None

    return {
        "n": n,
        "n_bad": int(bad.sum()),
        "threshold_pct": threshold_pct,
        "auc": auc,
        "weight_threshold": weight_threshold,
        "n_kept": int(kept.sum()),
        "n_dropped": int((~kept).sum()),
        "label_nme_kept_pct": _mean(kept),
        "label_nme_dropped_pct": _mean(~kept),
        "label_nme_all_pct": float(label_nme.mean()),
        "bad_dropped": int((bad & ~kept).sum()),
    }
