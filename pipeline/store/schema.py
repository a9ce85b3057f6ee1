"""The store's pinned Parquet schemas, how tables written before a column existed read in them, and
which quarantine faults are worth another try."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: candidates, verifier scores, fused labels, AFLW-21 references


def _fixed(n: int) -> pa.DataType:
    return pa.list_(pa.float32(), n)


FEATURE_COLUMNS = (
    "face_px", "yaw_deg", "pitch_deg", "roll_deg", "abs_yaw_deg", "blur",
    "agreement_nme_pct", "flip_nme_pct", "out_of_frame_frac", "landmark_score", "verifier_nme_pct",
)

FACES_SCHEMA = pa.schema(
    [
        pa.field("face_id", pa.string(), nullable=False),  # image_id + ":" + face index
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the image bytes
        pa.field("face_index", pa.int16(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | eval (eval sources are never trained on)
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("bbox", _fixed(4), nullable=False),  # l, t, r, b in image pixels
        pa.field("det_score", pa.float32(), nullable=False),
        pa.field("detector", pa.string(), nullable=False),
        pa.field("landmarker", pa.string(), nullable=False),  # the primary landmarker
        pa.field("landmarks", _fixed(136), nullable=False),  # x0, y0, x1, y1, ... image pixels
        pa.field("landmark_scores", _fixed(68), nullable=False),
        pa.field("params_62", _fixed(62)),  # primary's 3DMM params in the crop's frame, if it has them
        # Every candidate label (the primary first, its mirrored-image pass, the other landmarkers), iBUG-68.
        pa.field("alt_landmarks", pa.list_(pa.struct([("name", pa.string()), ("points", _fixed(136))]))),
        pa.field("candidate_nme_pred", pa.list_(pa.float32())),  # the verifier's predicted NME of each candidate
        pa.field("fusion_weights", pa.list_(_fixed(5))),  # per candidate: mean weight in jaw, brows, nose, eyes, mouth
        pa.field("label_source", pa.string()),  # what `landmarks` is: "fused" or the candidate's name
        pa.field("crop", pa.binary(), nullable=False),  # JPEG of the 120x120 aligned crop the trainer reads
        pa.field("crop_affine", _fixed(6), nullable=False),  # image pixels -> crop pixels, 2x3 row-major
        pa.field("pose", _fixed(3), nullable=False),  # yaw, pitch, roll in degrees
        *[pa.field(name, pa.float32(), nullable=False) for name in FEATURE_COLUMNS],
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
        pa.field("reject_reason", pa.string()),
        pa.field("ref_landmarks", _fixed(136)),  # reference labels (AFLW2000-3D .mat layout), if any
        pa.field("ref_params", _fixed(62)),  # reference 3DMM params in the crop's frame
        pa.field("ref_pose", _fixed(3)),
        pa.field("ref_points21", _fixed(42)),  # AFLW's 21 reference points (x0, y0, ...; NaN: not annotated)
        # A trainer round replaced the label (pipeline/rounds.py apply_relabels): which round, and why.
        # Added after schema v2 was pinned, as nullable columns that read as null where a shard predates
        # them (`conform_faces`), not as a schema bump: the plan re-labels every image on a bump.
        pa.field("relabel_round", pa.int32()),
        pa.field("relabel_reason", pa.string()),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),  # null when the bytes could not be read
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stat_key", pa.string(), nullable=False),  # uri|size|mtime: unchanged items are skipped
        pa.field("status", pa.string(), nullable=False),  # ok | quarantined | duplicate
        pa.field("n_faces", pa.int32(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("version", pa.int32(), nullable=False),  # the version that first saw it
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # fetch | decode | detect | label
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("version", pa.int32(), nullable=False),
        # the fault may pass (timeout, 5xx, connection, model error): the next build tries the image
        # again; null in versions written before this column existed (see `quarantine_retryable`)
        pa.field("retryable", pa.bool_()),
    ]
)

# Quarantine reasons that say nothing about the image itself: a transient fetch fault (the fetcher's
# retries ran out: timeouts, HTTP 429/5xx, connection errors, a truncated body; a local read error)
# or a model that failed. The next build lists such items as new, so they are tried again.
RETRYABLE_FETCH_REASONS = frozenset({"fetch failed", "timeout", "read error"})


def quarantine_retryable(stage: str, reason: str) -> bool:
    """Whether a quarantine row's fault is transient (try the image again) or the image's own."""
    return (stage == "fetch" and reason in RETRYABLE_FETCH_REASONS) or (stage == "detect" and reason == "model error")


def conform_quarantine(table: pa.Table) -> pa.Table:
    """A quarantine table in today's schema: tables of older versions get `retryable` from their reasons."""
    if "retryable" not in table.column_names:
        flags = [quarantine_retryable(s, r) for s, r in zip(table.column("stage").to_pylist(),
                                                            table.column("reason").to_pylist())]
        table = table.append_column("retryable", pa.array(flags, pa.bool_()))
    return table.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)


SCORES_SCHEMA = pa.schema(
    [
        pa.field("face_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("cycle_error", pa.float32(), nullable=False),
        pa.field("critic_score", pa.float32(), nullable=False),
        pa.field("landmark_residual", pa.float32(), nullable=False),
        pa.field("new_weight", pa.float32(), nullable=False),
        # The round's relabelling (trainer/rescore.py), all nullable: older scores files lack them
        # (`conform_scores`), and a chain without a verifier leaves all but the student's points null.
        pa.field("student_landmarks", _fixed(136)),  # the student's points (pass 1), image pixels
        pa.field("student_nme_pred", pa.float32()),  # the verifier's predicted NME of the student's points
        pa.field("label_nme_pred", pa.float32()),  # ... of the face's current label (same crop, same pass)
        # ... of each candidate the round judged: the row's candidates (without earlier students), then the student
        pa.field("candidate_nme_pred", pa.list_(pa.float32())),
        pa.field("relabel_landmarks", _fixed(136)),  # the proposed new label, image pixels; null: no change
        pa.field("relabel_nme_pred", pa.float32()),
        pa.field("relabel_source", pa.string()),  # the new label's label_source, e.g. "fused+student:r1"
        pa.field("relabel_reason", pa.string()),  # e.g. "fused with student:r1: predicted NME 5.10% -> 4.60%"
        pa.field("relabel_fusion_weights", pa.list_(_fixed(5))),  # the new label's per-candidate region weights
        # Why the round drops the face (its new_weight is then 0), e.g. its cycle error ranks among the worst
        # of its yaw bin's kept faces (trainer/rescore.py, `worst_by_yaw_bin`); null: not dropped by the round.
        pa.field("drop_reason", pa.string()),
    ]
)


def _conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """`table` in `schema`: nullable columns it lacks (written before they existed) read as null."""
    for f in schema:
        if f.name not in table.column_names:
            if not f.nullable:
                raise ValueError(f"{what}: column {f.name!r} is missing")
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def conform_scores(table: pa.Table) -> pa.Table:
    """A scores table in today's SCORES_SCHEMA (older files lack the relabelling columns)."""
    return _conform(table, SCORES_SCHEMA, "scores table")


def conform_faces(table: pa.Table) -> pa.Table:
    """A faces table in today's FACES_SCHEMA (shards written before `relabel_round` lack it)."""
    return _conform(table, FACES_SCHEMA, "faces table")

