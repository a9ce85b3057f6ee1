"""The round's own drop: the kept faces whose cycle error ranks among the worst of their yaw bin get
new weight 0 and a reason, faces an earlier round dropped stay dropped until their label changes, and
the next version drops them all with their reasons. Expected values are worked out by hand from the
made-up errors, not by the functions under test."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.rounds import fold_scores
from pipeline.store.schema import FACES_SCHEMA, SCORES_SCHEMA
from trainer.rescore import _round_drops, worst_by_yaw_bin


def _faces_and_errors():
    """100 kept frontal faces with errors 0..99; 40 faces at 45 degrees with errors 0..39, the one at 39 not
    kept; one profile face without a finite error; two faces without a yaw (no bin), huge errors."""
    yaw = np.r_[np.full(100, 10.0), np.full(40, -45.0), [75.0], [np.nan, np.nan]]
    error = np.r_[np.arange(100.0), np.arange(40.0), [np.nan], [1e6, 1e6]]
    keep = np.ones(len(yaw), bool)
    keep[139] = False  # the 30-60 bin's worst error, already dropped by the rules
    return error, keep, yaw


def test_the_worst_of_each_yaw_bins_kept_faces_are_picked():
    error, keep, yaw = _faces_and_errors()
    # 3%: round(3.0) = 3 of the 100 frontal ones (errors 97, 98, 99); round(0.03 x 39) = 1 of the 39 kept
    # at 45 degrees (error 38: 39 is not kept); none at 75 (no finite error) or without a yaw.
    picked = worst_by_yaw_bin(error, keep, yaw, 3.0)
    assert np.flatnonzero(picked).tolist() == [97, 98, 99, 138]
    # 10%: 10 frontal (90..99), round(3.9) = 4 at 45 degrees (35..38)
    assert np.flatnonzero(worst_by_yaw_bin(error, keep, yaw, 10.0)).tolist() == [*range(90, 100), 135, 136, 137, 138]
    assert not worst_by_yaw_bin(error, keep, yaw, 0.0).any()


def test_a_rounds_drop_reaches_the_next_version_with_its_reason():
    error, keep, yaw = _faces_and_errors()
    n = len(error)
    ids = [f"f{i}:0" for i in range(n)]
    earlier = "round 1 drop: cycle error 7.00% among the worst 3% of yaw bin 0-30"
    # Face 0 and face 1 were dropped by round 1; this round relabels face 1 (a new label, judged afresh).
    keep[[0, 1]] = False
    reject = [None if keep[i] else "verifier_nme_pct 9 > 5.45" for i in range(n)]
    reject[0] = reject[1] = earlier
    scores = pa.Table.from_pylist([{"face_id": ids[i], "round": 2, "model_sha256": "m", "cycle_error": float(error[i]),
                                    "critic_score": 0.5, "landmark_residual": 1.0, "new_weight": 0.8,
                                    "relabel_landmarks": [1.0] * 136 if i == 1 else None}
                                   for i in range(n)], schema=SCORES_SCHEMA)
    scores = _round_drops(scores, keep, yaw, reject, 3.0, round_index=2)
    weight = scores.column("new_weight").to_numpy()
    # round(0.03 x 98) = 3 of the 98 kept frontal faces (97, 98, 99), 1 of the 39 kept at 45 degrees, and face 0
    assert np.flatnonzero(weight == 0).tolist() == [0, 97, 98, 99, 138] and (weight[weight > 0] == np.float32(0.8)).all()
    reasons = scores.column("drop_reason").to_pylist()
    assert reasons[0] == earlier and reasons[1] is None
    assert reasons[99] == "round 2 drop: cycle error 99.00% among the worst 3% of yaw bin 0-30"
    assert reasons[138] == "round 2 drop: cycle error 38.00% among the worst 3% of yaw bin 30-60"
    assert sum(r is not None for r in reasons) == 5

    # The next version: the rules keep faces 0 and 1 again (their reasons were the round's); the fold drops
    # the round's picks and face 0 with their reasons, and leaves the rule's own drop (139) as it was.
    schema = pa.schema([FACES_SCHEMA.field(c) for c in ("face_id", "keep", "weight", "reject_reason")])
    rule_keep = [i != 139 for i in range(n)]
    faces = pa.Table.from_pylist([{"face_id": ids[i], "keep": rule_keep[i], "weight": 1.0 if rule_keep[i] else 0.0,
                                   "reject_reason": None if rule_keep[i] else "verifier_nme_pct 9 > 5.45"}
                                  for i in range(n)], schema=schema)
    out = {r["face_id"]: r for r in fold_scores(faces, scores).to_pylist()}
    assert [i for i in range(n) if not out[ids[i]]["keep"]] == [0, 97, 98, 99, 138, 139]
    assert out[ids[0]]["reject_reason"] == earlier and out[ids[99]]["reject_reason"] == reasons[99]
    assert out[ids[99]]["weight"] == 0.0 and out[ids[1]]["keep"]
    assert out[ids[139]]["reject_reason"] == "verifier_nme_pct 9 > 5.45"  # the rule's reason stays
    assert abs(out[ids[5]]["weight"] - 0.8) < 1e-6  # the others: weighted by the round as before

    # A scores file from before the column: the weight alone decides, with the weight's reason.
    old = scores.drop_columns(["drop_reason"])
    out = {r["face_id"]: r for r in fold_scores(faces, old).to_pylist()}
    assert out[ids[99]]["reject_reason"] == "rescore new_weight 0 < 0.1" and not out[ids[99]]["keep"]


def test_a_versions_counts_name_the_rounds_drops_apart():
    from pipeline.commit import _reason_kind

    assert _reason_kind("round 12 drop: cycle error 9.10% among the worst 3% of yaw bin 60-90") == "round drop"
    assert _reason_kind("rescore new_weight 0.05 < 0.1") == "rescore"
    assert _reason_kind("verifier_nme_pct 9 > 5.45") == "verifier_nme_pct"
    assert _reason_kind("round-trip of something else") == "round-trip"  # only the round's own form counts


def test_a_round_never_drops_eval_faces(built_small_catalog):
    """Half of each yaw bin's kept faces are dropped, but only among the training faces: the student
    never saw the eval faces (their errors run higher) and never trains on them."""
    from pipeline.catalog import load_catalog, store_of
    from pipeline.store.faces import read_faces
    from trainer.checkpoint import load_predictor
    from trainer.rescore import rescore

    path, version, _ = built_small_catalog
    store = store_of(load_catalog(path))
    faces = read_faces(store, version, columns=["face_id", "split", "keep"]).to_pandas().set_index("face_id")
    assert (faces.split == "eval").sum() >= 4 and ((faces.split == "train") & faces.keep).sum() >= 4
    scores = rescore(load_predictor("teacher", device="cpu"), store, version, round_index=1, drop_worst_pct=50.0)
    dropped = {f for f, why in zip(scores.column("face_id").to_pylist(), scores.column("drop_reason").to_pylist()) if why}
    assert dropped and all(faces.split[f] == "train" and faces.keep[f] for f in dropped), faces.loc[list(dropped)]


def test_the_catalog_sets_the_share_a_round_drops(tmp_path):
    """`training: {round_drop_worst_pct: N}` reaches a round: at 50, half of each bin's kept training
    faces (here at least 2 of the 6 wild crops); at 0, none."""
    import yaml

    from flows.catalog import load_catalog
    from flows.rounds import score_round
    from pipeline.build import build
    from pipeline.catalog import store_of
    from pipeline.store.faces import read_faces
    from tests.conftest import WILD, copy_images, write_catalog

    wild = copy_images(tmp_path / "src" / "wild", "aflw-wild-crops", WILD[:6])
    path = write_catalog(tmp_path / "catalog.yaml", [{"name": "wild", "kind": "folder", "path": str(wild),
                                                     "pre_cropped": True}], output_root=str(tmp_path / "out"))
    dropped = {}
    for share in (50, 0):
        data = yaml.safe_load(path.read_text())
        data["training"] = {"round_drop_worst_pct": share}
        data["dataset"] = f"faces{share}"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        catalog = load_catalog(path)
        build(catalog)
        record = score_round(catalog, store_of(catalog), 1, checkpoint="teacher", evaluate=False)
        dropped[share] = record["faces_dropped"]
    kept = read_faces(store_of(catalog), 1, columns=["keep"]).column("keep").to_pylist()
    assert sum(kept) >= 4 and dropped[50] >= 2 and dropped[0] == 0, (dropped, kept)
