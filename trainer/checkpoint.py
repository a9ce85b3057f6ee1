"""Checkpoints (torch.save, weights_only-loadable, sha256 sidecar verified on load) and the Predictor.

`load_predictor('teacher' | path)` is the one way evaluation and rescoring get a model.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.device import pick_device
from pipeline.weights import verified_path

log = logging.getLogger(__name__)
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, has no sidecar, or does not match its recorded sha256."""


# ------------------------------------------------------------------------------- save / load


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write `state` atomically with torch.save and its sha256 to `<path>.sha256`; returns the digest.

    `state` must hold only tensors and plain Python containers/scalars (weights_only=True loads it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    # The sidecar is written after the checkpoint: a checkpoint without one is treated as incomplete.
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.with_name(sidecar.name + ".tmp").write_text(f"{digest}  {path.name}\n")
    os.replace(sidecar.with_name(sidecar.name + ".tmp"), sidecar)
    return digest


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The sha256 recorded beside `path`, after checking the file still matches it."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} has no {sidecar.name}: it was not written completely "
                              "(use an earlier checkpoint or retrain)")
    expected = sidecar.read_text().split()[0].lower()
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} fails its sha256 check (expected {expected[:12]}..., got "
                              f"{actual[:12]}...): the file is corrupt or was replaced")
    return actual


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify `path` against its sidecar, then torch.load(weights_only=True); adds the 'sha256' key."""
    digest = checkpoint_sha256(path)
    state = torch.load(path, map_location=map_location, weights_only=True)
    state["sha256"] = digest
    return state


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints (with a sidecar) in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _STEP_FILE.match(p.name)) and p.with_name(p.name + ".sha256").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for path in list_checkpoints(directory)[:-keep]:
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------- predictor


class Predictor:
    """A trained (or the teacher's) 2DASL model for inference: params, 2D points, critic scores.

    Inputs are numpy; outputs are numpy. Crops are RGB uint8 [B,120,120,3]; points are crop pixels.
    """

    def __init__(self, net, encoder, critic, bfm, sha256: str, device: torch.device, chunk: int = 256):
        self.net = net.eval()
        self.encoder = None if encoder is None else encoder.eval()
        self.critic = None if critic is None else critic.eval()
        self.bfm = bfm
        self.sha256 = sha256
        self.device = device
        self.chunk = chunk  # faces per forward pass; bounds memory for any input size

    @torch.inference_mode()
    def params(self, crops: np.ndarray, map_points_crop: np.ndarray) -> np.ndarray:
        """[B,120,120,3] RGB uint8 + [B,68,2] crop-px points (drawn into the map) -> [B,62] params."""
        crops, points = np.asarray(crops), np.asarray(map_points_crop, dtype=np.float32)
        if len(crops) != len(points):
            raise ValueError(f"crops ({len(crops)}) and map points ({len(points)}) differ in batch size")
        out = [np.zeros((0, 62), np.float32)]
        for i in range(0, len(crops), self.chunk):
            img = self.net.preprocess(crops[i:i + self.chunk], self.device)
            pts = torch.from_numpy(points[i:i + self.chunk]).to(self.device)
            out.append(self.net.predict(img, pts).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    @torch.inference_mode()
    def points(self, params: np.ndarray) -> np.ndarray:
        """[B,62] params -> [B,68,2] 2D landmarks in crop pixels (x, y of the BFM's 68 points)."""
        from pipeline.bfm import landmarks_3d

        p = torch.as_tensor(np.asarray(params, dtype=np.float32), device=self.device)
        return landmarks_3d(p, self.bfm)[..., :2].float().cpu().numpy()

    @torch.inference_mode()
    def read_labels(self, crops: np.ndarray, labels_crop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The student given each face's label: ([B,62] its params, [B,68,2] its 2D answer in crop px, [B] the
        self-critic's chance that the label is right). A student without a label reader answers with its
        params' projection; a 2DASL critic (on params, no label) scores the params; NaN without a critic."""
        from trainer.model import LabelCritic

        crops, labels = np.asarray(crops), np.asarray(labels_crop, dtype=np.float32)
        if len(crops) != len(labels):
            raise ValueError(f"crops ({len(crops)}) and labels ({len(labels)}) differ in batch size")
        params, points, scores = [np.zeros((0, 62), np.float32)], [np.zeros((0, 68, 2), np.float32)], []
        for i in range(0, len(crops), self.chunk):
            img = self.net.preprocess(crops[i:i + self.chunk], self.device)
            label = torch.from_numpy(labels[i:i + self.chunk]).to(self.device)
            out = self.net.run(img, label)
            answer = out.points if out.points is not None else self._project(out.params)
            params.append(out.params.float().cpu().numpy())
            points.append(answer.float().cpu().numpy())
            if isinstance(self.critic, LabelCritic):
                logit = self.critic(out.features, label, self._project(out.params_image), self._project(out.params))
                scores.append(torch.sigmoid(logit).float().cpu().numpy())
        params_np = np.concatenate(params).astype(np.float32)
        critic = (np.concatenate([np.zeros(0, np.float32), *scores]).astype(np.float32)
                  if isinstance(self.critic, LabelCritic) else self.critic_score(crops, params_np))
        return params_np, np.concatenate(points).astype(np.float32), critic

    def answer(self, crops: np.ndarray, labels_crop: np.ndarray) -> np.ndarray:
        """[B,68,2] crop px: the student's 2D answer given each face's label (its params' projection for a
        student without a label reader)."""
        return self.read_labels(crops, labels_crop)[1]

    def _project(self, params: torch.Tensor) -> torch.Tensor:
        from pipeline.bfm import landmarks_3d

        return landmarks_3d(params, self.bfm)[..., :2]

    @torch.inference_mode()
    def critic_score(self, crops: np.ndarray, params: np.ndarray) -> np.ndarray:
        """[B] sigmoid(D(E(crop), whitened params)) in [0, 1]; NaN without a critic (the teacher)."""
        from trainer.model import LabelCritic

        crops = np.asarray(crops)
        if isinstance(self.critic, LabelCritic):
            raise TypeError("this student's self-critic judges labels, not params: use read_labels(crops, labels)")
        if self.critic is None or self.encoder is None:
            return np.full(len(crops), np.nan, dtype=np.float32)
        params = np.asarray(params, dtype=np.float32)
        out = [np.zeros(0, np.float32)]
        for i in range(0, len(crops), self.chunk):
            img = self.net.preprocess(crops[i:i + self.chunk], self.device)
            p = self.net.whiten(torch.from_numpy(params[i:i + self.chunk]).to(self.device))
            out.append(torch.sigmoid(self.critic(self.encoder(img), p)).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def load_predictor(spec: str, device: str = "auto") -> Predictor:
    """'teacher' (the untrained 4-channel MobileNet = 3DDFA_V2 mb05) or a checkpoint path -> Predictor."""
    from pipeline.bfm import load_bfm
    from trainer.config import ModelConfig, TrainConfig
    from trainer.model import build_critic, build_model

    dev = pick_device(device)
    if spec == "teacher":
        # The image alone: exactly the teacher.
        cfg = TrainConfig(model=ModelConfig(backbone="mobilenet", map_fusion="early"))
        sha = verified_path(cfg.model.teacher_weights, what="teacher weights")  # refuses a tampered file
        from pipeline.weights import sha256_file

        net = build_model(cfg).to(dev)
        return Predictor(net, None, None, load_bfm(cfg.model.bfm_path, device=dev), sha256_file(sha), dev)
    state = load_checkpoint(spec)
    cfg = TrainConfig.from_checkpoint(state["config"])  # flat (before the per-concern split) or nested
    net = build_model(cfg)
    net.load_state_dict(state["model"])
    encoder, critic = build_critic(cfg)
    encoder.load_state_dict(state["encoder"])
    critic.load_state_dict(state["critic"])
    log.info("loaded %s (%s, step %d, sha256 %s...)", spec, cfg.model.backbone, state["step"],
             state["sha256"][:12])
    return Predictor(net.to(dev), encoder.to(dev), critic.to(dev), load_bfm(cfg.model.bfm_path, device=dev),
                     state["sha256"], dev)
