"""`facecurate evaluate`: the student's map from the curation chain, the channel ablation and the paired
bootstrap against a baseline, on real aflw2000-dev images with the bundled chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import DATA, NME_MARGIN, ROOT
from trainer.evaluate import (
    StudentModel,
    derangement,
    evaluate,
    label_table,
    load_eval_set,
    paired_bootstrap,
    prepare_faces,
    reference_box,
    stratified_indices,
)

DEV = DATA / "aflw2000-dev"
N = 8
# The chain's fused labels on these N images, balanced NME per crop protocol (docs/labels.md, "The tests'
# subsets of aflw2000-dev"; 3.55 / 3.70 on all 183 / 187 images): six of the eight are under 30 degrees.
FUSED_LABEL_BALANCED = {"gt": 3.002, "detector": 3.089}


@pytest.fixture(scope="module")
def chain():
    from pipeline.catalog import load_catalog
    from pipeline.labeling import get_chain
    from trainer.evaluate import measurement_chain

    # The chain exactly as `facecurate evaluate --device cpu` builds it (shared with the CLI test).
    return get_chain(measurement_chain(load_catalog(ROOT / "catalog.yaml").detectors, "cpu", with_labels=True))


@pytest.fixture(scope="module")
def data():
    return load_eval_set(DEV, limit=N)


@pytest.fixture(scope="module")
def faces(chain, data):
    return {p: prepare_faces(p, data, chain, with_labels=True) for p in ("gt", "detector")}


@pytest.fixture(scope="module")
def untrained():
    from trainer.checkpoint import load_predictor

    return load_predictor("teacher", device="cpu")


@pytest.fixture(scope="module")
def live_map_student():
    """The step-0 student with non-zero 4th-channel filters: a model whose output depends on its map."""
    from trainer.checkpoint import load_predictor

    predictor = load_predictor("teacher", device="cpu")
    conv = next(m for m in predictor.net.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight[:, 3] = torch.randn(conv.weight[:, 3].shape, generator=torch.Generator().manual_seed(0)) * 0.5
    return StudentModel(predictor)


def test_fused_map_is_the_chains_label_on_the_curation_crop(chain, data, faces):
    from pipeline.crops import crop_roi
    from pipeline.labeling import label_images

    for protocol, f in faces.items():
        n = len(f.index)
        assert n == N and f.label_points.shape == f.teacher_points.shape == (n, 68, 2)
        assert f.label_sources == ["fused"] * n  # the verifier's fusion, not the teacher's points
        # Crop px: the labels lie on the face, inside the 120 px crop.
        assert np.isfinite(f.label_points).all()
        assert (np.median(f.label_points, axis=1) > 20).all() and (np.median(f.label_points, axis=1) < 100).all()
        # The map carries something the teacher lacks: it is not the teacher's points.
        assert np.abs(f.label_points - f.teacher_points).mean() > 0.2
        # Every crop is cut where the roi says (the detector's is the labelled face's own crop_rgb).
        for i, roi, crop in zip(f.index, f.rois, f.crops):
            np.testing.assert_array_equal(crop, crop_roi(data.images[i], roi))
        # The labels are the chain's fused labels, as measured on these faces.
        balanced = label_table(f, data)["balanced"]
        assert balanced == pytest.approx(FUSED_LABEL_BALANCED[protocol], rel=NME_MARGIN), protocol
    # detector: the label is the one `label_images` gives the matched face, moved by its affine.
    found = label_images(chain, data.images[:2], [False, False])
    from pipeline.crops import apply_affine, match_reference

    for k in range(2):
        face = found[k][match_reference([x.box.bbox for x in found[k]], data.ref_points[k])]
        np.testing.assert_allclose(faces["detector"].label_points[k], apply_affine(face.label, face.affine), atol=1e-4)


def test_label_images_uses_the_boxes_it_is_given(chain, data):
    from pipeline.labeling import label_images

    ref = [reference_box(p) for p in data.ref_points[:3]]
    shifted = ref[0] + np.array([5, -5, 5, -5], np.float32)
    given = [np.stack([ref[0], shifted]), ref[1][None], None]
    out = label_images(chain, data.images[:3], [False] * 3, boxes=given)
    assert [len(faces) for faces in out[:2]] == [2, 1]  # faces found = boxes given
    np.testing.assert_array_equal(out[0][1].box.bbox, shifted)
    assert out[0][0].box.score == 1.0
    assert np.abs(out[0][0].label - out[0][1].label).max() > 0  # each box is labelled on its own
    # A None entry detects as usual, and no `boxes` at all is the default path.
    detected = label_images(chain, data.images[2:3], [False])
    assert len(out[2]) == len(detected[0]) >= 1
    np.testing.assert_array_equal(out[2][0].box.bbox, detected[0][0].box.bbox)
    np.testing.assert_allclose(out[2][0].label, detected[0][0].label, atol=1e-4)


def test_ablation_untrained_student_ignores_every_map(data, faces, untrained):
    """The step-0 student's 4th-channel filters are zero: fused, blank and shuffled maps give the same NME."""
    result = evaluate(StudentModel(untrained), data, faces, maps=("fused", "zero", "shuffled"))
    assert set(result["by_map"]) == {"fused", "zero", "shuffled"} and result["map"] == "fused"
    for protocol in ("gt", "detector"):
        per = [np.array(list(result["by_map"][m][protocol]["per_image"].values())) for m in ("fused", "zero", "shuffled")]
        assert len(per[0]) == N
        np.testing.assert_array_equal(per[0], per[1])
        np.testing.assert_array_equal(per[0], per[2])


def test_ablation_a_student_that_reads_its_map_gets_each_map(data, faces, live_map_student):
    result = evaluate(live_map_student, data, faces, maps=("fused", "zero", "shuffled", "teacher"))
    for protocol, f in faces.items():
        per = {m: np.array(list(result["by_map"][m][protocol]["per_image"].values())) for m in result["by_map"]}
        for a, b in [("fused", "zero"), ("fused", "shuffled"), ("fused", "teacher"), ("zero", "shuffled")]:
            assert np.abs(per[a] - per[b]).max() > 1e-3, (protocol, a, b)
        # The fused row is the student fed the chain's labels, and the shuffled row another image's.
        expected = live_map_student.predict_points(f, f.label_points)
        direct = live_map_student.predictor.points(live_map_student.predictor.params(f.crops, f.label_points))
        np.testing.assert_allclose(expected, direct, atol=1e-5)
        from trainer.evaluate import score_points

        np.testing.assert_allclose(score_points(expected, f, data)[0], per["fused"], atol=1e-3)
        shuffled = live_map_student.predict_points(f, f.label_points[derangement(len(f.index))])
        np.testing.assert_allclose(score_points(shuffled, f, data)[0], per["shuffled"], atol=1e-3)


def test_derangement_moves_every_image_with_a_fixed_seed():
    for n in (2, 3, 8, 187):
        perm = derangement(n, seed=0)
        assert sorted(perm) == list(range(n)) and (perm != np.arange(n)).all()
        np.testing.assert_array_equal(perm, derangement(n, seed=0))
    assert (derangement(50, seed=0) != derangement(50, seed=1)).any()


def test_paired_bootstrap_properties():
    rng = np.random.default_rng(1)
    yaw = np.concatenate([rng.uniform(-30, 30, 60), rng.uniform(31, 59, 30), rng.uniform(-89, -61, 10)])
    a = rng.gamma(4.0, 1.0, yaw.size)
    same = paired_bootstrap(a, a.copy(), yaw, n=2000)
    assert same["balanced"]["ci95"] == [0.0, 0.0] and same["mean"]["ci95"] == [0.0, 0.0]
    shifted = paired_bootstrap(a + 0.25, a, yaw, n=2000)
    np.testing.assert_allclose(shifted["mean"]["ci95"], [0.25, 0.25], atol=1e-9)
    np.testing.assert_allclose(shifted["balanced"]["ci95"], [0.25, 0.25], atol=1e-9)
    assert [b["count"] for b in shifted["bins"]] == [60, 30, 10]
    # A change in the 60-90 bin only: a third of it in the balanced difference, a tenth in the mean.
    b = a.copy()
    b[yaw < -60] += 1.5
    one_bin = paired_bootstrap(a, b, yaw, n=2000)
    assert one_bin["balanced"]["diff"] == pytest.approx(-0.5) and one_bin["mean"]["diff"] == pytest.approx(-0.15)
    assert one_bin["bins"][2]["ci95"] == pytest.approx([-1.5, -1.5]) and one_bin["bins"][0]["ci95"] == [0.0, 0.0]
    # Noise around a real difference: the interval covers it, is not degenerate, and is reproducible.
    worse = a + rng.normal(-0.1, 0.3, a.size)
    noisy = paired_bootstrap(worse, a, yaw, n=2000, seed=3)
    lo, hi = noisy["balanced"]["ci95"]
    assert lo < noisy["balanced"]["diff"] < hi and hi - lo > 0.05
    assert noisy == paired_bootstrap(worse, a, yaw, n=2000, seed=3)
    assert noisy["balanced"]["ci95"] != paired_bootstrap(worse, a, yaw, n=2000, seed=4)["balanced"]["ci95"]
    # NaN NMEs are left out and counted.
    a_nan = a.copy()
    a_nan[0] = np.nan
    assert paired_bootstrap(a_nan, a, yaw, n=100)["dropped"] == 1


def test_stratified_resampling_keeps_the_bin_counts():
    bins = np.array([0] * 7 + [1] * 4 + [2] * 2 + [0] * 3)
    idx = stratified_indices(bins, 500, np.random.default_rng(0))
    assert idx.shape == (500, bins.size)
    counts = np.stack([np.bincount(bins[row], minlength=3) for row in idx])
    assert (counts == np.bincount(bins)).all()
    assert len(np.unique(idx[:, 0])) > 1  # it does resample


def test_cli_compares_the_untrained_student_with_the_teacher(tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", "untrained", "--baseline", "teacher", "--data", str(DEV),
                 "--limit", "6", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    ci_lines = [line for line in printed.splitlines() if "95% CI" in line]
    assert len(ci_lines) == 2 and ci_lines[0].split()[0] == "gt" and ci_lines[1].split()[0] == "detector"
    result = json.loads(out.read_text())
    assert result["map"] == "fused" and result["baseline"]["checkpoint"] == "teacher"
    assert set(result["map_labels"]) == {"gt", "detector"}
    for protocol in ("gt", "detector"):
        c = result["comparison"][protocol]
        assert c["resamples"] == 10_000 and c["images"] == result["protocols"][protocol]["found"] == 6
        # The untrained student is the teacher: the difference and its interval are (about) zero.
        assert max(abs(v) for v in c["balanced"]["ci95"] + c["mean"]["ci95"]) < 1e-3
        assert result["baseline"]["protocols"][protocol]["per_image"].keys() == \
            result["protocols"][protocol]["per_image"].keys()
