"""The 2DASL trainer on a real tiny version: the untrained model is the teacher, training lowers the
loss, resume is exact, rescoring scores every face and a round folds the scores into a new version."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from pipeline import shards
from pipeline.build import build, store_of
from pipeline.catalog import load_catalog
from tests.conftest import AFLW_DEV, DATA, MODELS, WILD, copy_images, write_catalog
from trainer.config import TrainConfig
from trainer.data import build_loader
from trainer.train import build_critic, build_model, compute_losses, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 AFLW2000-3D images as a *train* source (their .mat params exercise the supervised loss;
    the real dev split stays eval-only) + 16 wild crops: one committed version."""
    root = tmp_path_factory.mktemp("tiny")
    dev = copy_images(root / "src/dev", "aflw2000-dev", AFLW_DEV[-4:], with_mat=True)
    wild = copy_images(root / "src/wild", "aflw-wild-crops", WILD[200:216])
    path = write_catalog(root / "catalog.yaml", [
        {"name": "dev", "kind": "folder", "path": str(dev), "labels": "mat", "split": "train"},
        {"name": "wild", "kind": "folder", "path": str(wild), "pre_cropped": True},
    ], output_root=str(root / "out"))
    catalog = load_catalog(path)
    version, _ = build(catalog)
    assert version == 1
    return catalog


def _cfg(catalog, tmp_path, **kw) -> TrainConfig:
    base = dict(dataset_root=catalog.output_root, dataset="faces@v1", batch_size=8, num_workers=0, device="cpu",
                checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, log_every=1, seed=3)
    return TrainConfig(**{**base, **kw})


def test_untrained_four_channel_model_is_the_teacher():
    from pipeline.crops import crop_roi, roi_from_landmarks
    from pipeline.decode import decode_image
    from pipeline.references import load_mat_reference
    from trainer.mobilenet import load_teacher_mobilenet

    crops = []
    for stem in AFLW_DEV[:6]:
        img = decode_image((DATA / "aflw2000-dev" / f"{stem}.jpg").read_bytes())
        ref = load_mat_reference(DATA / "aflw2000-dev" / f"{stem}.mat", image_height=img.shape[0])
        crops.append(crop_roi(img, roi_from_landmarks(ref.landmarks_68)))
    crops = np.stack(crops)
    net = build_model(TrainConfig(backbone="mobilenet")).eval()
    teacher = load_teacher_mobilenet(MODELS / "3ddfa_v2/mb05_120x120.pth").eval()
    x = net.preprocess(crops)
    maps = torch.where(torch.rand(6, 1, 120, 120) > 0.99, 1.0, -1.0)  # any map: its filters are zero
    with torch.no_grad():
        ours = net.whiten(net(x, maps))  # compared whitened: shape params reach 1e5 in BFM units
        theirs = teacher(x)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def _fixed_batch_loss(cfg, net, encoder, critic, bfm) -> float:
    batch = next(iter(build_loader(cfg, shards.Store(cfg.dataset_root, "faces"), 1, shuffle=False)))
    net.eval()
    with torch.no_grad():
        _, _, logged = compute_losses(batch, net, encoder, critic, bfm, cfg, amp=False)
    return logged["total"], logged


def test_a_few_steps_lower_the_loss_and_log_every_term(tiny, tmp_path):
    from trainer.bfm import load_bfm
    from trainer.checkpoint import load_checkpoint

    cfg = _cfg(tiny, tmp_path, max_steps=12)  # default lr (1e-4) and cosine schedule
    bfm = load_bfm(cfg.bfm_path)
    net = build_model(cfg)
    encoder, critic = build_critic(cfg)
    before, terms = _fixed_batch_loss(cfg, net, encoder, critic, bfm)
    assert terms["params"] > 0  # the batch holds trusted .mat params: the supervised term is live
    result = train(cfg)
    assert result.steps == 12
    state = load_checkpoint(result.checkpoint)
    net.load_state_dict(state["model"])
    encoder.load_state_dict(state["encoder"])
    critic.load_state_dict(state["critic"])
    after, _ = _fixed_batch_loss(cfg, net, encoder, critic, bfm)
    assert after < before, (before, after)
    import json

    records = [json.loads(line) for line in open(result.log_path)]
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        for key in ("lmk2d", "con2d", "con3d", "cyc", "params", "anchor", "critic_g", "critic_d", "total"):
            assert math.isfinite(r[key]), (key, r)


def test_resume_is_exact(tiny, tmp_path):
    from trainer.checkpoint import load_checkpoint

    # A constant schedule: the interrupted run stands for a 4-step run stopped after step 2 (a cosine
    # schedule would differ between max_steps=2 and 4, which is not what resuming is about).
    straight = train(_cfg(tiny, tmp_path / "a", max_steps=4, lr_schedule="constant"))
    first = train(_cfg(tiny, tmp_path / "b", max_steps=2, lr_schedule="constant"))
    assert first.steps == 2
    resumed = train(_cfg(tiny, tmp_path / "b", max_steps=4, lr_schedule="constant", resume=True))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert b["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=0, rtol=0, msg=key)
    assert open(straight.log_path).read().count("\n") == open(resumed.log_path).read().count("\n") == 4


def test_rescore_scores_every_face_and_a_round_folds_them(tiny, tmp_path):
    from trainer.checkpoint import load_predictor
    from trainer.rescore import read_scores, rescore, write_scores

    store = store_of(tiny)
    faces = shards.read_faces(store, 1, columns=["face_id", "weight", "keep"])
    scores = rescore(load_predictor("teacher", device="cpu"), store, 1, round_index=1, batch_size=7)
    assert sorted(scores.column("face_id").to_pylist()) == sorted(faces.column("face_id").to_pylist())
    residual = scores.column("landmark_residual").to_numpy()
    # The teacher re-predicts its own labels: small residuals, weights in [0, 1].
    assert np.isfinite(residual).all() and np.median(residual) < 3.0
    new_weight = scores.column("new_weight").to_numpy()
    assert ((0 <= new_weight) & (new_weight <= 1)).all()
    from trainer.rescore import score_auc

    report = score_auc(scores, shards.read_faces(store, 1), threshold_pct=8.0)
    assert report["n"] == 4  # the four faces with reference labels
    assert 0 < report["label_nme_all_pct"] < 10
    write_scores(store, 1, scores, 1)
    version, plan = build(tiny, scores=read_scores(store, 1, 1), scores_for_version=1)
    assert version == 2 and plan.new_items == 0
    assert shards.read_manifest(store, 2)["parent"] == 1
    v2 = shards.read_faces(store, 2, columns=["face_id", "weight", "keep"]).to_pandas().set_index("face_id")
    by_face = dict(zip(scores.column("face_id").to_pylist(), new_weight))
    kept = v2[v2.keep]
    np.testing.assert_allclose(kept.weight.to_numpy(), [by_face[f] for f in kept.index], atol=1e-6)
    with pytest.raises(ValueError, match="rescore v2 first"):
        build(tiny, scores=read_scores(store, 1, 1), scores_for_version=1)


def test_evaluate_prints_the_same_table_for_teacher_and_untrained_model(tmp_path, capsys):
    import json

    from flows.cli import main

    tables = {}
    for which in ("teacher", "untrained"):
        out = tmp_path / f"{which}.json"
        assert main(["evaluate", "--checkpoint", which, "--data", str(DATA / "aflw2000-dev"), "--limit", "16",
                     "--json", str(out), "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        tables[which] = [line for line in printed.splitlines() if line.strip().startswith(("gt", "detector"))]
        result = json.loads(out.read_text())
        assert result["protocols"]["gt"]["found"] == 16 and 2.0 < result["protocols"]["gt"]["balanced"] < 6.0
    assert len(tables["teacher"]) == 2 and tables["teacher"] == tables["untrained"]
