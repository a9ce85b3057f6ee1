"""3DDFA_V2's MobileNetV1 (width 0.5), layer names as in its checkpoint, so `mb05_120x120.pth` loads strictly.

Two heads share the pooled features: `fc_param` (62 whitened 3DMM params) and `fc_lm` (68 points
directly, 136 values). `forward` returns the params; `landmarks` the second head.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from pipeline.weights import verified_path


class DepthWiseBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_ch)
        self.conv_sep = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn_sep = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn_dw(self.conv_dw(x)))
        return self.relu(self.bn_sep(self.conv_sep(x)))


# (name, in, out, stride) at width 1.0; every channel count is scaled by the width factor.
_BLOCKS = [("dw2_1", 32, 64, 1), ("dw2_2", 64, 128, 2), ("dw3_1", 128, 128, 1), ("dw3_2", 128, 256, 2),
           ("dw4_1", 256, 256, 1), ("dw4_2", 256, 512, 2)] + [(f"dw5_{i}", 512, 512, 1) for i in range(1, 6)] + \
          [("dw5_6", 512, 1024, 2), ("dw6", 1024, 1024, 1)]


class MobileNetV1(nn.Module):
    def __init__(self, widen_factor: float = 0.5, num_params: int = 62, in_channels: int = 3):
        super().__init__()
        w = lambda c: int(c * widen_factor)  # noqa: E731
        self.conv1 = nn.Conv2d(in_channels, w(32), 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w(32))
        self.relu = nn.ReLU(inplace=True)
        for name, c_in, c_out, stride in _BLOCKS:
            self.add_module(name, DepthWiseBlock(w(c_in), w(c_out), stride))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc_param = nn.Linear(w(1024), num_params)
        self.fc_lm = nn.Linear(w(1024), 136)

    def features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name, *_ in _BLOCKS:
            x = getattr(self, name)(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_param(self.features(x))

    def landmarks(self, x: Tensor) -> Tensor:
        """The fc_lm head: [B, 68, 2] crop pixels (3DDFA_V2: out.reshape(2, 68) * 60 + 60, no y flip)."""
        out = self.fc_lm(self.features(x)).view(-1, 2, 68)
        return (out * 60 + 60).transpose(1, 2)


def load_teacher_mobilenet(weights: str | os.PathLike, in_channels: int = 3,
                           weights_sha256: str | None = None) -> MobileNetV1:
    """mb05_120x120.pth (sha256-checked) -> MobileNetV1; with in_channels=4 the extra input channel's
    filters are zero, so the network ignores a 4th channel and equals the teacher exactly."""
    path = verified_path(weights, weights_sha256, what="3DDFA_V2 mb05 weights")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
    net = MobileNetV1(widen_factor=0.5, in_channels=in_channels)
    if in_channels != 3:
        conv = state["conv1.weight"]
        extra = torch.zeros(conv.shape[0], in_channels - 3, *conv.shape[2:], dtype=conv.dtype)
        state["conv1.weight"] = torch.cat([conv, extra], dim=1)
    net.load_state_dict(state, strict=True)
    return net.eval()


def fused_for_inference(net: MobileNetV1) -> MobileNetV1:
    """A copy with every BatchNorm folded into the conv before it (eval-mode maths, same outputs up
    to float rounding): less time per forward on the CPU, for the labelling path (figures:
    docs/benchmarks.md, 'Labelling throughput: batched across images vs one image at a time').
    The trainer keeps the unfused network (its BN statistics stay frozen but present)."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(net).eval()
    pairs = [(fused, "conv1", "bn1")] + [(getattr(fused, name), conv, bn) for name, *_ in _BLOCKS
                                         for conv, bn in (("conv_dw", "bn_dw"), ("conv_sep", "bn_sep"))]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())
    return fused
