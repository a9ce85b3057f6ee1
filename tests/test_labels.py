"""Candidates in one point convention, the verifier, fusion and the per-yaw-bin rule (issue 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import AFLW_DEV, DATA, MODELS

OSF = MODELS / "openseeface" / "lm_model0_opt.onnx"


def _dev_images(n: int):
    from pipeline.decode import decode_image
    from pipeline.references import load_mat_reference

    images, refs, yaws = [], [], []
    for stem in AFLW_DEV[:n]:
        img = decode_image((DATA / "aflw2000-dev" / f"{stem}.jpg").read_bytes())
        ref = load_mat_reference(DATA / "aflw2000-dev" / f"{stem}.mat", image_height=img.shape[0])
        images.append(img)
        refs.append(ref.landmarks_68)
        yaws.append(ref.yaw_pitch_roll_deg[0])
    return images, np.array(refs), np.array(yaws)


def test_openseeface_66_points_map_onto_ibug_68():
    from pipeline.detect.openseeface import TO_68

    # 0-47 identical; the merged inner mouth corners serve 48/60 and 54/64; the rest in order.
    assert TO_68[:48].tolist() == list(range(48))
    assert TO_68[48] == TO_68[60] == 58 and TO_68[54] == TO_68[64] == 62
    assert sorted(set(TO_68.tolist())) == list(range(66))


def test_openseeface_reproduces_its_measured_recipe_and_both_backends_agree():
    """From ground-truth boxes, frontal dev faces land near the models README's 3.3% NME; the torch
    graph (the GPU path) gives onnxruntime's points."""
    from pipeline.detect.openseeface import OpenSeeFaceLandmarker, OpenSeeFaceOptions
    from pipeline.landmarks import nme_pct

    images, refs, yaws = _dev_images(12)
    boxes = [np.concatenate([r.min(0), r.max(0)])[None] for r in refs]
    ort = OpenSeeFaceLandmarker(OSF, options=OpenSeeFaceOptions(refine=False))
    points = np.array([faces[0].points for faces in ort(images, boxes)])
    nme = nme_pct(points, refs)
    frontal = np.abs(yaws) <= 30
    assert frontal.sum() >= 5 and nme[frontal].mean() < 4.5, nme
    # the convention, checked on the data: swapping the mirrored eye corners makes it far worse
    from pipeline.landmarks import FLIP_68

    assert nme_pct(points[:, FLIP_68], refs)[frontal].mean() > 2 * nme[frontal].mean()
    torch_backend = OpenSeeFaceLandmarker(OSF, options=OpenSeeFaceOptions(refine=False, backend="torch"))
    points_t = np.array([faces[0].points for faces in torch_backend(images[:3], boxes[:3])])
    assert np.abs(points_t - points[:3]).max() < 0.01


def test_fusion_is_a_per_point_soft_vote():
    from pipeline.fusion import fuse, fusion_weights, region_weights

    rng = np.random.default_rng(0)
    good = rng.uniform(20, 100, (68, 2)).astype(np.float32)
    cands = np.stack([good + rng.normal(0, 0.5, good.shape), good + rng.normal(0, 0.5, good.shape), good + 15.0])
    err = np.stack([np.full(68, 3.0), np.full(68, 3.0), np.full(68, 20.0)])
    fused, w = fuse(cands.astype(np.float32), err, tau=2.0)
    np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
    # equal predicted errors share equally: exp(-3/2) vs exp(-20/2) -> the far-off candidate all but vanishes
    np.testing.assert_allclose(w[0], w[1], rtol=1e-6)
    assert w[2].max() < 1e-3
    np.testing.assert_allclose(fused, (cands[0] + cands[1]) / 2, atol=0.02)
    # hand-computed weights for two candidates: softmax(-[2, 4] / 2) = [e^-1, e^-2] / (e^-1 + e^-2)
    w2 = fusion_weights(np.stack([np.full(68, 2.0), np.full(68, 4.0)]), tau=2.0)
    np.testing.assert_allclose(w2[0, 0], np.exp(-1) / (np.exp(-1) + np.exp(-2)), rtol=1e-5)
    assert region_weights(w).shape == (3, 5)


def test_only_3d_contour_candidates_vote_on_the_jaw():
    from pipeline.fusion import JAW, fuse, voters

    names = ["tddfa_mb05", "tddfa_mb05.flip", "peppa68", "openseeface", "student:r1"]
    mask = voters(names)
    assert mask[[0, 1, 4]].all()  # 3DMM fits vote everywhere
    assert not mask[2:4][:, JAW].any() and mask[2:4][:, 17:].all()  # 2D landmarkers: not on the jaw
    assert voters(["peppa68", "openseeface"]).all()  # no 3D candidate: everyone votes rather than no one
    rng = np.random.default_rng(1)
    cands = rng.uniform(20, 100, (4, 68, 2)).astype(np.float32)
    err = np.full((4, 68), 5.0)
    err[2] = 0.5  # Peppa predicted best everywhere: it wins every point but the jaw's
    fused, w = fuse(cands, err, tau=1.0, may_vote=voters(names[:4]))
    np.testing.assert_allclose(fused[JAW], (cands[0, JAW] + cands[1, JAW]) / 2, atol=1e-4)
    np.testing.assert_allclose(w[2, 17:], np.exp(-0.5) / (np.exp(-0.5) + 3 * np.exp(-5.0)), rtol=1e-5)
    assert w[2:, JAW].max() == 0.0


def test_rule_bounds_per_yaw_bin():
    from pipeline.catalog import DropRule, Rules
    from pipeline.quality import apply_rules

    rules = Rules(drop=(DropRule(feature="verifier_nme_pct", max_by_yaw_bin=(5.0, 6.0, 8.0)),))
    features = pd.DataFrame({"verifier_nme_pct": [5.5, 5.5, 7.0, 7.0, 9.0, 4.0, 7.5],
                             "abs_yaw_deg": [10.0, 45.0, 45.0, 75.0, 75.0, 30.0, np.nan]})
    for col in ("det_score", "face_px"):
        features[col] = 1.0
    out = apply_rules(features, rules)
    assert out.keep.tolist() == [False, True, False, True, False, True, True]  # NaN yaw: the loosest bound
    assert out.reject_reason[0] == "verifier_nme_pct 5.5 > max 5 (yaw bin 0-30)"
    assert out.reject_reason[4] == "verifier_nme_pct 9 > max 8 (yaw bin 60-90)"


def test_label_score_learns_from_every_candidate_and_guesses_absent_ones_neutrally():
    from pipeline.label_score import LabelScore, score_features

    rng = np.random.default_rng(0)
    n = 400
    context = np.repeat(rng.uniform(20, 100, (n, 1, 68, 2)), 4, axis=1) + rng.normal(0, 1, (n, 4, 68, 2))
    cand = rng.uniform(2, 10, (n, 4))
    label = rng.uniform(2, 10, n)
    pose = rng.uniform(-90, 90, (n, 3))
    true = np.exp(0.2 * np.log(label) + 0.6 * np.log(cand[:, 0]) + 0.3)  # the teacher's figure says most
    x = score_features(label, cand, np.ones((n, 4), bool), context, pose)
    assert x.shape == (n, 1 + 4 + 6 + 3)
    score = LabelScore.fit(x, true, alpha=1e-3)
    assert np.allclose(score(x), true, rtol=1e-3)  # an exact log-linear relation is recovered
    assert score.coef[1] > score.coef[0] > 0 and abs(score.coef[2]) < 1e-2
    # a file round trip, and an absent candidate: its figure becomes the label's, its pairs the others' mean
    again = LabelScore.from_dict(score.to_dict())
    present = np.ones((1, 4), bool)
    present[0, 3] = False
    one = score_features(label[:1], np.array([[cand[0, 0], cand[0, 1], cand[0, 2], np.nan]]), present,
                         context[:1], pose[:1])
    assert np.isclose(one[0, 4], np.log(label[0])) and np.isfinite(again(one)).all()
    pairs_with_absent = [2, 4, 5]  # (0,3), (1,3), (2,3) among the six pairs
    assert np.allclose(one[0, 5 + np.array(pairs_with_absent)], np.log(np.exp(one[0, 5 + np.array([0, 1, 3])]).mean()))


def test_marked_box_ratio_follows_the_points_an_annotator_would_mark():
    """The label score's visibility feature: the box of the points likely marked over the box of all 21.
    All marked: 1; only one half of the face: smaller; fewer than two: every point counts."""
    from pipeline.label_score import LabelScore, marked_box_ratio, score_features

    grid = np.stack(np.meshgrid(np.linspace(0, 100, 7), np.linspace(0, 100, 3)), -1).reshape(21, 2)[None]
    left = (grid[0, :, 0] <= 50).astype(float)[None]
    assert np.isclose(marked_box_ratio(grid, np.ones((1, 21)))[0], 1.0)
    assert np.isclose(marked_box_ratio(grid, left)[0], np.sqrt(0.5))  # half the width, the whole height
    one = np.zeros((1, 21))
    one[0, 3] = 0.9
    assert np.isclose(marked_box_ratio(grid, one)[0], 1.0)
    # the feature is the last column, read where the score says so; old files' scores say not
    rng = np.random.default_rng(1)
    context = rng.uniform(20, 100, (5, 4, 68, 2))
    args = (rng.uniform(2, 9, 5), rng.uniform(2, 9, (5, 4)), np.ones((5, 4), bool), context, np.zeros((5, 3)))
    plain, with_vis = score_features(*args), score_features(*args, visibility=np.full((5, 21), 0.9))
    assert with_vis.shape[1] == plain.shape[1] + 1 and np.allclose(with_vis[:, :-1], plain)
    assert np.allclose(with_vis[:, -1], 0.0)  # every point likely marked: log ratio 0
    old = LabelScore.fit(plain, rng.uniform(2, 9, 5)).to_dict()
    del old["uses_visibility"]
    assert LabelScore.from_dict(old).uses_visibility is False


def test_fusion_softness_is_chosen_for_the_curated_dataset_not_the_mean():
    """The tau whose rule keeps the most faces wins, unless one of its yaw bins is worse than the teacher's."""
    from trainer.verifier import choose_tau

    def outcome(bins, kept):
        return {"table": {"bins": bins}, "keep": np.array([True] * kept + [False] * (100 - kept))}

    teacher = [5.0, 5.5, 6.0]
    outcomes = {0.25: outcome([4.3, 4.8, 5.4], 87), 1.0: outcome([4.4, 4.9, 5.5], 91), 4.0: outcome([4.6, 5.0, 6.1], 95)}
    assert choose_tau(outcomes, teacher) == 1.0  # 4.0 keeps more, but its 60-90 bin is worse than the teacher's


def test_aflw21_references_and_their_nme():
    from pipeline.references import aflw21_from_68, load_aflw21, nme21_pct

    refs = load_aflw21(str(DATA / "aflw-wild-crops-refs.npz"))
    assert len(refs) == 3163
    pts, yaw = next(iter(refs.values()))
    assert pts.shape == (21, 2) and np.isfinite(yaw)
    # references made from a label sit exactly on it (NME 0, one point not annotated); the label slid by
    # 1% of the annotated box's size has NME 1 (every point moves by 0.01 * sqrt(w*h))
    rng = np.random.default_rng(1)
    label = rng.uniform(10, 110, (68, 2)).astype(np.float32)
    ref = aflw21_from_68(label).astype(np.float32)
    ref[3] = np.nan
    assert nme21_pct(label[None], ref[None])[0] == pytest.approx(0.0, abs=1e-5)
    span = np.nanmax(ref, 0) - np.nanmin(ref, 0)
    shifted = label + np.array([0.01 * np.sqrt(span[0] * span[1]), 0.0], np.float32)
    assert nme21_pct(shifted[None], ref[None])[0] == pytest.approx(1.0, rel=1e-4)


@pytest.fixture(scope="module")
def shipped_verifier():
    from pipeline.mobilenet import fused_for_inference, load_teacher_mobilenet
    from pipeline.verifier import SHIPPED_WEIGHTS, Verifier

    assert SHIPPED_WEIGHTS.is_file(), "the verifier ships with the package (facecurate verifier-train)"
    assert SHIPPED_WEIGHTS.stat().st_size < 2_000_000
    net = fused_for_inference(load_teacher_mobilenet(MODELS / "3ddfa_v2" / "mb05_120x120.pth"))
    return Verifier.load(net)


def test_shipped_verifier_prefers_the_right_label_on_the_same_image(shipped_verifier):
    """Same crop, the teacher's label vs the same label slid 12% of the face off it, each judged with
    no other candidate to compare with (the context is the label itself): the shipped verifier
    predicts the slid one worse on (nearly) every face, so it reads the image and the label together."""
    from conftest import WILD

    from pipeline.decode import decode_image
    from pipeline.detect.tddfa import TDDFALandmarker, TDDFAOptions
    from pipeline.verifier import CONTEXT, VerifierInputs, face_nme

    teacher = TDDFALandmarker(MODELS / "3ddfa_v2" / "mb05_120x120.pth", options=TDDFAOptions(
        bfm=MODELS / "bfm" / "bfm_68.npz", param_stats=MODELS / "3ddfa_v2" / "param_mean_std_62d_120x120.pkl",
        refine=False))
    names = WILD[::100][:24]
    crops = [decode_image((DATA / "aflw-wild-crops" / n).read_bytes()) for n in names]
    boxes = [np.array([[0, 0, 119, 119]], np.float32)] * len(crops)
    # the crop the verifier sees is the teacher's own 120x120 input: use the whole 3DDFA-style crop
    points = [faces[0].points for faces in teacher(crops, boxes)]
    present = np.array([True] + [False] * (len(CONTEXT) - 1))

    def alone(crop, label):
        return VerifierInputs(crop_rgb=crop, labels=label[None], context=np.stack([label] * len(CONTEXT)),
                              present=present, pose_deg=np.full(3, np.nan, np.float32))

    inputs = []
    for crop, pts in zip(crops, points):
        span = pts.max(0) - pts.min(0)
        inputs += [alone(crop, pts), alone(crop, pts + 0.12 * np.sqrt(span[0] * span[1]))]
    pred = np.array([float(face_nme(torch.from_numpy(p))[0]) for p in shipped_verifier.score(inputs)]).reshape(-1, 2)
    assert (pred[:, 1] > pred[:, 0]).mean() >= 0.9, pred
    # Its marked-point chances rank the points AFLW's annotators marked above those they left out
    # (hidden by the head's turn, hair, hands). These crops are among its training faces: this checks
    # that the output reads the right points, not how well it generalises (docs/labels.md has that).
    from pipeline.landmarks import roc_auc
    from pipeline.references import load_aflw21

    refs = load_aflw21(str(DATA / "aflw-wild-crops-refs.npz"))
    marked = np.stack([np.isfinite(refs[Path(n).stem][0]).all(-1) for n in names])
    chances = shipped_verifier.visibility(inputs[::2])
    assert chances.shape == (len(names), 21) and ((chances >= 0) & (chances <= 1)).all()
    assert roc_auc(chances.ravel(), marked.ravel()) > 0.8


def test_the_scoring_pass_gives_the_marked_point_chances_a_pass_of_their_own_gives(shipped_verifier):
    """The marked-point chances depend on the face, not on the label judged: the scoring pass reads them
    at whichever label is the teacher's points, and a face without such a label gets a pass of its own;
    either way they equal `visibility`'s, and the label score reads the same figures given or not."""
    from conftest import WILD

    from pipeline.decode import decode_image
    from pipeline.verifier import CONTEXT, Verifier, VerifierHead, VerifierInputs

    verifier = Verifier.load(shipped_verifier.trunk, batch_size=4)  # two chunks, the second shorter
    rng = np.random.default_rng(0)
    faces = []
    for i, name in enumerate(WILD[::300][:6]):
        crop = decode_image((DATA / "aflw-wild-crops" / name).read_bytes())
        teacher = np.array([[30 + 60 * (p % 9) / 8, 30 + 60 * (p // 9) / 7] for p in range(68)], np.float32)
        context = teacher[None] + rng.normal(0, 1.5, (len(CONTEXT), 68, 2)).astype(np.float32)
        context[0] = teacher
        others = teacher[None] + rng.normal(0, 3, (2, 68, 2)).astype(np.float32)
        # the teacher's points first, second, or not among the labels at all
        labels = [np.concatenate([teacher[None], others]), np.concatenate([others[:1], teacher[None]]),
                  others][i % 3]
        faces.append(VerifierInputs(crop_rgb=crop, labels=labels, context=context, pose_deg=np.zeros(3, np.float32),
                                    present=np.array([True, True, i % 2 == 0, True])))
    scored = verifier.score_with_visibility(faces)
    np.testing.assert_allclose(scored.visibility, verifier.visibility(faces), atol=1e-5)
    for a, b in zip(scored.point_err, verifier.score(faces)):
        np.testing.assert_array_equal(a, b)
    # the pass's maps, chunk by chunk, score another pass over the same crops as its own trunk run would
    for a, b in zip(verifier.score(faces, scored.maps), verifier.score(faces)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="not the pass over these faces"):
        verifier.score(faces[1:], scored.maps)
    head_nme = np.array([err[0].mean() for err in scored.point_err])
    context_nme = np.full((len(faces), len(CONTEXT)), 3.0)
    np.testing.assert_allclose(verifier.label_nme(faces, head_nme, context_nme, scored.visibility),
                               verifier.label_nme(faces, head_nme, context_nme), atol=1e-5)
    blind = Verifier(shipped_verifier.trunk, VerifierHead(visibility=False), label_score=verifier.label_score)
    with pytest.raises(ValueError, match="retrain the verifier with `facecurate verifier-train`"):
        blind.label_nme(faces, head_nme, context_nme)


def test_build_keeps_candidates_verifier_scores_and_the_fused_label(built_small_catalog):
    """A build with the bundled chain: every face has the five candidates in one convention, their
    predicted errors and region weights, and a label that is per point a convex mix of them."""
    from flows.catalog import load_catalog
    from pipeline.catalog import store_of
    from pipeline.store.faces import read_faces

    path, version, _ = built_small_catalog
    catalog = load_catalog(path)
    faces = read_faces(store_of(catalog), version).to_pylist()
    assert faces
    names = ["tddfa_mb05", "tddfa_mb05.flip", "peppa68", "openseeface"]
    for face in faces:
        assert [c["name"] for c in face["alt_landmarks"]] == names
        assert face["label_source"] == "fused"
        assert np.isfinite(face["verifier_nme_pct"]) and face["verifier_nme_pct"] > 0
        assert len(face["candidate_nme_pred"]) == len(names) and np.isfinite(face["candidate_nme_pred"]).all()
        weights = np.asarray(face["fusion_weights"])
        assert weights.shape == (len(names), 5) and np.allclose(weights.sum(0), 1.0, atol=1e-4)
        cands = np.stack([np.asarray(c["points"]).reshape(68, 2) for c in face["alt_landmarks"]])
        label = np.asarray(face["landmarks"]).reshape(68, 2)
        assert (label >= cands.min(0) - 1e-3).all() and (label <= cands.max(0) + 1e-3).all()
        assert not np.allclose(label, cands[0])  # a fusion, not the teacher's label passed through
    # the wild crops of the small catalog carry no AFLW-21 references (their source does not ask for them)
    assert all(f["ref_points21"] is None for f in faces)


def test_verifier_train_command_end_to_end(tmp_path):
    """The reproducible command on a few real faces: builds the catalog, cross-fits, reports, and
    writes a verifier the build can load (one epoch: the plumbing, not the figures)."""
    from conftest import WILD, copy_images, write_catalog

    from flows.cli import main
    from pipeline.mobilenet import load_teacher_mobilenet
    from pipeline.verifier import Verifier

    wild = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[:40])
    dev = copy_images(tmp_path / "dev", "aflw2000-dev", AFLW_DEV[:4], with_mat=True)
    catalog = write_catalog(tmp_path / "catalog.yaml", [
        {"name": "wild", "kind": "folder", "path": str(wild), "pre_cropped": True, "labels": "aflw21",
         "labels_file": str(DATA / "aflw-wild-crops-refs.npz")},
        {"name": "dev", "kind": "folder", "path": str(dev), "labels": "mat", "split": "eval"},
    ], output_root=str(tmp_path / "out"))
    out, report_path = tmp_path / "verifier.pt", tmp_path / "labels.json"
    assert main(["verifier-train", "--catalog", str(catalog), "--epochs", "1", "--folds", "2", "--out", str(out),
                 "--json", str(report_path)]) == 0
    import json

    report = json.loads(report_path.read_text())
    assert report["faces"] == 40 and report["eval_68"]["faces"] >= 3
    for part in (report["train_cross_fitted"], report["eval_68"]):
        assert set(part["candidates"]) == {"tddfa_mb05", "tddfa_mb05.flip", "peppa68", "openseeface"}
        assert np.isfinite(part["fused"]["mean"])
    assert len(report["shipped_rule"]["max_by_yaw_bin"]) == 3
    assert {"auc_8", "head_auc_8"} <= set(report["train_cross_fitted"]["fused"])
    verifier = Verifier.load(load_teacher_mobilenet(MODELS / "3ddfa_v2" / "mb05_120x120.pth"), out)
    assert verifier.label_score is not None and verifier.label_score.to_dict() == report["label_score"]
    assert verifier.label_score.uses_visibility and verifier.head.vis is not None
