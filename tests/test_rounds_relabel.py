"""Rounds that relabel, on real wild crops with the bundled chain (three landmarkers and the verifier):
the rescoring proposes the student's fusion where the verifier predicts it better by the margin, the
next version takes it before the rules decide (idempotently, with the manifest's count), and
`facecurate rounds` runs train -> rescore -> fold N times, resuming without duplicating a version."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline.batch import decide, with_decisions
from pipeline.build import build
from pipeline.catalog import load_catalog, store_of
from pipeline.landmarks import nme_pct
from pipeline.rounds import apply_relabels
from pipeline.store.faces import read_faces
from pipeline.store.files import read_table_file, write_table
from pipeline.store.layout import Store, list_versions
from pipeline.store.manifest import FileEntry, Manifest
from pipeline.store.schema import SCORES_SCHEMA, conform_faces
from tests.conftest import WILD, copy_images, write_catalog
from trainer.rescore import RELABEL_MIN_GAIN_PCT, RELABEL_MIN_GAIN_REL, read_scores, rescore, write_scores

CORRUPTED = 4  # faces of v1 whose label is made wrong on purpose


def _rewrite_shards(store, version: int, edit) -> None:
    """Test surgery on a version nothing has read yet: each shard through `edit`, manifest entries updated."""
    manifest = Manifest.read(store, version)
    vdir = store.version_dir(version)
    for i, entry in enumerate(manifest.shards):
        table = edit(read_table_file(store.fs, f"{vdir}/{entry.file}"))
        manifest.shards[i] = FileEntry(**write_table(store.fs, f"{vdir}/{entry.file}", table))
    manifest.write(store)


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    """12 wild crops built with the bundled chain into v1; then CORRUPTED of its labels are shifted and
    jittered (~10% NME) with a predicted NME of 20%, and the rules re-decided, as if the build had
    labelled those faces badly: the rules drop them. Returns (catalog, the corrupted face ids, the
    labels before the corruption)."""
    root = tmp_path_factory.mktemp("relabel")
    wild = copy_images(root / "wild", "aflw-wild-crops", WILD[300:312])
    catalog = load_catalog(write_catalog(root / "catalog.yaml", [
        {"name": "wild", "kind": "folder", "path": str(wild), "pre_cropped": True}], output_root=str(root / "out")))
    assert build(catalog)[0] == 1
    store = store_of(catalog)
    faces = read_faces(store, 1, columns=["face_id", "landmarks"])
    ids = faces.column("face_id").to_pylist()
    bad = set(ids[::3][:CORRUPTED])
    original = dict(zip(ids, np.asarray(faces.column("landmarks").to_pylist(), np.float32).reshape(-1, 68, 2)))
    rng = np.random.default_rng(7)

    def corrupt(table: pa.Table) -> pa.Table:
        marks = np.asarray(table.column("landmarks").to_pylist(), np.float32).reshape(-1, 68, 2)
        nme = table.column("verifier_nme_pct").to_numpy().copy()
        for i, face_id in enumerate(table.column("face_id").to_pylist()):
            if face_id in bad:
                marks[i] += np.float32([5.0, -4.0]) + rng.normal(0, 2.0, (68, 2)).astype(np.float32)
                nme[i] = 20.0
        for name, values in (("landmarks", pa.array(marks.reshape(-1, 136).tolist(), pa.list_(pa.float32(), 136))),
                             ("verifier_nme_pct", pa.array(nme, pa.float32()))):
            k = table.schema.get_field_index(name)
            table = table.set_column(k, table.schema.field(k), values)
        return with_decisions(table, decide(table, catalog.rules))

    _rewrite_shards(store, 1, corrupt)
    return catalog, bad, original


@pytest.fixture(scope="module")
def round_scores(corrupted):
    """The teacher as round 1's student (it ignores the map, so its points are its own, not the
    corrupted label's): v1 rescored with the chain's verifier, and without it."""
    from trainer.checkpoint import load_predictor

    catalog, _, _ = corrupted
    predictor = load_predictor("teacher", device="cpu")
    store = store_of(catalog)
    return (rescore(predictor, store, 1, round_index=1, batch_size=5, chain=catalog.detectors),
            rescore(predictor, store, 1, round_index=1, batch_size=5))


def _by_face(table: pa.Table, column: str) -> dict:
    return dict(zip(table.column("face_id").to_pylist(), table.column(column).to_pylist()))


def test_rescore_proposes_the_students_fusion_only_where_predicted_better_by_the_margin(corrupted, round_scores):
    catalog, bad, original = corrupted
    scores, plain = round_scores
    store = store_of(catalog)
    v1 = read_faces(store, 1, columns=["face_id", "landmarks", "alt_landmarks"])
    assert sorted(scores.column("face_id").to_pylist()) == sorted(v1.column("face_id").to_pylist())
    # The student's points are back in image px: the teacher re-predicts its own candidate whatever
    # label drew the map (the crop's JPEG round trip parts them: measured up to 0.6%; a point in the
    # wrong frame would be tens of %).
    teacher = {f: next(a["points"] for a in alts if a["name"] == "tddfa_mb05")
               for f, alts in zip(v1.column("face_id").to_pylist(), v1.column("alt_landmarks").to_pylist())}
    student = _by_face(scores, "student_landmarks")
    gap = nme_pct(np.asarray([student[f] for f in teacher], np.float32).reshape(-1, 68, 2),
                  np.asarray(list(teacher.values()), np.float32).reshape(-1, 68, 2))
    assert np.max(gap) < 1.0, gap
    n_candidates = {f: len(a) for f, a in zip(v1.column("face_id").to_pylist(), v1.column("alt_landmarks").to_pylist())}
    assert all(len(p) == n_candidates[f] + 1 for f, p in _by_face(scores, "candidate_nme_pred").items())

    current = np.asarray(scores.column("label_nme_pred").to_pylist(), np.float64)
    proposed = np.asarray(scores.column("relabel_nme_pred").to_pylist(), np.float64)
    relabelled = scores.column("relabel_landmarks").is_valid().to_numpy(zero_copy_only=False)
    face_ids = scores.column("face_id").to_pylist()
    assert bad <= {f for f, r in zip(face_ids, relabelled) if r}, "every corrupted label is replaced"
    margin = np.maximum(RELABEL_MIN_GAIN_PCT, RELABEL_MIN_GAIN_REL * current)
    assert (current[relabelled] - proposed[relabelled] >= margin[relabelled]).all()
    for f, source, reason in zip(face_ids, scores.column("relabel_source").to_pylist(),
                                 scores.column("relabel_reason").to_pylist()):
        assert (source, reason is not None) == (("fused+student:r1", True) if f in _relabelled(scores) else (None, False))
    # The new labels are real repairs: back near the labels the build had made (~10% away when corrupted).
    new = _by_face(scores, "relabel_landmarks")
    for f in bad:
        before = np.asarray(original[f])[None]
        corrupted_nme = nme_pct(np.asarray(_v1_label(store, f)).reshape(1, 68, 2), before)[0]
        repaired_nme = nme_pct(np.asarray(new[f], np.float32).reshape(1, 68, 2), before)[0]
        assert corrupted_nme > 7 and repaired_nme < 1.5, (f, corrupted_nme, repaired_nme)
    # A relabelled face is weighed by its new label: the teacher's residual against its own fusion is small.
    assert (np.asarray([_by_face(scores, "new_weight")[f] for f in bad]) > 0.9).all()

    # Without a verifier the rescoring is today's: no judgement, no relabel, the same weights.
    for column in ("label_nme_pred", "candidate_nme_pred", "relabel_landmarks", "relabel_reason"):
        assert plain.column(column).null_count == plain.num_rows
    assert plain.column("student_landmarks").null_count == 0
    same = [i for i, r in enumerate(relabelled) if not r]
    np.testing.assert_allclose(plain.column("new_weight").to_numpy()[same], scores.column("new_weight").to_numpy()[same])


def _relabelled(scores: pa.Table) -> set[str]:
    ok = scores.column("relabel_landmarks").is_valid().to_pylist()
    return {f for f, r in zip(scores.column("face_id").to_pylist(), ok) if r}


def _v1_label(store, face_id: str) -> list:
    return _by_face(read_faces(store, 1, columns=["face_id", "landmarks"]), "landmarks")[face_id]


def test_a_round_folds_its_relabels_before_the_rules_idempotently(corrupted, round_scores, capsys):
    from flows.cli import main

    catalog, bad, _ = corrupted
    scores, _ = round_scores
    store = store_of(catalog)
    write_scores(store, 1, scores, 1)
    assert build(catalog, scores=read_scores(store, 1, 1), scores_for_version=1)[0] == 2
    v1 = read_faces(store, 1).to_pandas().set_index("face_id")
    v2_table = read_faces(store, 2)
    v2 = v2_table.to_pandas().set_index("face_id")
    changed = _relabelled(scores)
    row = {f: i for i, f in enumerate(scores.column("face_id").to_pylist())}
    for f in v2.index:
        names = [a["name"] for a in v2.alt_landmarks[f]]
        assert names == [a["name"] for a in v1.alt_landmarks[f]] + ["student:r1"]  # the student, a candidate
        assert len(v2.candidate_nme_pred[f]) == len(names) == len(v2.fusion_weights[f])
        s = scores.slice(row[f], 1).to_pylist()[0]
        if f in changed:
            np.testing.assert_array_equal(v2.landmarks[f], np.float32(s["relabel_landmarks"]))
            assert v2.label_source[f] == "fused+student:r1" and v2.relabel_round[f] == 1
            assert v2.relabel_reason[f] == s["relabel_reason"] and "student:r1" in v2.relabel_reason[f]
            assert v2.verifier_nme_pct[f] == pytest.approx(s["relabel_nme_pred"])
        else:
            np.testing.assert_array_equal(v2.landmarks[f], v1.landmarks[f])
            assert v2.label_source[f] == v1.label_source[f] and np.isnan(v2.relabel_round[f])
    # The rules judged the new labels: the corrupted faces v1 dropped (predicted 20%) are judged again on
    # the new label's prediction; then the round's weights are folded as before.
    # Expected from v1, the scores and the catalog's rules by hand (not by the functions under test): a
    # kept label stays v1's decision; a relabelled one, dropped by v1 only for its predicted NME, is
    # judged on the new prediction (bound per yaw bin, weight exp(-max(p - offset, 0) / scale) clipped
    # to [min_weight, 1]); then x the round's new_weight, dropped under 0.1.
    assert not v1.keep[list(bad)].any()
    bound = next(r for r in catalog.rules.drop if r.feature == "verifier_nme_pct").max_by_yaw_bin
    (soft,) = catalog.rules.weight
    new_weight = _by_face(scores, "new_weight")
    for f in v2.index:
        if f in changed:
            assert v1.keep[f] or v1.reject_reason[f].startswith("verifier_nme_pct")
            p, yaw = float(v2.verifier_nme_pct[f]), abs(float(v2.abs_yaw_deg[f]))
            rule_keep = p <= (max(bound) if np.isnan(yaw) else bound[0 if yaw <= 30 else 1 if yaw <= 60 else 2])
            rule_weight = min(max(np.exp(-max(p - soft.offset, 0.0) / soft.scale), catalog.rules.min_weight), 1.0)
        else:
            rule_keep, rule_weight = bool(v1.keep[f]), float(v1.weight[f])
        w = min(max(new_weight[f], 0.0), 1.0)
        keep = rule_keep and w >= 0.1
        assert v2.keep[f] == keep, f
        assert v2.weight[f] == pytest.approx(rule_weight * w if keep else 0.0, rel=1e-4, abs=1e-6), f
    assert v2.keep[list(bad)].any(), "a repaired label is kept again"
    manifest = Manifest.read(store, 2)
    assert manifest.counts.faces_relabelled == len(changed) >= CORRUPTED and manifest.round_folded == [1]
    assert main(["show", "--catalog", str(catalog.path), "faces@v2"]) == 0
    assert f"trainer round r1 folded: {len(changed)} faces relabelled" in capsys.readouterr().out

    # Applying the same scores again changes nothing; a rules-only rebuild re-applies them (commit's
    # round in effect) and still holds one student candidate, the same labels, and counts no relabel.
    again, n = apply_relabels(v2_table, read_scores(store, 1, 1))
    assert n == 0 and again.equals(v2_table)
    data = yaml.safe_load(open(catalog.path))
    data["rules"]["min_weight"] = 0.5
    open(catalog.path, "w").write(yaml.safe_dump(data, sort_keys=False))
    changed_rules = load_catalog(catalog.path)
    assert build(changed_rules)[0] == 3
    v3 = read_faces(store, 3).to_pandas().set_index("face_id").loc[v2.index]
    assert all([a["name"] for a in alts].count("student:r1") == 1 for alts in v3.alt_landmarks)
    assert all(np.array_equal(a, b) for a, b in zip(v3.landmarks, v2.landmarks))
    assert (v3.relabel_round.fillna(0) == v2.relabel_round.fillna(0)).all()
    manifest = Manifest.read(store, 3)
    assert manifest.counts.faces_relabelled == 0 and manifest.round_weights_from == 2


def test_rounds_command_runs_train_rescore_fold_and_resumes_without_duplicates(tmp_path, capsys):
    from flows.cli import main

    wild = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[320:332])
    path = write_catalog(tmp_path / "catalog.yaml", [
        {"name": "wild", "kind": "folder", "path": str(wild), "pre_cropped": True}],
        output_root=str(tmp_path / "out"), extra={"training": {"num_workers": 0, "log_every": 1, "seed": 1}})
    args = ["rounds", "--catalog", str(path), "--max-steps", "2", "--batch-size", "4", "--device", "cpu"]
    store = store_of(load_catalog(path))

    assert main([*args, "--rounds", "1"]) == 0
    first = capsys.readouterr().out.strip().splitlines()
    assert list_versions(store) == [1, 2]
    assert main([*args, "--rounds", "2"]) == 0  # one more round on v2, not two
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("dataset faces@v2:") and "1 of 2 rounds done" in out[0]
    assert list_versions(store) == [1, 2, 3]
    final = out[-1]
    assert final == f"{store.round_dir(2)}/checkpoints/step-0000002.pt" and open(final, "rb").read(1)
    assert first[-1] == f"{store.round_dir(1)}/checkpoints/step-0000002.pt"
    for version, parent in ((2, 1), (3, 2)):
        manifest = Manifest.read(store, version)
        assert manifest.parent == parent and manifest.round_folded == [parent]
    v3 = read_faces(store, 3, columns=["alt_landmarks"])
    assert all([a["name"] for a in alts if a["name"].startswith("student:")] == ["student:r2"]
               for alts in v3.column("alt_landmarks").to_pylist())

    # Done: a rerun trains nothing and builds nothing, and ends with the same checkpoint.
    log_lines = (tmp_path / "out/faces/rounds/v0002/checkpoints/train_log.jsonl").read_text()
    assert main([*args, "--rounds", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == final and "2 of 2 rounds done" in out[0] and list_versions(store) == [1, 2, 3]
    # A crash after round 2 finished but before v3 was committed (a version without a manifest does not
    # exist): the rerun reuses the finished round's checkpoint and scores and commits v3 once.
    (tmp_path / "out/faces/v0003/manifest.json").unlink()
    assert main([*args, "--rounds", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("finished earlier, reused" in line for line in out) and out[-1] == final
    assert list_versions(store) == [1, 2, 3]
    assert (tmp_path / "out/faces/rounds/v0002/checkpoints/train_log.jsonl").read_text() == log_lines


def test_round_command_is_the_round_on_the_latest_version_with_a_given_checkpoint(tmp_path, capsys):
    """`facecurate round` runs the round `rounds` runs, with a checkpoint instead of training: its index
    is the version it scores, it leaves the round's record and the next version folds its scores."""
    from flows.cli import main

    wild = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[340:344])
    path = write_catalog(tmp_path / "catalog.yaml", [
        {"name": "wild", "kind": "folder", "path": str(wild), "pre_cropped": True}], output_root=str(tmp_path / "out"))
    args = ["round", "--catalog", str(path), "--checkpoint", "teacher", "--device", "cpu", "--in-process"]
    store = store_of(load_catalog(path))
    assert main(["build", "--catalog", str(path), "--in-process"]) == 0

    assert main([*args, "--round", "2"]) == 2  # another index than the version's is refused, nothing written
    assert "a round's index is the version it scores" in capsys.readouterr().err
    assert list_versions(store) == [1] and not store.fs.exists(store.round_dir(1))
    assert main(args) == 0
    assert "rescored faces@v1 round 1: 4 faces" in capsys.readouterr().out
    record = json.loads(store.fs.cat_file(f"{store.round_dir(1)}/done.json"))
    assert record["round"] == 1 and record["checkpoint"] == "teacher" and record["steps"] is None
    assert record["scores"] == store.scores_path(1, 1)
    manifest = Manifest.read(store, 2)
    assert list_versions(store) == [1, 2] and manifest.parent == 1 and manifest.round_folded == [1]


def test_scores_and_shards_written_before_the_relabelling_columns_still_read(corrupted, tmp_path):
    """An old round's scores file (no relabelling columns) reads with them null and relabels nothing;
    a version whose shards predate relabel_round (linked from an older parent) reads as one table."""
    catalog, _, _ = corrupted
    store = store_of(catalog)
    faces = conform_faces(read_faces(store, 1))
    old = pa.table({"face_id": faces.column("face_id"), "round": pa.array([9] * faces.num_rows, pa.int32()),
                    "model_sha256": ["x" * 64] * faces.num_rows, "cycle_error": [1.0] * faces.num_rows,
                    "critic_score": [0.5] * faces.num_rows, "landmark_residual": [1.0] * faces.num_rows,
                    "new_weight": [0.5] * faces.num_rows})
    write_table(store.fs, store.scores_path(1, 9), old)
    scores = read_scores(store, 1, 9)
    assert scores.schema.equals(SCORES_SCHEMA) and scores.column("relabel_landmarks").null_count == len(old)
    assert apply_relabels(faces, scores) == (faces, 0)

    mixed = Store(str(tmp_path), "mixed")
    vdir = mixed.version_dir(1)
    entries = [write_table(mixed.fs, f"{vdir}/faces-a.parquet", faces.drop_columns(["relabel_round", "relabel_reason"])),
               write_table(mixed.fs, f"{vdir}/faces-b.parquet", faces)]
    Manifest(version=1, shards=entries).write(mixed)
    both = read_faces(mixed, 1)
    assert both.num_rows == 2 * faces.num_rows and both.column("relabel_round").null_count == both.num_rows
    assert read_faces(mixed, 1, columns=["face_id", "relabel_reason"]).column_names == ["face_id", "relabel_reason"]


def test_a_label_the_self_critic_finds_wrong_is_replaced_by_the_students_answer(corrupted):
    """The trainer's own judgement decides too: where the self-critic gives a label a chance of at most
    CRITIC_RELABEL the student's answer replaces it, even where the verifier predicts no gain; a label
    the critic trusts is judged by the verifier's margin alone."""
    from pipeline.crops import apply_affine
    from trainer.rescore import CRITIC_RELABEL, Relabeller, _candidates, _decode_crops

    catalog, _, _ = corrupted
    v1 = read_faces(store_of(catalog), 1, columns=["face_id", "crop", "crop_affine", "landmarks",
                                                           "alt_landmarks", "pose"])
    n = v1.num_rows
    crops, ok = _decode_crops(v1.column("crop").to_pylist(), v1.column("face_id").to_pylist())
    affine = np.asarray(v1.column("crop_affine").to_pylist(), np.float32).reshape(n, 6)
    labels = apply_affine(np.asarray(v1.column("landmarks").to_pylist(), np.float32).reshape(n, 68, 2), affine)
    candidates = _candidates(v1.column("alt_landmarks").to_pylist(), affine)
    student = labels + np.float32(0.5)  # an answer half a pixel off the label: the verifier sees no gain
    critic = np.full(n, 0.99, np.float32)
    critic[[1, 4]] = [0.2, CRITIC_RELABEL]  # the critic finds these two labels wrong
    relabeller = Relabeller.for_chain(catalog.detectors)
    poses = np.asarray(v1.column("pose").to_pylist(), np.float32)
    judged = relabeller.propose(crops, ok, labels, candidates, student, poses, 1, critic=critic)
    replaced = {i for i, p in enumerate(judged["relabel_crop"]) if p is not None}
    assert {1, 4} <= replaced
    for i in (1, 4):
        np.testing.assert_array_equal(judged["relabel_crop"][i], student[i])
        assert judged["relabel_source"][i] == "student:r1"
        assert judged["relabel_reason"][i].startswith("the self-critic finds the label wrong")
    for i in replaced - {1, 4}:  # any other change came through the verifier's margin
        assert "predicted NME" in judged["relabel_reason"][i]
