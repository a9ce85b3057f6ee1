"""The trainer's config by concern: flat names (the catalog's `training:`, flags, checkpoints written before
the split) and the nested form read alike, errors name the key as it was given, old checkpoints load."""

from __future__ import annotations

import pytest
import torch

from trainer.config import (
    FLAT_KEYS,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    train_config,
)

# The config as checkpoints stored it before the split (trainer/config.py at e8d4fd6, `to_dict()` of a
# 4-step CPU run), with some values off their defaults so that each lands where it should.
OLD_FLAT = {
    "dataset_root": "/data/out", "dataset": "faces@v1", "num_workers": 0, "holdout_fold": 1, "folds": 3,
    "shuffle_buffer": 2048, "augment": False, "aug_shift": 0.05, "aug_scale": 0.12, "aug_rotate_deg": 9.0,
    "aug_mirror": 0.5, "aug_color": 0.3, "aug_blur": 0.2, "aug_occlude": 0.2, "map_dropout": 0.15,
    "map_candidate": 0.3, "map_corrupt": 0.35, "map_extra": 2, "map_point_dropout": 0.1, "map_noise_pct": 1.5,
    "backbone": "mobilenet", "map_points": "68", "map_scale": 1.0, "map_sigma": 0.0, "map_fusion": "late",
    "reader_steps": 3, "reader_lr": 0.002, "freeze_bn": None, "teacher_weights": "/m/mb05_120x120.pth",
    "bfm_path": "/m/bfm_68.npz", "param_stats_path": "/m/param_mean_std_62d_120x120.pkl", "encoder_width": 16,
    "batch_size": 8, "lr": 3e-05, "weight_decay": 0.0001, "lr_schedule": "constant", "warmup_steps": 4,
    "grad_clip": 10.0, "critic_lr": 0.0001, "max_steps": 4, "epochs": 1, "seed": 3, "device": "cpu",
    "amp": True, "checkpoint_dir": "/ck", "checkpoint_every": 2, "keep_checkpoints": 5, "log_every": 1,
    "resume": False, "w_lmk2d": 1.0, "w_con2d": 1.0, "w_con3d": 0.1, "w_cyc": 1.0, "w_critic": 0.001,
    "w_params": 1.0, "w_image": 0.5, "w_trust": 0.2, "w_answer": 1.0, "w_extra": 1.0, "w_anchor": 0.1,
}


# Flat names added after the split: an old checkpoint lacks them and reads their defaults.
ADDED_SINCE = {"round_drop_worst_pct": 3.0}


def test_every_flat_name_of_the_old_config_has_one_place():
    assert set(FLAT_KEYS) == set(OLD_FLAT) | set(ADDED_SINCE)
    cfg = TrainConfig.from_checkpoint(OLD_FLAT)
    assert (cfg.data.root, cfg.data.holdout(), cfg.augmentation.enabled, cfg.augmentation.shift,
            cfg.augmentation.rotate_deg, cfg.augmentation.map_extra) == ("/data/out", (1, 3), False, 0.05, 9.0, 2)
    assert (cfg.model.map_points, cfg.model.reader_steps, cfg.optimizer.reader_lr, cfg.optimizer.lr_schedule,
            cfg.optimizer.warmup_steps) == ("68", 3, 0.002, "constant", 4)
    assert (cfg.training.batch_size, cfg.training.seed, cfg.checkpoint.dir, cfg.checkpoint.every,
            cfg.checkpoint.keep) == (8, 3, "/ck", 2, 5)
    assert cfg.loss.weights() == {k[2:]: v for k, v in OLD_FLAT.items() if k.startswith("w_")}
    # Every value of the flat dict is somewhere in the nested one, once.
    nested = cfg.to_dict()
    for key, (section, name) in FLAT_KEYS.items():
        assert nested[section][name] == {**OLD_FLAT, **ADDED_SINCE}[key], key
    assert TrainConfig.from_checkpoint(nested) == cfg  # what checkpoints store now reads back the same


def test_a_checkpoint_from_before_the_label_reader_is_an_early_fusion_student():
    old = {k: v for k, v in OLD_FLAT.items() if k != "map_fusion"}
    assert TrainConfig.from_checkpoint(old).model.map_fusion == "early"
    assert TrainConfig.from_checkpoint(TrainConfig().to_dict()).model.map_fusion == "late"


def test_a_checkpoint_with_the_flat_config_loads_as_its_student(tmp_path):
    from trainer.checkpoint import load_predictor, save_checkpoint
    from trainer.model import build_critic, build_model

    cfg = TrainConfig(model=ModelConfig(map_points="68", reader_steps=3))
    net = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights of its own, not the teacher's or a fresh reader's
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    encoder, critic = build_critic(cfg)
    flat = {**OLD_FLAT, "teacher_weights": cfg.model.teacher_weights, "bfm_path": cfg.model.bfm_path,
            "param_stats_path": cfg.model.param_stats_path}
    path = tmp_path / "step-0000004.pt"
    save_checkpoint(path, {"model": net.state_dict(), "encoder": encoder.state_dict(),
                           "critic": critic.state_dict(), "step": 4, "config": flat})
    loaded = load_predictor(str(path), device="cpu")
    assert loaded.net.map_points == "68" and loaded.net.reader.steps == 3
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.net.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_flat_and_nested_names_set_the_same_fields():
    flat = train_config({"lr": 1e-4, "w_lmk2d": 2.0, "augment": False}, {"checkpoint_dir": "x", "batch_size": 4})
    nested = train_config({"optimizer": {"lr": 1e-4}, "loss": {"lmk2d": 2.0}, "augmentation": {"enabled": False}},
                          {"checkpoint": {"dir": "x"}, "training": {"batch_size": 4}})
    assert flat == nested
    assert (flat.optimizer, flat.loss.lmk2d, flat.augmentation.settings(), flat.checkpoint.dir) == \
        (OptimizerConfig(lr=1e-4), 2.0, None, "x")
    # Overrides win field by field, whichever form each layer uses; untouched fields keep the section's.
    mixed = train_config({"optimizer": {"lr": 1e-4, "warmup_steps": 3}}, {"lr": 5e-4})
    assert (mixed.optimizer.lr, mixed.optimizer.warmup_steps) == (5e-4, 3)
    assert mixed.data == DataConfig() and mixed.loss == LossConfig()


@pytest.mark.parametrize(("data", "message"), [
    ({"batch_size": 0}, "training.batch_size: 0 must be >= 1"),
    ({"training": {"batch_size": 0}}, "training.training.batch_size: 0 must be >= 1"),
    ({"backbone": "vgg"}, "training.backbone: 'vgg' is not"),
    ({"model": {"backbone": "vgg"}}, "training.model.backbone: 'vgg' is not"),
    ({"optimizer": {"lrr": 1}}, "training.optimizer.lrr: unknown key"),
    ({"lrr": 1}, "training.lrr: unknown key"),
    ({"lr": 1, "optimizer": {"lr": 2}}, "training.optimizer.lr: given twice (also as 'lr')"),
    ({"optimizer": 1e-4}, "training.optimizer: a section"),
])
def test_errors_name_the_key_as_it_was_given(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_dict(data, where="training")
