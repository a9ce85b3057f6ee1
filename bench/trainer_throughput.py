"""Can the input pipeline feed the trainer? Loader images/s vs train-step images/s, per backbone.

The loader is measured alone (Parquet row groups -> JPEG decode -> batches, in worker processes);
the step alone (on one batch already on the device). The loader keeps the model busy when its
rate is >= 1.25x the step's. Needs a built dataset version.
Usage: .venv/bin/python bench/trainer_throughput.py --dataset faces@v1 [--root out/datasets]
       [--batch 32] [--steps 10] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from common import emit, header

from pipeline.bfm import load_bfm
from pipeline.device import pick_device
from pipeline.store.layout import Store, parse_ref, resolve_version
from trainer.config import DataConfig, ModelConfig, TrainConfig, TrainingConfig
from trainer.data import build_loader
from trainer.model import build_critic, build_model
from trainer.train import build_optimizers, set_train_mode, train_step


def loader_rate(cfg: TrainConfig, store: Store, version: int, batches: int) -> float:
    loader = iter(build_loader(cfg, store, version))
    next(loader)  # workers started, first batch decoded
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            n += len(next(loader)["face_id"])
        except StopIteration:
            break
    return n / (time.perf_counter() - start)


def step_rate(cfg: TrainConfig, store: Store, version: int, steps: int) -> float:
    device = pick_device(cfg.training.device)
    in_process = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    batch = next(iter(build_loader(in_process, store, version)))
    bfm = load_bfm(cfg.model.bfm_path, device=device)
    net = build_model(cfg).to(device)
    encoder, critic = (m.to(device) for m in build_critic(cfg))
    opt, opt_c = build_optimizers(cfg, net, encoder, critic)
    amp = cfg.training.amp and device.type == "cuda"

    def step():
        set_train_mode(net, cfg.model.bn_frozen)
        train_step(batch, net, encoder, critic, bfm, cfg, opt, opt_c, amp)

    step()  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(batch["face_id"]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", default="out/datasets")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    name, version = parse_ref(args.dataset)
    store = Store(args.root, name)
    version = resolve_version(store, version)
    result = {**header(), "dataset": f"{name}@v{version}", "batch": args.batch, "loader_workers": args.workers}
    for backbone in ("mobilenet", "resnet50"):
        data = DataConfig(root=args.root, dataset=f"{name}@v{version}", num_workers=args.workers)
        cfg = TrainConfig(data=data,
                          model=ModelConfig(backbone=backbone),
                          training=TrainingConfig(batch_size=args.batch, device=args.device))
        loader = loader_rate(cfg, store, version, batches=args.steps * 2)
        step = step_rate(cfg, store, version, args.steps)
        result.update({f"{backbone}_loader_images_per_s": loader, f"{backbone}_step_images_per_s": step,
                       f"{backbone}_loader_over_step": loader / step})
    emit(result, args.json)


if __name__ == "__main__":
    main()
