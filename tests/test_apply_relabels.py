"""`apply_relabels` on hand-made faces and scores, against values worked out by hand: the student
replaces an earlier one, the round's judgement or the kept NMEs plus the student's, new labels with
their weights and round, the latest round per face, faces without a (judged) score untouched."""

from __future__ import annotations

import math

import pyarrow as pa

from pipeline.rounds import apply_relabels
from pipeline.store.schema import FACES_SCHEMA, SCORES_SCHEMA

COLUMNS = ("face_id", "landmarks", "alt_landmarks", "candidate_nme_pred", "fusion_weights", "label_source",
           "verifier_nme_pct", "relabel_round", "relabel_reason")


def pts(v: float) -> list[float]:
    return [float(v)] * 136


def cand(name: str, v: float) -> dict:
    return {"name": name, "points": pts(v)}


def w(v: float) -> list[float]:
    return [float(v)] * 5


def face(face_id, landmarks, alts, preds, fusion, source="fused") -> dict:
    return {"face_id": face_id, "landmarks": landmarks, "alt_landmarks": alts, "candidate_nme_pred": preds,
            "fusion_weights": fusion, "label_source": source, "verifier_nme_pct": 9.0,
            "relabel_round": None, "relabel_reason": None}


def score(face_id, rnd, *, student, judged, student_pred=0.7, label=None, fusion=None) -> dict:
    relabel = label is not None
    return {"face_id": face_id, "round": rnd, "model_sha256": "m", "cycle_error": 0.0, "critic_score": 0.0,
            "landmark_residual": 0.0, "new_weight": 1.0, "student_landmarks": student, "student_nme_pred": student_pred,
            "label_nme_pred": 5.0, "candidate_nme_pred": judged, "relabel_landmarks": label,
            "relabel_nme_pred": 2.5 if relabel else None, "relabel_source": f"fused+student:r{rnd}" if relabel else None,
            "relabel_reason": f"better in r{rnd}" if relabel else None, "relabel_fusion_weights": fusion}


FACES = [
    face("a:0", pts(1), [cand("tddfa", 1), cand("student:r1", 2)], [0.5, 0.6], [w(1), w(0.5)]),
    face("b:0", pts(1), [cand("tddfa", 1), cand("peppa", 3)], [0.3, 0.4], [w(1), w(0.2)]),
    face("c:0", pts(1), [cand("tddfa", 1)], [0.3], [w(1)]),
    face("d:0", pts(1), [cand("tddfa", 1)], [0.3], [w(1)]),
    face("e:0", pts(1), None, None, None, source="tddfa"),
    face("f:0", pts(4), [cand("tddfa", 4)], [0.3], None),
]
SCORES = [
    # a: judged its kept candidate and the student (2 = 1 + 1): the judgement is taken; a new label
    score("a:0", 2, student=pts(7), judged=[0.11, 0.22], label=pts(8), fusion=[w(0.9), w(0.1)]),
    # b: judged a different set (3 != 2 + 1): the row's NMEs and the student's; no new label
    score("b:0", 1, student=pts(7), judged=[0.1, 0.2, 0.3, 0.4, 0.5]),
    # d: not judged (no verifier): untouched even with a label proposed
    score("d:0", 1, student=pts(7), judged=None, label=pts(8), fusion=[w(1), w(0)]),
    # e: two rounds, the latest wins (it proposes nothing); no candidates before: the student alone
    score("e:0", 1, student=pts(5), judged=[0.9], label=pts(6), fusion=[w(1)]),
    score("e:0", 3, student=pts(6), judged=[0.45]),
    # f: the proposed label is the one it has: taken (round, reason) but not counted as a change
    score("f:0", 1, student=pts(7), judged=[0.3, 0.2], label=pts(4), fusion=[w(0.5), w(0.5)]),
]


def test_relabels_fold_into_faces_as_worked_out_by_hand():
    schema = pa.schema([FACES_SCHEMA.field(c) for c in COLUMNS])
    faces = pa.Table.from_pylist(FACES, schema=schema)
    out, changed = apply_relabels(faces, pa.Table.from_pylist(SCORES, schema=SCORES_SCHEMA))
    assert out.schema.equals(schema)
    rows = {r["face_id"]: r for r in out.to_pylist()}
    assert changed == 1  # a only: f's new label equals its old one

    a = rows["a:0"]
    assert [c["name"] for c in a["alt_landmarks"]] == ["tddfa", "student:r2"]  # r1's student replaced
    assert a["alt_landmarks"][1]["points"] == pts(7)
    assert _close(a["candidate_nme_pred"], [0.11, 0.22])
    assert a["landmarks"] == pts(8) and a["label_source"] == "fused+student:r2" and a["verifier_nme_pct"] == 2.5
    assert _close(a["fusion_weights"], [w(0.9), w(0.1)])
    assert (a["relabel_round"], a["relabel_reason"]) == (2, "better in r2")

    b = rows["b:0"]
    assert [c["name"] for c in b["alt_landmarks"]] == ["tddfa", "peppa", "student:r1"]
    assert _close(b["candidate_nme_pred"], [0.3, 0.4, 0.7])
    assert _close(b["fusion_weights"], [w(1), w(0.2), w(0)])  # the student took no part in the label
    assert b["landmarks"] == pts(1) and b["label_source"] == "fused" and b["relabel_round"] is None

    assert _same(rows["c:0"], FACES[2])  # no score row
    assert _same(rows["d:0"], FACES[3])  # scored, not judged

    e = rows["e:0"]
    assert e["alt_landmarks"] == [cand("student:r3", 6)]
    assert _close(e["candidate_nme_pred"], [0.45]) and e["fusion_weights"] is None
    assert e["landmarks"] == pts(1) and e["relabel_round"] is None  # round 1's proposal is superseded

    f = rows["f:0"]
    assert f["landmarks"] == pts(4) and (f["relabel_round"], f["relabel_reason"]) == (1, "better in r1")
    assert [c["name"] for c in f["alt_landmarks"]] == ["tddfa", "student:r1"]
    assert _close(f["fusion_weights"], [w(0.5), w(0.5)])


def test_scores_without_judgements_leave_the_faces_as_they_are():
    schema = pa.schema([FACES_SCHEMA.field(c) for c in COLUMNS])
    faces = pa.Table.from_pylist(FACES, schema=schema)
    unjudged = [{**s, "candidate_nme_pred": None} for s in SCORES]
    out, changed = apply_relabels(faces, pa.Table.from_pylist(unjudged, schema=SCORES_SCHEMA))
    assert changed == 0 and out.equals(faces)


def _close(got, want) -> bool:
    flat = (lambda x: [v for row in x for v in row]) if want and isinstance(want[0], list) else (lambda x: x)
    return got is not None and len(got) == len(want) and all(
        math.isclose(g, v, rel_tol=1e-6) for g, v in zip(flat(got), flat(want)))


def _same(got: dict, want: dict) -> bool:
    return all(got[k] == want[k] or (isinstance(want[k], list) and _close(got[k], want[k])) for k in want)
