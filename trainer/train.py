"""The 2DASL training loop on a dataset version: two passes of F per batch, every loss, critic updates.

Checkpoints hold everything a resume needs (models, optimisers, data position, RNG states); resume is exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.bfm import landmarks_3d, load_bfm
from pipeline.store.layout import Store, parse_ref, resolve_version
from trainer import losses
from trainer.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import batches_per_epoch, build_loader, count_train_rows
from trainer.distributed import World
from trainer.model import TwoDASLNet, build_critic, build_model, map_points

log = logging.getLogger(__name__)
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    checkpoint: str  # the last checkpoint written
    steps: int  # optimiser steps done in total (including before a resume)
    epochs: int  # completed passes over the data
    final_losses: dict[str, float] = field(default_factory=dict)  # the last step's loss terms
    log_path: str = ""


# ------------------------------------------------------------------------------------ building


def build_optimizers(cfg: TrainConfig, net: TwoDASLNet, encoder: torch.nn.Module,
                     critic: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for the regressor: the backbone at the fine-tuning rate, the label reader (new, small) at its
    own; Adam with beta1 0.5 for the critic side, the usual GAN setting (the critic's target moves as F
    trains). Each regressor group keeps its `base_lr`, which the schedule scales; the critic's is constant."""
    reader = [p for n, p in net.named_parameters() if n.startswith("reader.")]
    rest = [p for n, p in net.named_parameters() if not n.startswith("reader.")]
    groups = [{"params": rest, "lr": cfg.optimizer.lr, "base_lr": cfg.optimizer.lr}]
    if reader:
        groups.append({"params": reader, "lr": cfg.optimizer.reader_lr, "base_lr": cfg.optimizer.reader_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    critic_lr = cfg.optimizer.reader_lr if cfg.model.map_fusion == "late" else cfg.optimizer.critic_lr
    opt_critic = torch.optim.Adam(list(encoder.parameters()) + list(critic.parameters()), lr=critic_lr,
                                  betas=(0.5, 0.999))
    return opt, opt_critic


def set_train_mode(net: TwoDASLNet, bn_frozen: bool) -> None:
    """Train mode, but BN layers in eval when frozen: small fine-tuning batches would otherwise
    replace the teacher's running statistics (and step 0 would no longer equal the teacher)."""
    net.train()
    if bn_frozen:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Every RNG as tensors / lists, so the checkpoint loads with torch.load(weights_only=True)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": [py_version, list(py_internal), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up then constant or cosine-to-zero; a function of the step so resumes need no state."""
    warmup = cfg.optimizer.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.optimizer.lr_schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(device: torch.device, enabled: bool):
    # bf16 only on CUDA: CPU bf16 autocast is slow on most CPUs and the tests want fp32 exactness.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------- one step


def compute_losses(batch: dict[str, Any], net: TwoDASLNet, encoder: torch.nn.Module, critic: torch.nn.Module,
                   bfm, cfg: TrainConfig, amp: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """2DASL's iteration on one batch -> (generator total, critic loss or None, every term as floats)."""
    device = net.param_mean.device
    img = net.preprocess(batch["img"], device)
    pseudo = batch["points"].to(device)  # [B, 68, 2] the face's best label (the target), crop px
    weight = batch["weight"].to(device)
    trusted = batch["has_params"].to(device)
    params_ref = batch["params"].to(device)
    teacher = batch["teacher_params"].to(device)
    given = batch["map_points"].to(device)  # [B, 68, 2] the label the student is given (NaN: absent)
    to_points = partial(landmarks_3d, bfm=bfm)
    which = cfg.model.map_points

    # Pass 1: α̂ = F(I, X_given); Y_2d = Proj(α̂).  BFM maths and losses stay fp32 (outside autocast).
    # The given label may be noisy, another landmarker's or corrupted (trainer.augment.choose_map); every
    # term compares with the face's best label, so the student learns to correct what it is given.
    x2d = map_points(pseudo, which)
    with _autocast(device, amp):
        out_1 = net.run(img, given)
    params_1 = out_1.params
    lmk3d_1 = to_points(params_1)  # [B, 68, 3]
    y2d = lmk3d_1[..., :2]
    # Pass 2: α̃ = F(I, Y_2d) on the same image: the student's answer given back to it as its label.
    with _autocast(device, amp):
        params_2 = net(img, y2d.detach())
    lmk3d_2 = to_points(params_2)
    late = net.reader is not None
    image_points = to_points(out_1.params_image)[..., :2]

    terms: dict[str, torch.Tensor] = {
        "lmk2d": losses.landmark_2d_loss(y2d, pseudo, weight),
        "con2d": losses.consistency_2d_loss(x2d, map_points(y2d, which), face_weight=weight),
        "con3d": losses.consistency_3d_loss(lmk3d_1, lmk3d_2),
        "cyc": losses.cycle_loss(x2d, map_points(lmk3d_2[..., :2], which), face_weight=weight),
        "params": losses.wpdc_loss(params_1[trusted], params_ref[trusted], net.param_std, to_points),
        # Late fusion: the anchor holds the image's own estimate near the teacher; the reader is free.
        "anchor": losses.anchor_loss(net.whiten((out_1.params_image if late else params_1)[~trusted]),
                                     net.whiten(teacher[~trusted])),
    }
    if late:
        terms["image"] = losses.landmark_2d_loss(image_points, pseudo, weight)
        # The gate learns directly which of the given points are right (within TRUST_GOOD of the best
        # label): a dense signal, 68 per face, beside the one through the fit.
        terms["trust"] = losses.trust_loss(out_1.trust, given, pseudo)
        # The 2D answer (each given point kept or moved to the fit, by its trust) vs the best label.
        terms["answer"] = losses.landmark_2d_loss(out_1.points, pseudo, weight)

    loss_d = None
    terms["critic_g"] = params_1.sum() * 0.0
    if late:
        loss_d = _read_more_labels(batch, net, critic, cfg, out_1, given, image_points, y2d, terms)
    elif cfg.loss.critic > 0:
        # 2DASL's self-critic. Real pairs: (E(J), α*) for rows with trusted params; without any in the
        # batch the teacher's params stand in as "real" (D judges drift from the teacher's labelling).
        # Fake pairs: (E(I), α̂) for the other rows (all rows if none).
        has_teacher = batch["has_teacher"].to(device)
        real_rows, real_params = (trusted, params_ref) if bool(trusted.any()) else (has_teacher, teacher)
        fake_rows = ~trusted if bool((~trusted).any()) else torch.ones_like(trusted)
        if bool(real_rows.any()):
            with _autocast(device, amp):
                z = encoder(img)  # once for the batch: real and fake rows often are the same images
                d_real = critic(z[real_rows], net.whiten(real_params[real_rows]))
                d_fake = critic(z[fake_rows], net.whiten(params_1[fake_rows]))
            loss_d, terms["critic_g"] = losses.critic_losses(d_real.float(), d_fake.float())

    weights = cfg.loss.weights()
    total = sum(weights["critic" if k == "critic_g" else k] * v for k, v in terms.items())
    logged = {k: float(v.detach()) for k, v in terms.items()}
    logged["total"] = float(total.detach())
    if loss_d is not None:
        logged["critic_d"] = float(loss_d.detach())
    return total, loss_d, logged


def _read_more_labels(batch: dict[str, Any], net: TwoDASLNet, critic: torch.nn.Module, cfg: TrainConfig,
                      out_1, given: torch.Tensor, image_points: torch.Tensor, answer_points: torch.Tensor,
                      terms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Late fusion: the reader on the batch's extra labels (`map_extra`, read on the same detached
    features, so the reader's and the critic's examples multiply and the backbone's pass does not: the
    `extra` term), and the label critic's loss on every (image, label) pair of the batch (or None)."""
    device = given.device
    pseudo, weight = batch["points"].to(device), batch["weight"].to(device)
    judged = [(out_1.features, given, image_points, answer_points, batch["map_nme"].to(device))]
    extra = batch.get("map_extra")
    if extra is not None and extra.shape[1] > 0:
        k = extra.shape[1]
        given_k = extra.to(device).flatten(0, 1)
        feats_k = out_1.features.detach().repeat_interleave(k, 0)
        w_img_k = net.whiten(out_1.params_image).detach().repeat_interleave(k, 0)
        w_k, trust_k, answer_k = net.read_label(w_img_k, feats_k, given_k)
        fit_k = net.reader.project(w_k)
        target_k, weight_k = pseudo.repeat_interleave(k, 0), weight.repeat_interleave(k, 0)
        terms["extra"] = (losses.landmark_2d_loss(answer_k, target_k, weight_k)
                          + cfg.loss.trust * losses.trust_loss(trust_k, given_k, target_k))
        judged.append((feats_k, given_k, image_points.repeat_interleave(k, 0), fit_k,
                       batch["map_extra_nme"].to(device).flatten()))
    # The label critic: (image, given label) pairs, real when the label is close to the best one.
    # Not adversarial: it judges labels and does not train the regressor (its inputs are detached).
    feats, labels, image_pts, answers, nme = (torch.cat(parts) for parts in zip(*judged))
    target = losses.label_goodness(nme)
    rows = torch.isfinite(target)
    if not bool(rows.any()):
        return None
    return losses.label_critic_loss(critic(feats[rows], labels[rows], image_pts[rows], answers[rows]), target[rows])


def train_step(batch: dict[str, Any], net: TwoDASLNet, encoder: torch.nn.Module, critic: torch.nn.Module, bfm,
               cfg: TrainConfig, opt: torch.optim.Optimizer, opt_critic: torch.optim.Optimizer,
               amp: bool, world: World | None = None) -> dict[str, float]:
    """One forward, two backward passes restricted with `inputs=`: the total trains F only, loss_D
    trains E and D only; then the critic steps and the regressor steps (alternating D / G updates).
    With several processes (`world`), gradients are averaged across them before each step."""
    world = world or World()
    total, loss_d, logged = compute_losses(batch, net, encoder, critic, bfm, cfg, amp)
    net_params = [p for p in net.parameters() if p.requires_grad]
    critic_params = list(encoder.parameters()) + list(critic.parameters())
    opt.zero_grad(set_to_none=True)
    opt_critic.zero_grad(set_to_none=True)
    total.backward(inputs=net_params, retain_graph=loss_d is not None)
    if loss_d is not None:
        loss_d.backward(inputs=critic_params)
    # The critic steps when any rank had real pairs (a rank without them contributes zero gradient).
    if world.any(loss_d is not None, total.device):
        world.average_gradients(critic_params)
        opt_critic.step()
    world.average_gradients(net_params)
    if cfg.optimizer.grad_clip > 0:
        logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(net_params, cfg.optimizer.grad_clip))
    opt.step()
    return logged


# ----------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> TrainResult:
    """Train on `cfg.data.dataset` for `cfg.training.max_steps` steps (or `cfg.training.epochs` passes);
    returns the last checkpoint."""
    world = World.from_env(cfg.training.device)
    result = _train(cfg, world)
    # Not in a `finally`: after an error a peer may still wait in a collective, and tearing the group
    # down under it hangs both (pytorch/torchtitan#1342); the failed process's exit ends the run instead.
    world.close()
    return result


@dataclass
class _Run:
    """What a training run carries from step to step: the models, their optimisers and the data position."""

    net: TwoDASLNet
    encoder: torch.nn.Module
    critic: torch.nn.Module
    opt: torch.optim.Optimizer
    opt_critic: torch.optim.Optimizer
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def _resume(run: _Run, ckpt_dir: Path, world: World) -> str:
    """Load the newest checkpoint of `ckpt_dir` into `run`, exactly (models, optimisers, position, RNGs);
    returns its path ("" when there is none)."""
    found = latest_checkpoint(ckpt_dir)
    if found is None:
        return ""
    state = load_checkpoint(found)
    run.net.load_state_dict(state["model"])
    run.encoder.load_state_dict(state["encoder"])
    run.critic.load_state_dict(state["critic"])
    run.opt.load_state_dict(state["optimizer"])
    run.opt_critic.load_state_dict(state["critic_optimizer"])
    run.step, run.epoch, run.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    if world.enabled:  # each rank continues its own shard where it stopped
        if state.get("world_size", 1) != world.size:
            raise ValueError(f"checkpoint {found} was written by {state.get('world_size', 1)} processes; "
                             f"resume it with as many (got {world.size})")
        run.epoch, run.batch_in_epoch = state["positions"][world.rank]
    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d (epoch %d, batch %d)", found, run.step, run.epoch, run.batch_in_epoch)
    return str(found)


def _save(run: _Run, cfg: TrainConfig, ckpt_dir: Path, world: World, dataset: dict) -> str:
    """Write the run's checkpoint (rank 0; the others wait for it) and prune old ones; returns its path."""
    path = ckpt_dir / f"step-{run.step:07d}.pt"
    positions = world.gather((run.epoch, run.batch_in_epoch))  # every rank, since each reads its own shard
    world.check_in_sync(run.net, run.encoder, run.critic)
    if not world.is_main:
        world.barrier()  # rank 0 writes; the others wait until the file is there
        return str(path)
    save_checkpoint(path, {
        "world_size": world.size, "positions": positions,
        "model": run.net.state_dict(), "encoder": run.encoder.state_dict(), "critic": run.critic.state_dict(),
        "optimizer": run.opt.state_dict(), "critic_optimizer": run.opt_critic.state_dict(),
        "step": run.step, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch, "rng": rng_state(),
        "config": cfg.to_dict(), "dataset": dataset,
    })
    prune_checkpoints(ckpt_dir, cfg.checkpoint.keep)
    world.barrier()
    return str(path)


def _train(cfg: TrainConfig, world: World) -> TrainResult:
    # The same seed on every rank: the same initial weights (broadcast too).
    seed_everything(cfg.training.seed)
    device = world.device(cfg.training.device)
    amp = cfg.training.amp and device.type == "cuda"
    name, wanted = parse_ref(cfg.data.dataset)
    store = Store(cfg.data.root, name)
    version = resolve_version(store, wanted)
    n_rows = count_train_rows(store, version, cfg.data.holdout())
    if n_rows == 0:
        raise ValueError(f"{name}@v{version}: no training faces (split 'train', keep, weight > 0)")
    per_epoch = batches_per_epoch(n_rows, cfg.training.batch_size * world.size)
    total_steps = cfg.training.max_steps if cfg.training.max_steps > 0 else cfg.training.epochs * per_epoch

    bfm = load_bfm(cfg.model.bfm_path, device=device)
    net = build_model(cfg).to(device)
    encoder, critic = (m.to(device) for m in build_critic(cfg))
    run = _Run(net, encoder, critic, *build_optimizers(cfg, net, encoder, critic))
    world.broadcast(net, encoder, critic)

    ckpt_dir = Path(cfg.checkpoint.dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last_ckpt = _resume(run, ckpt_dir, world) if cfg.checkpoint.resume else ""
    log_path = ckpt_dir / LOG_FILE
    if world.is_main:
        _truncate_log(log_path, run.step)  # steps past the checkpoint were lost with the crash: redo them
    dataset = {"root": cfg.data.root, "name": name, "version": version}

    log.info("training %s on %s@v%d: %d faces, %d steps, device %s%s", cfg.model.backbone, name, version,
             n_rows, total_steps, device, " (bf16)" if amp else "")
    last: dict[str, float] = {}
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[msg]}"),
                        TimeRemainingColumn(), disable=not sys.stderr.isatty() or not world.is_main)
    with progress, open(log_path if world.is_main else os.devnull, "a") as log_file:
        task = progress.add_task("train", total=total_steps, completed=run.step, msg="")
        while run.step < total_steps:
            loader = build_loader(cfg, store, version, epoch=run.epoch, skip_batches=run.batch_in_epoch,
                                  rank=world.rank, world_size=world.size)
            for batch in loader:
                factor = lr_factor(cfg, run.step, total_steps)
                for group in run.opt.param_groups:
                    group["lr"] = group.get("base_lr", cfg.optimizer.lr) * factor
                set_train_mode(net, cfg.model.bn_frozen)
                encoder.train()
                critic.train()
                started = time.perf_counter()
                last = train_step(batch, net, encoder, critic, bfm, cfg, run.opt, run.opt_critic, amp, world)
                run.step += 1
                run.batch_in_epoch += 1
                record = {"step": run.step, "epoch": run.epoch, "lr": run.opt.param_groups[0]["lr"],
                          "batch": len(batch["face_id"]), "sec": round(time.perf_counter() - started, 4), **last}
                log_file.write(json.dumps(record) + "\n")
                progress.update(task, advance=1, msg=f"loss {last['total']:.4f}")
                if run.step % cfg.checkpoint.log_every == 0 or run.step == total_steps:
                    log.info("step %d: %s", run.step, " ".join(f"{k}={v:.4g}" for k, v in last.items()))
                if run.step % cfg.checkpoint.every == 0 and run.step < total_steps:
                    log_file.flush()
                    last_ckpt = _save(run, cfg, ckpt_dir, world, dataset)
                if run.step >= total_steps:
                    break
            else:
                run.epoch += 1
                run.batch_in_epoch = 0
        log_file.flush()
    if not last_ckpt or not last_ckpt.endswith(f"step-{run.step:07d}.pt"):
        last_ckpt = _save(run, cfg, ckpt_dir, world, dataset)
    return TrainResult(checkpoint=last_ckpt, steps=run.step, epochs=run.epoch, final_losses=last,
                       log_path=str(log_path))


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
