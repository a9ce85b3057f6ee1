"""One training step for the data-parallel test: under torchrun each rank steps on its half of one
batch; run plainly, one process steps on the whole batch. Saves the weights and gradients it ends with.

    python -m tests.dp_step DATASET_ROOT OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.bfm import load_bfm
from pipeline.store.layout import Store
from trainer.config import AugmentationConfig, DataConfig, OptimizerConfig, TrainConfig, TrainingConfig
from trainer.data import build_loader
from trainer.distributed import World
from trainer.model import build_critic, build_model
from trainer.train import build_optimizers, seed_everything, set_train_mode, train_step

BATCH = 8


def main(dataset_root: str, out_dir: str) -> None:
    # No augmentation: every process reads the same 8 faces. Equal face weights: each loss is a
    # weighted mean over its batch, and only with equal weights (and equal halves) is the mean of the
    # two halves' gradients the whole batch's gradient, which the single process computes.
    cfg = TrainConfig(data=DataConfig(root=dataset_root, dataset="faces@v1", num_workers=0),
                      augmentation=AugmentationConfig(enabled=False),
                      optimizer=OptimizerConfig(lr_schedule="constant"),
                      training=TrainingConfig(batch_size=BATCH, device="cpu", seed=5))
    world = World.from_env("cpu")
    try:
        seed_everything(cfg.training.seed)
        batch = next(iter(build_loader(cfg, Store(dataset_root, "faces"), 1, shuffle=False)))
        assert len(batch["face_id"]) == BATCH, batch["face_id"]
        batch["weight"] = torch.ones_like(batch["weight"])
        if world.enabled:
            half = slice(world.rank * BATCH // world.size, (world.rank + 1) * BATCH // world.size)
            batch = {k: v[half] for k, v in batch.items()}
        net = build_model(cfg)
        encoder, critic = build_critic(cfg)
        opt, opt_critic = build_optimizers(cfg, net, encoder, critic)
        world.broadcast(net, encoder, critic)
        set_train_mode(net, cfg.model.bn_frozen)
        train_step(batch, net, encoder, critic, load_bfm(cfg.model.bfm_path), cfg, opt, opt_critic, amp=False,
                   world=world)
        modules = {"net": net, "encoder": encoder, "critic": critic}
        torch.save({"weights": {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()},
                    "grads": {f"{m}.{k}": p.grad for m, mod in modules.items() for k, p in mod.named_parameters()
                              if p.grad is not None},
                    "faces": list(batch["face_id"])},
                   Path(out_dir) / (f"rank{world.rank}.pt" if world.enabled else "single.pt"))
    finally:
        world.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
