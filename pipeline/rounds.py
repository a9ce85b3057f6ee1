"""Fold a trainer round's scores table into a version's faces: new weights, and drops for bad labels.

Pure pyarrow (no torch): the build's commit step calls it while writing the next version's shards.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

DEFAULT_DROP_BELOW = 0.1


def _latest_round_per_face(scores: pa.Table) -> pa.Table:
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
    best = _latest_round_per_face(table.append_column("round", rounds))
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
