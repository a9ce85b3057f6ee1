"""Fold a trainer round's scores table into a version's faces: new labels where the round relabelled
a face (`apply_relabels`, before the rules decide), then new weights and drops for bad labels
(`fold_scores`, after them).

Pure pyarrow (no torch): the build's commit step calls both while writing the next version's shards.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

DEFAULT_DROP_BELOW = 0.1

# A round's student is a candidate named "student:r<round>". A face carries one student candidate, the
# latest round's: that student learned from the earlier one's labels, so keeping both would count one
# model's opinion twice in the next fusion.
STUDENT_PREFIX = "student:"


def student_name(round_index: int) -> str:
    return f"{STUDENT_PREFIX}r{round_index}"


def latest_round_per_face(scores: pa.Table) -> pa.Table:
    """One score row per face_id: the highest round wins (a scores table may hold several rounds)."""
    if scores.num_rows == 0:
        return scores
    order = pc.sort_indices(scores, sort_keys=[("face_id", "ascending"), ("round", "descending")])
    ordered = scores.take(order)
    face_ids = ordered.column("face_id").to_numpy(zero_copy_only=False)
    first = np.ones(len(face_ids), dtype=bool)
    first[1:] = face_ids[1:] != face_ids[:-1]
    return ordered.filter(pa.array(first))


def fold_scores(faces: pa.Table, scores: pa.Table, *, drop_below: float = DEFAULT_DROP_BELOW) -> pa.Table:
    """Faces with a score get `weight = rule weight x new_weight`; those whose new_weight is under
    `drop_below` become keep=False.

    Multiplying keeps both kinds of evidence: the catalog's rules weigh what the build measured
    (landmarker agreement, flip consistency), the round weighs what the trained model sees (its
    residual, the cycle error, the critic); they are independent, and neither should erase the other.

    Faces a rule already dropped stay dropped with their reason (a good score does not overrule a
    rule); faces without a score row (new images, or not rescored) pass through unchanged. A NaN
    new_weight is treated as "no score". Returns a table with `faces.schema` exactly.
    """
    if not 0.0 <= drop_below <= 1.0:
        raise ValueError(f"fold_scores: drop_below={drop_below} must be in [0, 1]")
    missing = {"face_id", "new_weight"} - set(scores.column_names)
    if missing:
        raise ValueError(f"fold_scores: the scores table lacks {sorted(missing)} (expected SCORES_SCHEMA)")
    if faces.num_rows == 0:
        return faces

    table = scores.select(["face_id", "new_weight"])
    rounds = scores.column("round") if "round" in scores.column_names else pa.array(np.zeros(len(table), np.int32))
    best = latest_round_per_face(table.append_column("round", rounds))
    index = pc.index_in(faces.column("face_id"), value_set=best.column("face_id")).fill_null(-1)
    index = index.to_numpy(zero_copy_only=False).astype(np.int64)
    has_row = index >= 0
    idx = np.where(has_row, index, 0)
    new_weight = best.column("new_weight").to_numpy(zero_copy_only=False).astype(np.float64)[idx]
    scored = has_row & np.isfinite(new_weight)

    keep = faces.column("keep").to_numpy(zero_copy_only=False).astype(bool)
    weight = faces.column("weight").to_numpy(zero_copy_only=False).astype(np.float32)
    reasons = faces.column("reject_reason").to_pylist()

    update = scored & keep  # rule-dropped faces keep their weight 0 and their reason
    clipped = np.clip(new_weight, 0.0, 1.0)
    drop = update & (clipped < drop_below)
    weight = weight.copy()
    weight[update] = (weight[update] * clipped[update]).astype(np.float32)
    weight[drop] = 0.0  # the trainer reads weight 0 as "ignore", like every other dropped face
    keep = keep & ~drop
    for i in np.flatnonzero(drop):
        reasons[i] = f"rescore new_weight {clipped[i]:.2g} < {drop_below:g}"

    schema = faces.schema
    out = faces
    for name, values in (("keep", pa.array(keep, type=pa.bool_())),
                         ("weight", pa.array(weight, type=pa.float32())),
                         ("reject_reason", pa.array(reasons, type=pa.string()))):
        i = schema.get_field_index(name)
        out = out.set_column(i, schema.field(i), values)
    log.info("fold_scores: %d of %d faces scored, %d reweighted, %d dropped (new_weight < %g)",
             int(scored.sum()), faces.num_rows, int(update.sum()), int(drop.sum()), drop_below)
    return out


def apply_relabels(faces: pa.Table, scores: pa.Table) -> tuple[pa.Table, int]:
    """The round's relabels into `faces` (FACES_SCHEMA): returns (faces, how many labels changed).

    For every face the round's verifier judged (`candidate_nme_pred` set), the student's points become
    its candidate `student:r<round>` (replacing an earlier round's student) with the predicted NMEs of
    every candidate. Where the round proposed a new label (`relabel_landmarks` set): `landmarks`,
    `label_source`, `verifier_nme_pct` (the new label's predicted NME, so the rules that run next judge
    the new label), `fusion_weights`, and `relabel_round` / `relabel_reason` say which round and why.

    Idempotent: applying the same scores to faces that already carry them changes nothing (commit
    re-applies an earlier round's scores when the rules change), and the count is of labels that
    differ from the input's, so such a re-application counts 0. Faces without a score row, and scores
    without verifier judgements (a chain without a verifier), leave the faces as they are.
    """
    if faces.num_rows == 0 or "candidate_nme_pred" not in scores.column_names:
        return faces, 0
    best = latest_round_per_face(scores)
    index = pc.index_in(faces.column("face_id"), value_set=best.column("face_id")).fill_null(-1)
    index = index.to_numpy(zero_copy_only=False).astype(np.int64)
    judged_col = best.column("candidate_nme_pred")
    rows = [int(i) for i in index if i >= 0]
    if not rows or all(judged_col[i].as_py() is None for i in rows):
        return faces, 0

    def col(name: str) -> list:
        return best.column(name).to_pylist()

    rounds, student, judged = col("round"), col("student_landmarks"), judged_col.to_pylist()
    student_pred, new_label, new_pred = col("student_nme_pred"), col("relabel_landmarks"), col("relabel_nme_pred")
    new_source, new_reason, new_fusion = col("relabel_source"), col("relabel_reason"), col("relabel_fusion_weights")

    landmarks = faces.column("landmarks").to_pylist()
    alts, preds = faces.column("alt_landmarks").to_pylist(), faces.column("candidate_nme_pred").to_pylist()
    fusion, sources = faces.column("fusion_weights").to_pylist(), faces.column("label_source").to_pylist()
    verifier_pct = faces.column("verifier_nme_pct").to_pylist()
    relabel_round, relabel_reason = faces.column("relabel_round").to_pylist(), faces.column("relabel_reason").to_pylist()
    changed = 0
    for i, j in enumerate(index):
        if j < 0 or judged[j] is None or student[j] is None:
            continue
        keep = [k for k, alt in enumerate(alts[i] or []) if not alt["name"].startswith(STUDENT_PREFIX)]
        alts[i] = [alts[i][k] for k in keep] + [{"name": student_name(rounds[j]), "points": student[j]}]
        # the round judged exactly these candidates (the row's, without earlier students, then its own)
        preds[i] = judged[j] if len(judged[j]) == len(alts[i]) else (
            [preds[i][k] for k in keep] + [student_pred[j]] if preds[i] is not None else None)
        if new_label[j] is None:
            # the label is still the one its weights made; the student took no part in it
            fusion[i] = None if fusion[i] is None else [fusion[i][k] for k in keep] + [[0.0] * 5]
            continue
        changed += bool(np.any(np.asarray(landmarks[i], np.float32) != np.asarray(new_label[j], np.float32)))
        landmarks[i], sources[i], verifier_pct[i] = new_label[j], new_source[j], new_pred[j]
        fusion[i] = new_fusion[j]
        relabel_round[i], relabel_reason[i] = rounds[j], new_reason[j]

    schema = faces.schema
    out = faces
    for name, values in (("landmarks", landmarks), ("alt_landmarks", alts), ("candidate_nme_pred", preds),
                         ("fusion_weights", fusion), ("label_source", sources), ("verifier_nme_pct", verifier_pct),
                         ("relabel_round", relabel_round), ("relabel_reason", relabel_reason)):
        k = schema.get_field_index(name)
        out = out.set_column(k, schema.field(k), pa.array(values, type=schema.field(k).type))
    log.info("apply_relabels: %d of %d faces judged by the round, %d labels changed",
             sum(1 for j in index if j >= 0 and judged[j] is not None), faces.num_rows, changed)
    return out, changed
