"""Fold a trainer round's scores table into a version's faces: new labels where the round relabelled
a face (`apply_relabels`, before the rules decide), then new weights and drops for bad labels
(`fold_scores`, after them).

Pure pyarrow (no torch): the build's commit step calls both while writing the next version's shards.
"""

from __future__ import annotations

import logging
import re

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


# A round's own drop (trainer/rescore.py) says which round made it. Later rounds carry it: a face a
# round dropped stays dropped until its label changes, so each round's drops add to the ones before.
_ROUND_DROP = re.compile(r"^round (\d+) drop: ")


def round_drop_reason(round_index: int, cycle_error_pct: float, worst_pct: float, yaw_bin: str) -> str:
    return (f"round {round_index} drop: cycle error {cycle_error_pct:.2f}% among the worst {worst_pct:g}% "
            f"of yaw bin {yaw_bin}")


def round_of_drop(reason: str | None) -> int | None:
    """The round whose own drop `reason` (a face's reject_reason) is (`round_drop_reason`), else None."""
    found = _ROUND_DROP.match(reason) if reason else None
    return int(found.group(1)) if found else None


def is_round_drop(reason: str | None) -> bool:
    """`reason` (a face's reject_reason) is a round's own drop (`round_drop_reason`)."""
    return round_of_drop(reason) is not None


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
    said = scores.column("drop_reason") if "drop_reason" in scores.column_names else pa.nulls(len(table), pa.string())
    best = latest_round_per_face(table.append_column("round", rounds).append_column("drop_reason", said))
    index = pc.index_in(faces.column("face_id"), value_set=best.column("face_id")).fill_null(-1)
    index = index.to_numpy(zero_copy_only=False).astype(np.int64)
    has_row = index >= 0
    idx = np.where(has_row, index, 0)
    new_weight = best.column("new_weight").to_numpy(zero_copy_only=False).astype(np.float64)[idx]
    scored = has_row & np.isfinite(new_weight)

    keep = faces.column("keep").to_numpy(zero_copy_only=False).astype(bool)
    weight = faces.column("weight").to_numpy(zero_copy_only=False).astype(np.float32)

    update = scored & keep  # rule-dropped faces keep their weight 0 and their reason
    clipped = np.clip(new_weight, 0.0, 1.0)
    drop = update & (clipped < drop_below)
    weight = weight.copy()
    weight[update] = (weight[update] * clipped[update]).astype(np.float32)
    weight[drop] = 0.0  # the trainer reads weight 0 as "ignore", like every other dropped face
    keep = keep & ~drop
    dropped = np.flatnonzero(drop)  # only these rows' reasons are formatted in Python
    said = best.column("drop_reason").take(pa.array(idx[dropped])).to_pylist()  # the round's own words, if any
    reasons = _pick(faces.num_rows, faces.column("reject_reason").combine_chunks(), dropped,
                    pa.array([why or f"rescore new_weight {clipped[i]:.2g} < {drop_below:g}"
                              for i, why in zip(dropped, said)], pa.string()))

    schema = faces.schema
    out = faces
    for name, values in (("keep", pa.array(keep, type=pa.bool_())),
                         ("weight", pa.array(weight, type=pa.float32())),
                         ("reject_reason", reasons)):
        i = schema.get_field_index(name)
        out = out.set_column(i, schema.field(i), values)
    log.info("fold_scores: %d of %d faces scored, %d reweighted, %d dropped (new_weight < %g)",
             int(scored.sum()), faces.num_rows, int(update.sum()), int(drop.sum()), drop_below)
    return out


def _kept_plus_one(lists: pa.Array, keep_item: np.ndarray, appended: pa.Array, *, null_stays_null: bool) -> pa.Array:
    """Each row's list with the items `keep_item` marks (a flag per item of `lists.flatten()`), then
    that row's item of `appended`. A null list is empty (`null_stays_null`: stays null instead)."""
    n = len(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    items = pc.list_flatten(lists)
    kept = np.flatnonzero(keep_item)
    # Stable order by row, a row's kept items before its appended one: one `take` builds the values.
    row = np.concatenate([parents[kept], np.arange(n)])
    last = np.concatenate([np.zeros(len(kept), np.int8), np.ones(n, np.int8)])
    order = np.lexsort((last, row))
    values = pa.concat_arrays([items.take(pa.array(kept, pa.int64())), appended]).take(pa.array(order))
    lengths = np.bincount(parents[kept], minlength=n) + 1
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    mask = lists.is_null() if null_stays_null else None
    return pa.ListArray.from_arrays(offsets, values, type=lists.type, mask=mask)


def _item_positions(lists: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row, position in its row) of every item of `lists.flatten()`."""
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    first = np.searchsorted(parents, np.arange(len(lists)))
    return parents, np.arange(len(parents)) - first[parents]


def _pick(rows: int, old: pa.Array, replace_at: np.ndarray, new: pa.Array) -> pa.Array:
    """`old` with the rows `replace_at` taken from `new` (one value per replaced row, in order)."""
    source = np.arange(rows, dtype=np.int64)
    source[replace_at] = rows + np.arange(len(replace_at))
    return pa.concat_arrays([old, new.cast(old.type)]).take(pa.array(source))


def _rejudged_rows(faces: pa.Table, best: pa.Table) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(rows of `faces` the round re-judged with a student, each face's row in `best` or -1, faces judged);
    None when the round judged none of these faces."""
    index = pc.index_in(faces.column("face_id"), value_set=best.column("face_id")).fill_null(-1)
    index = index.to_numpy(zero_copy_only=False).astype(np.int64)
    matched = index >= 0
    judged_ok = best.column("candidate_nme_pred").is_valid().to_numpy(zero_copy_only=False)
    if not matched.any() or not judged_ok[index[matched]].any():
        return None
    student_ok = best.column("student_landmarks").is_valid().to_numpy(zero_copy_only=False)
    safe = np.where(matched, index, 0)
    rows = np.flatnonzero(matched & judged_ok[safe] & student_ok[safe])
    return rows, index, int((matched & judged_ok[safe]).sum())


def _rows_of(table: pa.Table, name: str, rows: np.ndarray) -> pa.Array:
    return table.column(name).combine_chunks().take(pa.array(rows))


def _column(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _keep_like_alts(lists: pa.Array, alt_rows: np.ndarray, keep_alt: np.ndarray, m: int) -> np.ndarray:
    """Items of `lists` at positions whose candidate is kept (lists run parallel to alt_landmarks)."""
    item_rows, item_pos = _item_positions(lists)
    alt_len = np.bincount(alt_rows, minlength=m)
    within = item_pos < alt_len[item_rows]
    alt_start = np.concatenate([[0], np.cumsum(alt_len)[:-1]]).astype(np.int64)
    at = np.where(within, alt_start[item_rows] + item_pos, 0)
    return within & (keep_alt[at] if len(keep_alt) else np.zeros(len(at), bool))


def _candidate_columns(faces: pa.Table, rows: np.ndarray, score_rows: pa.Table,
                       at_new: np.ndarray) -> dict[str, pa.Array]:
    """The re-judged rows' alt_landmarks, candidate_nme_pred and fusion_weights with this round's student."""
    m = len(rows)
    # The candidates: the row's own (earlier students dropped), then this round's student.
    alts = _rows_of(faces, "alt_landmarks", rows)
    alt_rows, _ = _item_positions(alts)
    names = pc.struct_field(pc.list_flatten(alts), "name")
    keep_alt = pc.invert(pc.fill_null(pc.starts_with(names, STUDENT_PREFIX), False)).to_numpy(zero_copy_only=False)
    struct_type = faces.schema.field("alt_landmarks").type.value_type
    student = pa.StructArray.from_arrays(
        [pc.binary_join_element_wise(f"{STUDENT_PREFIX}r", pc.cast(_column(score_rows, "round"), pa.string()), ""),
         _column(score_rows, "student_landmarks").cast(struct_type.field("points").type)],
        fields=list(struct_type))
    new_alts = _kept_plus_one(alts, keep_alt, student, null_stays_null=False)
    new_alt_len = pc.list_value_length(new_alts).to_numpy(zero_copy_only=False)

    # Predicted NMEs: the round's own judgement where it judged exactly these candidates, else the
    # row's kept ones and the student's.
    preds = _rows_of(faces, "candidate_nme_pred", rows)
    judged = _column(score_rows, "candidate_nme_pred")
    judged_whole = pc.list_value_length(judged).to_numpy(zero_copy_only=False) == new_alt_len
    kept_preds = _kept_plus_one(preds, _keep_like_alts(preds, alt_rows, keep_alt, m),
                                _column(score_rows, "student_nme_pred"), null_stays_null=True)
    new_preds = _pick(m, kept_preds, np.flatnonzero(judged_whole), judged.take(pa.array(np.flatnonzero(judged_whole))))

    # Region weights: a new label brings its own; otherwise the student, which took no part, weighs 0.
    fusion = _rows_of(faces, "fusion_weights", rows)
    zeros = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(5 * m, np.float32)), 5).cast(fusion.type.value_type)
    kept_fusion = _kept_plus_one(fusion, _keep_like_alts(fusion, alt_rows, keep_alt, m), zeros, null_stays_null=True)
    new_fusion = _pick(m, kept_fusion, at_new, _column(score_rows, "relabel_fusion_weights").take(pa.array(at_new)))
    return {"alt_landmarks": new_alts, "candidate_nme_pred": new_preds, "fusion_weights": new_fusion}


def _labels_changed(faces: pa.Table, rows: np.ndarray, score_rows: pa.Table, at_new: np.ndarray) -> int:
    """How many of the proposed labels differ from the face's current one (0 when re-applied)."""
    old_points = pc.list_flatten(_rows_of(faces, "landmarks", rows).take(pa.array(at_new)))
    old_points = old_points.to_numpy(zero_copy_only=False)
    new_points = pc.list_flatten(_column(score_rows, "relabel_landmarks").take(pa.array(at_new)))
    new_points = new_points.cast(pa.float32()).to_numpy(zero_copy_only=False)
    return int(np.any(old_points.reshape(-1, 136) != new_points.reshape(-1, 136), axis=1).sum())


def _with_relabels(faces: pa.Table, rows: np.ndarray, score_rows: pa.Table, at_new: np.ndarray,
                   candidates: dict[str, pa.Array]) -> pa.Table:
    """`faces` with the re-judged rows' candidate columns, and the new labels where the round proposed one."""
    schema, n = faces.schema, faces.num_rows
    out = faces
    for name, values in candidates.items():
        k = schema.get_field_index(name)
        out = out.set_column(k, schema.field(k), _pick(n, _column(faces, name), rows, values))
    replaced = rows[at_new]
    for name, score_name in (("landmarks", "relabel_landmarks"), ("label_source", "relabel_source"),
                             ("verifier_nme_pct", "relabel_nme_pred"), ("relabel_round", "round"),
                             ("relabel_reason", "relabel_reason")):
        k = schema.get_field_index(name)
        new_values = _column(score_rows, score_name).take(pa.array(at_new))
        out = out.set_column(k, schema.field(k), _pick(n, _column(faces, name), replaced, new_values))
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

    Column-wise (Arrow compute and numpy index arithmetic), not row by row: a fold rewrites every
    face of a version.
    """
    if faces.num_rows == 0 or "candidate_nme_pred" not in scores.column_names:
        return faces, 0
    best = latest_round_per_face(scores)
    rejudged = _rejudged_rows(faces, best)
    if rejudged is None:
        return faces, 0
    rows, index, n_judged = rejudged
    if len(rows) == 0:
        log.info("apply_relabels: %d of %d faces judged by the round, %d labels changed", n_judged, faces.num_rows, 0)
        return faces, 0
    score_rows = best.take(pa.array(index[rows]))
    at_new = np.flatnonzero(_column(score_rows, "relabel_landmarks").is_valid().to_numpy(zero_copy_only=False))
    out = _with_relabels(faces, rows, score_rows, at_new, _candidate_columns(faces, rows, score_rows, at_new))
    changed = _labels_changed(faces, rows, score_rows, at_new)
    log.info("apply_relabels: %d of %d faces judged by the round, %d labels changed", n_judged, faces.num_rows, changed)
    return out, changed
