"""The 2DASL trainer on a real tiny version: the untrained model is the teacher, training lowers the
loss, resume is exact, rescoring scores every face and a round folds the scores into a new version."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.build import build
from pipeline.catalog import load_catalog, store_of
from pipeline.store.faces import read_faces
from pipeline.store.manifest import Manifest
from pipeline.store.schema import SCORES_SCHEMA
from tests.conftest import (
    AFLW_DEV,
    DATA,
    MODELS,
    NME_MARGIN,
    WILD,
    copy_images,
    documented_teacher_nme,
    write_catalog,
)
from trainer.config import FLAT_KEYS, ModelConfig, TrainConfig
from trainer.data import build_loader
from trainer.model import build_critic, build_model
from trainer.train import train


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
    # The teacher's own labels (no fusion): the rescoring test measures the teacher re-predicting them.
    import yaml

    data = yaml.safe_load(path.read_text())
    data["detectors"]["verifier"] = {"fuse": False}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    catalog = load_catalog(path)
    version, _ = build(catalog)
    assert version == 1
    return catalog


def _documented_label_nme() -> float:
    """`tiny`'s labels are the teacher's on its 4 dev faces' detector crops (no fusion): their mean NME
    against the references is the documented teacher's on those images, 3.208."""
    return float(np.mean([documented_teacher_nme("detector")[stem] for stem in AFLW_DEV[-4:]]))


def _cfg(catalog, tmp_path, **kw) -> TrainConfig:
    base = dict(dataset_root=catalog.output_root, dataset="faces@v1", batch_size=8, num_workers=0, device="cpu",
                checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, log_every=1, seed=3)
    return TrainConfig.from_dict({**base, **kw})  # flat names, as the catalog's training: section


def test_untrained_four_channel_model_is_the_teacher():
    from pipeline.crops import crop_roi, roi_from_landmarks
    from pipeline.decode import decode_image
    from pipeline.mobilenet import load_teacher_mobilenet
    from pipeline.references import load_mat_reference

    crops = []
    for stem in AFLW_DEV[:6]:
        img = decode_image((DATA / "aflw2000-dev" / f"{stem}.jpg").read_bytes())
        ref = load_mat_reference(DATA / "aflw2000-dev" / f"{stem}.mat", image_height=img.shape[0])
        crops.append(crop_roi(img, roi_from_landmarks(ref.landmarks_68)))
    crops = np.stack(crops)
    net = build_model(TrainConfig(model=ModelConfig(backbone="mobilenet", map_fusion="early"))).eval()
    late = build_model(TrainConfig(model=ModelConfig(backbone="mobilenet"))).eval()
    teacher = load_teacher_mobilenet(MODELS / "3ddfa_v2/mb05_120x120.pth").eval()
    x = net.preprocess(crops)
    points = torch.rand(6, 68, 2) * 119  # any map: its filters are zero
    with torch.no_grad():
        ours = net.whiten(net(x, points))  # compared whitened: shape params reach 1e5 in BFM units
        image_estimate = late.whiten(late.run(x, points).params_image)  # before the label is read
        theirs = teacher(x)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(image_estimate, theirs, atol=2e-5, rtol=1e-5)
    # The labelling path folds BN into the convs: the same outputs, up to float rounding.
    from pipeline.mobilenet import fused_for_inference

    with torch.no_grad():
        torch.testing.assert_close(fused_for_inference(teacher)(x), theirs, atol=1e-4, rtol=1e-4)


def test_the_loop_logs_every_term_at_every_step(tiny, tmp_path):
    """The loop logs every term, finite, at every step (that training lowers the loss:
    `test_resnet50_backbone_learns`)."""
    import json

    cfg = _cfg(tiny, tmp_path, max_steps=6)
    result = train(cfg)
    records = [json.loads(line) for line in open(result.log_path)]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        for key in ("lmk2d", "con2d", "con3d", "cyc", "params", "anchor", "critic_g", "total"):
            assert math.isfinite(r[key]), (key, r)
    # The critic trains on batches with a real pair (params that fit the crop); a mirrored face has
    # none (trainer.augment), so a batch of only mirrored faces skips the critic's step.
    assert all(math.isfinite(r["critic_d"]) for r in records if "critic_d" in r)
    assert sum("critic_d" in r for r in records) >= 4


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
    faces = read_faces(store, 1, columns=["face_id", "weight", "keep"])
    scores = rescore(load_predictor("teacher", device="cpu"), store, 1, round_index=1, batch_size=7)
    assert sorted(scores.column("face_id").to_pylist()) == sorted(faces.column("face_id").to_pylist())
    residual = scores.column("landmark_residual").to_numpy()
    # The teacher re-predicts its own labels: only the crops' JPEG round trip parts them (measured on
    # these 20 faces: median 0.17%, max 0.29%); weights in [0, 1].
    assert np.isfinite(residual).all() and np.median(residual) < 0.3 and residual.max() < 0.5, residual
    new_weight = scores.column("new_weight").to_numpy()
    assert ((0 <= new_weight) & (new_weight <= 1)).all()
    # Corrupt half the labels (3 px of noise per point on the 120 px crop, ~4% NME): the residual must
    # rank every corrupted label above every intact one (measured: 3.9-4.9% vs <= 0.3%, AUC 1.0).
    from pipeline.crops import apply_affine
    from trainer.rescore import _decode_crops, roc_auc, score_auc, score_batch

    table = read_faces(store, 1, columns=["face_id", "crop", "landmarks", "crop_affine"])
    n = table.num_rows
    crops, decoded = _decode_crops(table.column("crop").to_pylist(), table.column("face_id").to_pylist())
    labels = apply_affine(np.asarray(table.column("landmarks").to_pylist(), np.float32).reshape(n, 68, 2),
                          np.asarray(table.column("crop_affine").to_pylist(), np.float32).reshape(n, 6))
    rng = np.random.default_rng(0)
    corrupted = np.zeros(n, bool)
    corrupted[rng.permutation(n)[: n // 2]] = True
    labels[corrupted] += rng.normal(0.0, 3.0, size=(corrupted.sum(), 68, 2)).astype(np.float32)
    raw = score_batch(load_predictor("teacher", device="cpu"), crops, labels)
    assert decoded.all() and roc_auc(raw["landmark_residual"], corrupted) > 0.99, raw["landmark_residual"]
    assert raw["landmark_residual"][corrupted].min() > 2.0 > raw["landmark_residual"][~corrupted].max()

    report = score_auc(scores, read_faces(store, 1), threshold_pct=8.0)
    assert report["n"] == 4  # the four faces with reference labels
    assert report["label_nme_all_pct"] == pytest.approx(_documented_label_nme(), rel=NME_MARGIN)
    # The teacher scores its own labels ~1 everywhere; to see the fold act, give the round spread-out
    # weights, one under the drop threshold (0.1).
    import pyarrow as pa

    new_weight = np.linspace(0.05, 1.0, scores.num_rows).astype(np.float32)
    scores = scores.set_column(scores.schema.get_field_index("new_weight"), "new_weight", pa.array(new_weight))
    write_scores(store, 1, scores.cast(SCORES_SCHEMA), 1)
    version, plan = build(tiny, scores=read_scores(store, 1, 1), scores_for_version=1)
    assert version == 2 and plan.new_items == 0
    assert Manifest.read(store, 2).parent == 1
    v2 = read_faces(store, 2, columns=["face_id", "weight", "keep"]).to_pandas().set_index("face_id")
    rule_weight = faces.to_pandas().set_index("face_id").weight  # v1's weights: the catalog rules'
    by_face = dict(zip(scores.column("face_id").to_pylist(), new_weight))
    kept = v2[v2.keep]
    # kept in v2: the faces v1's rules kept, less those whose round weight (only 0.05) falls under 0.1
    v1_kept = set(faces.to_pandas().set_index("face_id").query("keep").index)
    assert set(kept.index) == {f for f in v1_kept if by_face[f] >= 0.1}
    assert len(kept) >= len(v1_kept) - 1 and len(v1_kept) >= scores.num_rows // 2
    np.testing.assert_allclose(kept.weight.to_numpy(), [rule_weight[f] * by_face[f] for f in kept.index], atol=1e-6)
    assert (v2[~v2.keep].weight == 0).all()
    with pytest.raises(ValueError, match="rescore v2 first"):
        build(tiny, scores=read_scores(store, 1, 1), scores_for_version=1)


def test_a_rounds_drop_picks_each_yaw_bins_worst_kept_faces_of_the_version(tiny):
    """The round's drop on a real version: per yaw bin, the kept faces with the highest cycle errors,
    found here by sorting the version's own rows (face ids, keep, yaw), not by the rescore's ranking."""
    from pipeline.landmarks import yaw_bins
    from trainer.checkpoint import load_predictor
    from trainer.rescore import rescore

    store = store_of(tiny)
    scores = rescore(load_predictor("teacher", device="cpu"), store, 1, round_index=1, batch_size=6, drop_worst_pct=25.0)
    faces = read_faces(store, 1, columns=["face_id", "keep", "yaw_deg"]).to_pandas().set_index("face_id")
    error = dict(zip(scores.column("face_id").to_pylist(), scores.column("cycle_error").to_pylist()))
    faces["bin"] = yaw_bins(faces.yaw_deg.to_numpy())
    want = set()
    for b in range(3):
        kept = [f for f in faces.index[(faces.bin == b) & faces.keep] if np.isfinite(error[f])]
        want |= set(sorted(kept, key=lambda f: -error[f])[:round(len(kept) * 0.25)])
    got = {f for f, why in zip(scores.column("face_id").to_pylist(), scores.column("drop_reason").to_pylist()) if why}
    assert got == want and len(want) >= 3, (got, want)
    weight = dict(zip(scores.column("face_id").to_pylist(), scores.column("new_weight").to_pylist()))
    assert all(weight[f] == 0.0 for f in got) and all(weight[f] > 0.0 for f in set(weight) - got)


# The teacher's balanced NME on the first 16 aflw2000-dev images, reference crops (docs/labels.md,
# "The tests' subsets of aflw2000-dev").
TEACHER_GT_BALANCED_16 = 3.884


def test_evaluate_prints_the_same_table_for_teacher_and_untrained_model(tmp_path, capsys):
    import json

    from flows.cli import main

    tables = {}
    for which in ("teacher", "untrained"):
        out = tmp_path / f"{which}.json"
        assert main(["evaluate", "--checkpoint", which, "--data", str(DATA / "aflw2000-dev"), "--limit", "16",
                     "--json", str(out), "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        # Each row: crops, map (the teacher has none, the student the chain's fused label), numbers.
        rows = [line.split() for line in printed.splitlines() if line.strip().startswith(("gt", "detector"))]
        assert [r[1] for r in rows] == (["-", "-"] if which == "teacher" else ["fused", "fused"])
        tables[which] = [r[:1] + r[2:] for r in rows]
        result = json.loads(out.read_text())
        # Each image's NME is the documented teacher's (docs/rounds/eval_r2.json), and so their balanced.
        for protocol in ("gt", "detector"):
            documented = documented_teacher_nme(protocol)
            for stem, nme in result["protocols"][protocol]["per_image"].items():
                assert nme == pytest.approx(documented[stem], rel=NME_MARGIN), (protocol, stem)
        assert result["protocols"]["gt"]["found"] == 16
        assert result["protocols"]["gt"]["balanced"] == pytest.approx(TEACHER_GT_BALANCED_16, rel=NME_MARGIN)
    assert len(tables["teacher"]) == 2 and tables["teacher"] == tables["untrained"]


def test_resnet50_backbone_learns(tiny, tmp_path):
    """2DASL's ResNet-50 (random init: no pretrained weights offline) takes the 4-channel input and the
    label reader through the training step, and a few steps on one fixed batch lower the total loss."""
    import dataclasses

    from pipeline.bfm import load_bfm
    from trainer.train import build_optimizers, seed_everything, set_train_mode, train_step

    # Optimisation on one fixed batch (every training face; trusted .mat params included), from
    # ResNet-50's random init: the teacher-initialised MobileNet starts at the minimum of every
    # pseudo-label term, so only a model that starts away from it can show the total falling.
    seed_everything(0)
    cfg = _cfg(tiny, tmp_path, max_steps=6, backbone="resnet50", lr=3e-4)
    bfm = load_bfm(cfg.model.bfm_path)
    net = build_model(cfg)
    encoder, critic = build_critic(cfg)
    opt, opt_critic = build_optimizers(cfg, net, encoder, critic)
    whole = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batch_size=64))  # every face
    batch = next(iter(build_loader(whole, store_of(tiny), 1, shuffle=False)))
    totals = []
    for _ in range(5):  # from a random init the total falls well past the 20% bound within 5 steps
        set_train_mode(net, cfg.model.bn_frozen)
        logged = train_step(batch, net, encoder, critic, bfm, cfg, opt, opt_critic, amp=False)
        assert logged["params"] > 0 and all(math.isfinite(v) for v in logged.values()), logged
        totals.append(logged["total"])
    assert np.mean(totals[-2:]) < 0.8 * totals[0], totals


def test_the_default_student_learns_to_read_wrong_labels(tiny, tmp_path):
    """The default student (the teacher's MobileNet with the label reader) on one fixed batch whose maps
    are the training mix (other landmarkers' points, corruptions, noisy labels, none): a few steps lower
    the total loss, and the answer's error against the best label falls with it. At step 0 the reader
    trusts every given point by half, so a wrong label pulls the answer; it must learn not to."""
    import dataclasses

    from pipeline.bfm import load_bfm
    from trainer.train import build_optimizers, seed_everything, set_train_mode, train_step

    seed_everything(0)
    cfg = _cfg(tiny, tmp_path, max_steps=10, reader_lr=3e-3, w_critic=0.0)
    bfm = load_bfm(cfg.model.bfm_path)
    net = build_model(cfg)
    encoder, critic = build_critic(cfg)
    opt, opt_critic = build_optimizers(cfg, net, encoder, critic)
    whole = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batch_size=64))  # every face
    batch = next(iter(build_loader(whole, store_of(tiny), 1, shuffle=False)))
    assert (batch["map_nme"][torch.isfinite(batch["map_nme"])] > 5).any(), "the mix holds wrong labels"
    logs = []
    for _ in range(10):
        set_train_mode(net, cfg.model.bn_frozen)
        logs.append(train_step(batch, net, encoder, critic, bfm, cfg, opt, opt_critic, amp=False))
    assert all(math.isfinite(v) for log in logs for v in log.values())
    first, last = logs[0], logs[-1]
    assert last["total"] < 0.9 * first["total"], [round(log["total"], 4) for log in logs]
    assert last["answer"] < first["answer"] and last["trust"] < first["trust"], (first, last)


def test_round_evaluation_on_reference_faces_matches_the_labels_for_the_teacher(tmp_path):
    """The untrained model re-predicts the teacher's labels from the stored crops (JPEG aside), so its
    NME against the references must match the pseudo-labels' own: the crop<->image geometry holds.
    Only the eval split counts: labelled faces of a training source are left out, and counted."""
    from trainer.checkpoint import load_predictor
    from trainer.evaluate import evaluate_version

    dev = copy_images(tmp_path / "dev", "aflw2000-dev", AFLW_DEV[-4:], with_mat=True)
    labelled_train = copy_images(tmp_path / "train", "aflw2000-dev", AFLW_DEV[:2], with_mat=True)
    path = write_catalog(tmp_path / "c.yaml", [
        {"name": "dev", "kind": "folder", "path": str(dev), "labels": "mat", "split": "eval"},
        {"name": "train", "kind": "folder", "path": str(labelled_train), "labels": "mat", "split": "train"},
    ], output_root=str(tmp_path / "out"))
    # The teacher's own labels (no fusion): the fused label beats the teacher (2.8% vs 3.2% here), so
    # only the teacher's labels are what the untrained model must re-predict.
    import yaml

    data = yaml.safe_load(path.read_text())
    data["detectors"]["verifier"] = {"fuse": False}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    catalog = load_catalog(path)
    assert build(catalog)[0] == 1
    result = evaluate_version(load_predictor("teacher", device="cpu"), store_of(catalog), 1)
    assert result["faces"] == 4 and result["labelled_train_faces_skipped"] == 2 and result["split"] == "eval"
    model, labels = result["model"]["mean"], result["pseudo_labels"]["mean"]
    assert 1.0 < labels < 8.0 and abs(model - labels) < 0.3, (model, labels)


def test_data_parallel_training_on_two_processes(tmp_path):
    """torchrun with 2 processes (gloo on the CPU; NCCL on GPUs). One step on two halves of a batch
    leaves both ranks with the same weights, and with the weights and gradients one process reaches
    on the whole batch (tests/dp_step.py). `facecurate train` on 2 ranks: each reads its own share of
    the row groups, and a resume continues each rank's shard."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT
    from trainer.checkpoint import load_checkpoint

    folder = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[600:624])
    path = write_catalog(tmp_path / "c.yaml", [{"name": "wild", "kind": "folder", "path": str(folder),
                                                "pre_cropped": True}], output_root=str(tmp_path / "out"),
                         batch_images=4, extra={"execution": {"batch_images": 4, "row_group_rows": 4}})
    build(load_catalog(path))  # 24 faces in row groups of 4: 3 per rank
    config = tmp_path / "train.yaml"
    config.write_text("checkpoint_every: 2\nnum_workers: 0\ndevice: cpu\n")

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    step_dir = tmp_path / "step"
    step_dir.mkdir()
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], [sys.executable]):
        done = subprocess.run([*cmd, "-m", "tests.dp_step", str(tmp_path / "out"), str(step_dir)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(step_dir / f"rank{r}.pt") for r in (0, 1)]
    single = torch.load(step_dir / "single.pt")
    assert ranks[0]["faces"] + ranks[1]["faces"] == single["faces"]  # two halves of one batch
    for key, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][key], value, atol=0, rtol=0, msg=key)
    # The averaged gradient is the whole batch's (float summation order aside), and so is the step.
    # Adam's first step moves each weight by about its lr (3e-5 at the least): a tenth of that is the
    # tolerance (measured: 8e-7 at most). Where a gradient is within the gradient check's own tolerance
    # of zero, its sign is summation-order noise and Adam's first step (lr * sign) may go either way:
    # those weights are left out (a CI run once failed on the critic's first layer with every gradient
    # within tolerance; that a sign flipped is our reading, not seen directly).
    for key, grad in single["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][key], grad, atol=1e-6, rtol=1e-4, msg=key)
    compared = total = 0
    for key, value in single["weights"].items():
        grad = single["grads"].get(key)
        # an exact zero has no sign to flip: Adam leaves such a weight where it was, on both sides
        settled = torch.ones_like(value, dtype=torch.bool) if grad is None else (grad.abs() > 1e-6) | (grad == 0)
        compared, total = compared + int(settled.sum()), total + value.numel()
        torch.testing.assert_close(ranks[0]["weights"][key][settled], value[settled], atol=3e-6, rtol=0, msg=key)
    assert compared > 0.95 * total, (compared, total)  # 96% in the measured run: nearly every weight is compared

    def run(steps: int, *extra: str):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "flows.cli", "train", "--catalog", str(path), "--dataset", "faces@v1", "--config", str(config),
               "--max-steps", str(steps), "--batch-size", "4", "--checkpoint-dir", str(tmp_path / "ckpt"), *extra]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    run(4)
    state = load_checkpoint(tmp_path / "ckpt" / "step-0000004.pt")
    assert state["world_size"] == 2 and len(state["positions"]) == 2
    run(6, "--resume")
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # rank 0 logs; nothing twice after the resume
    assert all(math.isfinite(r["total"]) for r in log)


def test_rescore_command_judges_the_score_against_reference_labels(tiny, tmp_path, capsys):
    import json

    from flows.cli import main

    out = tmp_path / "auc.json"
    assert main(["rescore", "--catalog", str(tiny.path), "--dataset", "faces@v1", "--checkpoint", "teacher",
                 "--round", "5", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "against the references (4 faces" in printed
    report = json.loads(out.read_text())
    assert report["n"] == 4 and set(report["auc"]) >= {"landmark_residual", "cycle_error", "one_minus_weight"}
    assert report["label_nme_all_pct"] == pytest.approx(_documented_label_nme(), rel=NME_MARGIN)


def test_train_flags_set_the_config_fields_of_their_names(tmp_path):
    """Every flag of `facecurate train` sets the TrainConfig field of its own name (a flag named
    otherwise would be silently dropped), over the catalog's `training:` section."""

    from flows.cli import build_parser, train_config_of

    path = write_catalog(tmp_path / "catalog.yaml", [{"name": "wild", "kind": "folder", "path": str(tmp_path)}],
                         extra={"training": {"warmup_steps": 3, "max_steps": 20}})
    args = build_parser().parse_args(["train", "--catalog", str(path), "--dataset", "faces@v1",
                                      "--warmup-steps", "7", "--lr", "1e-4"])
    cfg = train_config_of(args)
    assert (cfg.optimizer.warmup_steps, cfg.optimizer.lr, cfg.training.max_steps) == (7, 1e-4, 20)
    assert train_config_of(build_parser().parse_args(["train", "--catalog", str(path), "--dataset", "x"])) \
        .optimizer.warmup_steps == 3
    own = {"command", "fn", "verbose", "catalog", "config"}
    assert set(vars(args)) - own <= set(FLAT_KEYS)
