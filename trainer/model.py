"""The 2DASL networks: 4-channel regressor (image + landmark map -> 62 params), encoder E and critic D.

Backbones: 3DDFA_V2's MobileNetV1-0.5 (starts as the teacher) or 2DASL's ResNet-50 (random init).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.bfm import BFM, landmarks_3d, load_bfm, load_param_stats
from pipeline.crops import CROP_SIZE
from trainer.config import TrainConfig
from trainer.losses import face_size

N_PARAMS = 62


# ------------------------------------------------------------------------------- landmark maps


def map_points(points68: Tensor, which: str = "18") -> Tensor:
    """[..., 68, 2] -> the points drawn into the map: 2DASL's 18 stable points, or all 68."""
    if str(which) == "68":
        return points68
    if str(which) != "18":
        raise ValueError(f"map points {which!r}: expected '18' or '68'")
    from pipeline.landmarks import select_18

    return select_18(points68)


def landmark_map(points_crop: Tensor, size: int = CROP_SIZE, sigma: float = 0.0) -> Tensor:
    """[B, N, 2] crop px -> [B, 1, size, size].

    sigma 0: 2DASL's map (its code): +1 at floor(clip(p, 0, size-1)), -1 elsewhere. sigma > 0: a
    Gaussian blob of that std (px) at each point, peak 1, 0 elsewhere: a dense map whose filters learn
    from the points alone (on 2DASL's map, -1 on all but N pixels, their gradient is mostly a bias's).
    A point with a NaN coordinate is not drawn (a landmark the map does not give)."""
    pts = points_crop.detach().float()
    missing = ~torch.isfinite(pts).all(-1)  # [B, N]
    if sigma > 0:
        grid = torch.arange(size, device=pts.device, dtype=torch.float32)
        dx = grid[None, None, :] - torch.nan_to_num(pts[..., 0], nan=-1e4)[..., None]  # [B, N, size]
        dy = grid[None, None, :] - torch.nan_to_num(pts[..., 1], nan=-1e4)[..., None]
        gx, gy = torch.exp(-dx.square() / (2 * sigma**2)), torch.exp(-dy.square() / (2 * sigma**2))
        blobs = gy[..., :, None] * gx[..., None, :]  # [B, N, size, size], separable
        blobs = torch.where(missing[..., None, None], torch.zeros_like(blobs), blobs)
        return blobs.amax(1, keepdim=True) if pts.shape[1] else torch.zeros(pts.shape[0], 1, size, size,
                                                                               device=pts.device)
    pts = torch.nan_to_num(pts, nan=0.0).clamp(0, size - 1).floor().long()
    flat = pts[..., 1] * size + pts[..., 0]  # [B, N] (row = y, column = x)
    flat = torch.where(missing, size * size, flat)  # one spare cell, cut off below
    out = torch.full((pts.shape[0], size * size + 1), -1.0, device=pts.device)
    out.scatter_(1, flat, 1.0)
    return out[:, :size * size].reshape(-1, 1, size, size)


# ----------------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # stride here (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """2DASL's regressor: torchvision-layout ResNet-50, 4-channel conv1, layer4 stride 1, AvgPool2d(7, 2).

    At 120x120 the feature map is 8x8 after layer4 and 1x1 after the pool; fc 2048 -> 62 whitened params.
    """

    def __init__(self, in_channels: int = 4, num_outputs: int = N_PARAMS):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 64, 3, 1)
        self.layer2 = self._layer(256, 128, 4, 2)
        self.layer3 = self._layer(512, 256, 6, 2)
        self.layer4 = self._layer(1024, 512, 3, 1)
        self.avgpool = nn.AvgPool2d(7, stride=2)
        self.fc = nn.Linear(2048, num_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # No pretrained weights exist offline: start the output at the whitened mean (0) with a small
        # spread, so the first projections are a mean face inside the crop and the 2D losses start sane.
        nn.init.normal_(self.fc.weight, std=1e-3)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def _layer(in_ch: int, width: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(in_ch, width, stride)]
        layers += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


# ---------------------------------------------------------------------------------- regressor


# The width of each backbone's pooled features (what the label reader and the label critic read).
FEATURE_DIM = {"mobilenet": 512, "resnet50": 2048}


def _head(backbone: nn.Module) -> nn.Linear:
    """The backbone's params layer: MobileNetV1's fc_param (it also carries fc_lm) or ResNet-50's fc."""
    return backbone.fc_param if hasattr(backbone, "fc_param") else backbone.fc


RESIDUAL_UNIT = 0.03  # a label's residual enters the reader's gate and the critic in these units (of face size)


class LabelReader(nn.Module):
    """Late fusion of the label's 68 points: a trusted, regularised 3DMM fit of the label.

    From the image the backbone gives params w_img (whitened). The reader then takes `steps` Gauss-Newton
    steps of the weighted fit  min_d  sum_i c_i ||P(w + d)_i - label_i||^2 / size^2 + lambda ||d||^2 ,
    P the BFM projection of the 68 points; the per-point trust c_i in (0, 1) is what it learns, from the
    image's pooled features and the label's residual against the current fit. lambda (learned) keeps
    the fit near the image's own estimate where trust is low; a missing point (NaN) has trust 0.

    Why late and analytic: the early 4th channel starts at zero filters and a few hundred CPU steps at a
    fine-tuning learning rate never make it matter (docs/rounds.md), while here the fit reads the label
    from step 0 and training has only to learn *where to trust it*, a 68-way gate rather than a new
    input for the whole network.
    """

    def __init__(self, feat_dim: int, bfm_path: str, param_mean: Tensor, param_std: Tensor, steps: int = 2,
                 hidden: int = 256):
        super().__init__()
        bfm = load_bfm(bfm_path)
        # Loaded from the BFM file at build time, not stored in checkpoints (the file is sha256-checked).
        self.register_buffer("u", bfm.u, persistent=False)
        self.register_buffer("w_shp", bfm.w_shp, persistent=False)
        self.register_buffer("w_exp", bfm.w_exp, persistent=False)
        self.register_buffer("mean", torch.as_tensor(param_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.as_tensor(param_std, dtype=torch.float32), persistent=False)
        self.steps = int(steps)
        # The features are normalised and the residuals put in units of RESIDUAL_UNIT of the face size,
        # so both reach the gate at order 1 (raw, the features' scale drowns residuals of ~0.02).
        self.norm = nn.LayerNorm(feat_dim)
        self.trust = nn.Sequential(nn.Linear(feat_dim + 68 * 7, hidden), nn.ReLU(inplace=True),
                                   nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 68))
        nn.init.zeros_(self.trust[-1].weight)
        nn.init.constant_(self.trust[-1].bias, 0.0)  # trust 0.5 everywhere at step 0
        self.log_prior = nn.Parameter(torch.tensor(-3.0))  # lambda = e^-3 ~ 0.05 (normalised units)

    def project(self, w: Tensor) -> Tensor:
        """Whitened [B, 62] -> [B, 68, 2] crop px (pipeline.bfm.landmarks_3d)."""
        return landmarks_3d(w * self.std + self.mean, BFM(self.u, self.w_shp, self.w_exp))[..., :2]

    def jacobian(self, w: Tensor) -> Tensor:
        """d project / d w, analytic: [B, 68, 2, 62] (x is linear in pose row 0, y in row 1; both
        bilinear in the pose and the shape / expression coefficients)."""
        p = w * self.std + self.mean
        pose = p[:, :12].view(-1, 3, 4)
        w_shp, w_exp = self.w_shp.view(68, 3, -1), self.w_exp.view(68, 3, -1)  # xyz interleaved per point
        v = (self.u + p[:, 12:52] @ self.w_shp.T + p[:, 52:62] @ self.w_exp.T).view(-1, 68, 3)
        b = w.shape[0]
        jac = w.new_zeros(b, 68, 2, 62)
        jac[:, :, 0, 0:3] = v
        jac[:, :, 0, 3] = 1.0
        jac[:, :, 1, 4:7] = -v
        jac[:, :, 1, 7] = -1.0
        for row, sign in ((0, 1.0), (1, -1.0)):
            jac[:, :, row, 12:52] = sign * torch.einsum("bd,pdk->bpk", pose[:, row, :3], w_shp)
            jac[:, :, row, 52:62] = sign * torch.einsum("bd,pdk->bpk", pose[:, row, :3], w_exp)
        return jac * self.std

    def forward(self, w_img: Tensor, features: Tensor, points68: Tensor) -> tuple[Tensor, Tensor]:
        """(whitened params of the fit [B, 62], the per-point trust of every step [B, steps, 68])."""
        present = torch.isfinite(points68).all(-1)  # [B, 68]
        label = torch.nan_to_num(points68.float(), nan=0.0)
        w_img = w_img.float()
        fit_img = self.project(w_img)
        size = face_size(fit_img)[:, None, None]
        # The label against the image's own opinion: the same reference at every step, so a label the
        # fit has already moved toward still shows how far it is from what the image says.
        from_image = (label - fit_img) / size * present[..., None] / RESIDUAL_UNIT
        features = self.norm(features.detach().float())
        prior = torch.exp(self.log_prior)
        w, trusts = w_img, []
        for _ in range(self.steps):
            fit = self.project(w)
            residual = (label - fit) / size * present[..., None]  # [B, 68, 2], normalised
            scaled = residual / RESIDUAL_UNIT
            gate_in = [features, from_image.flatten(1), from_image.norm(dim=-1), scaled.flatten(1),
                       scaled.norm(dim=-1), present.float()]
            c = torch.sigmoid(self.trust(torch.cat(gate_in, 1))) * present
            trusts.append(c)
            jac = (self.jacobian(w) / size[..., None]).flatten(1, 2)  # [B, 136, 62]
            cw = c.repeat_interleave(2, dim=1)[..., None]  # [B, 136, 1]
            # Gauss-Newton on  sum_i c_i |P(w)_i - label_i|^2 + prior |w - w_img|^2
            lhs = jac.transpose(1, 2) @ (cw * jac) + prior * torch.eye(62, device=w.device)
            rhs = jac.transpose(1, 2) @ (cw * residual.flatten(1)[..., None]) - prior * (w - w_img)[..., None]
            w = w + torch.linalg.solve(lhs, rhs).squeeze(-1)
        return w, torch.stack(trusts, 1)


def corrected_label(label: Tensor, fit: Tensor, trust: Tensor) -> Tensor:
    """The student's answer in 2D: each given point kept where it is trusted and moved to the fit where it
    is not (label + (1 - trust) (fit - label)); an absent point is the fit's. The fit alone (a 3DMM
    projection) cannot follow a good 2D label's every detail, so a trusted point stays the label's."""
    given = torch.isfinite(label).all(-1, keepdim=True)
    c = trust[..., None]
    return torch.where(given, torch.nan_to_num(label) + (1 - c) * (fit - torch.nan_to_num(label)), fit)


@dataclass
class StudentOutput:
    params: Tensor  # [B, 62] de-whitened: the student's answer (the label read and corrected)
    params_image: Tensor  # [B, 62] de-whitened: the image's own estimate, before the label is read
    features: Tensor  # [B, F] the backbone's pooled features
    trust: Tensor | None = None  # [B, steps, 68] the reader's trust in each point of the label, per step
    points: Tensor | None = None  # [B, 68, 2] crop px: the label corrected (late fusion; see TwoDASLNet.run)


class TwoDASLNet(nn.Module):
    """F(I, label) -> 62 de-whitened 3DMM params in the crop frame; the backbone predicts whitened ones.

    The label enters twice: drawn into 2DASL's 4th channel (early fusion, `map_points` of it) and, with a
    `reader` (late fusion), as its 68 points fitted under a learned per-point trust (`LabelReader`)."""

    def __init__(self, backbone: nn.Module, param_mean: np.ndarray | Tensor, param_std: np.ndarray | Tensor,
                 map_points: str = "18", map_scale: float = 1.0, map_sigma: float = 0.0,
                 reader: LabelReader | None = None):
        super().__init__()
        self.backbone = backbone
        self.map_points = str(map_points)
        self.map_scale = float(map_scale)
        self.map_sigma = float(map_sigma)
        self.reader = reader
        self.register_buffer("param_mean", torch.as_tensor(np.asarray(param_mean), dtype=torch.float32))
        self.register_buffer("param_std", torch.as_tensor(np.asarray(param_std), dtype=torch.float32))

    def run(self, img_norm: Tensor, points68: Tensor) -> StudentOutput:
        """Every output of one pass: crops (preprocessed) and the label's 68 crop-px points (NaN: absent)."""
        drawn = self.draw_map(map_points(points68, self.map_points))
        x = torch.cat([img_norm, drawn.to(img_norm.dtype) * self.map_scale], dim=1)
        features = self.backbone.features(x.contiguous(memory_format=torch.channels_last))
        w_img = _head(self.backbone)(features).float()
        if self.reader is None:
            return StudentOutput(self.dewhiten(w_img), self.dewhiten(w_img), features.float())
        w, trust, points = self.read_label(w_img, features, points68)
        return StudentOutput(self.dewhiten(w), self.dewhiten(w_img), features.float(), trust, points)

    def read_label(self, w_img: Tensor, features: Tensor, points68: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The label reader on the image's estimate (whitened) and features: (whitened params of the fit,
        the trust of every step [B, steps, 68], the 2D answer [B, 68, 2] crop px)."""
        label = points68.to(w_img.device).float()
        w, trust = self.reader(w_img, features, label)
        return w, trust, corrected_label(label, self.reader.project(w), trust[:, -1])

    def forward(self, img_norm: Tensor, points68: Tensor) -> Tensor:
        return self.run(img_norm, points68).params

    def whiten(self, params: Tensor) -> Tensor:
        return (params.float() - self.param_mean) / self.param_std

    def dewhiten(self, params_whitened: Tensor) -> Tensor:
        return params_whitened.float() * self.param_std + self.param_mean

    def predict(self, img_norm: Tensor, points68: Tensor) -> Tensor:
        """Params from an image and its 68 crop-px points."""
        return self(img_norm, points68)

    def draw_map(self, points: Tensor) -> Tensor:
        """The 4th channel for points already selected ([B, N, 2] crop px; NaN = not drawn)."""
        return landmark_map(points, sigma=self.map_sigma)

    @staticmethod
    def preprocess(crops_rgb_uint8: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
        """RGB uint8 crops [B,120,120,3] (numpy or tensor) or [B,3,120,120] tensor -> BGR (x-127.5)/128.

        The teacher (3DDFA_V2) was trained on cv2's BGR order with this normalisation.
        """
        x = torch.as_tensor(np.ascontiguousarray(crops_rgb_uint8)) if isinstance(crops_rgb_uint8, np.ndarray) \
            else crops_rgb_uint8
        if device is not None:
            x = x.to(device, non_blocking=True)
        if x.dim() != 4:
            raise ValueError(f"crops: expected a batch [B,120,120,3] or [B,3,120,120], got shape {tuple(x.shape)}")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        return (x.flip(1).float() - 127.5) / 128.0


def build_backbone(name: str, teacher_weights: str | None = None) -> nn.Module:
    """'mobilenet': the teacher's MobileNetV1-0.5 with a zero-filter 4th input channel; 'resnet50': random."""
    if name == "mobilenet":
        from pipeline.mobilenet import load_teacher_mobilenet

        if teacher_weights is None:
            raise ValueError("backbone 'mobilenet' needs teacher_weights (mb05_120x120.pth)")
        return load_teacher_mobilenet(teacher_weights, in_channels=4)
    if name == "resnet50":
        return ResNet50(in_channels=4)
    raise ValueError(f"backbone {name!r}: expected 'mobilenet' or 'resnet50'")


# ------------------------------------------------------------------------------ critic side


class Encoder(nn.Module):
    """2DASL's E: 6 x (3x3 conv + ReLU + 2x2 max-pool), 120 -> 1 px, image -> latent z [B, z_dim]."""

    def __init__(self, width: int = 32, in_channels: int = 3):
        super().__init__()
        chans = [in_channels] + [width * min(2**i, 8) for i in range(6)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*layers)
        self.z_dim = chans[-1]

    def forward(self, img_norm: Tensor) -> Tensor:
        return torch.flatten(self.net(img_norm), 1)  # 120 -> 60 -> 30 -> 15 -> 7 -> 3 -> 1


class Critic(nn.Module):
    """2DASL's D: FC 512-1024-1024-1 on concat(z, whitened params) -> a logit (sigmoid = consistency)."""

    def __init__(self, z_dim: int, n_params: int = N_PARAMS):
        super().__init__()
        dims = [z_dim + n_params, 512, 1024, 1024]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.LeakyReLU(0.2, inplace=True)]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], 1))

    def forward(self, z: Tensor, params_whitened: Tensor) -> Tensor:
        return self.net(torch.cat([z, params_whitened.to(z.dtype)], dim=1)).squeeze(1)


class LabelCritic(nn.Module):
    """The self-critic that judges a label: (the student's features, the label) -> a logit, sigmoid =
    the chance the label is right.

    It reads the label through what the student made of it: the label's residual against the image's
    own estimate and against the student's corrected answer (both / face size), and which points are
    present. Trained on pairs whose negatives are wrong labels (other landmarkers' points, corruptions),
    so its output is a per-face score of the label (2DASL's critic saw only the model's own params).
    The features are detached: the critic judges, it does not train the regressor."""

    def __init__(self, feat_dim: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(feat_dim)
        self.net = nn.Sequential(nn.Linear(feat_dim + 68 * 7, hidden), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 1))

    def forward(self, features: Tensor, label: Tensor, image_points: Tensor, answer_points: Tensor) -> Tensor:
        present = torch.isfinite(label).all(-1)
        lab = torch.nan_to_num(label.float(), nan=0.0)
        size = face_size(image_points)[:, None, None]
        r_img = (lab - image_points.detach()) / size * present[..., None] / RESIDUAL_UNIT
        r_out = (lab - answer_points.detach()) / size * present[..., None] / RESIDUAL_UNIT
        x = torch.cat([self.norm(features.detach().float()), r_img.flatten(1), r_out.flatten(1),
                       r_img.norm(dim=-1), r_out.norm(dim=-1), present.float()], 1)
        return self.net(x).squeeze(1)


# ------------------------------------------------------------------------------------ building


def build_model(cfg: TrainConfig) -> TwoDASLNet:
    mean, std = load_param_stats(cfg.model.param_stats_path)
    backbone = build_backbone(cfg.model.backbone, cfg.model.teacher_weights)
    reader = None
    if cfg.model.map_fusion == "late":
        reader = LabelReader(FEATURE_DIM[cfg.model.backbone], cfg.model.bfm_path, torch.as_tensor(mean),
                             torch.as_tensor(std), steps=cfg.model.reader_steps)
    net = TwoDASLNet(backbone, mean, std, cfg.model.map_points, cfg.model.map_scale, cfg.model.map_sigma,
                     reader=reader)
    return net.to(memory_format=torch.channels_last)


def build_critic(cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(E, D). Late fusion: the label critic reads the student's own features, so E has nothing to do
    (an empty module keeps the checkpoint layout); early: 2DASL's E and D on params."""
    if cfg.model.map_fusion == "late":
        return nn.Identity(), LabelCritic(FEATURE_DIM[cfg.model.backbone])
    encoder = Encoder(width=cfg.model.encoder_width)
    return encoder, Critic(encoder.z_dim)
