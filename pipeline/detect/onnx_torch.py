"""Run a small ONNX graph in PyTorch: the GPU path for the ONNX detectors (SCRFD, Peppa).

onnxruntime's GPU build is far too large to carry and onnx2torch drags in torchvision (unusable
beside the CPU torch here), so this executes the graph's nodes itself. It covers exactly the
operators of the shipped files (SCRFD-500M / 2.5G, Peppa slim-160, OpenSeeFace's optimised graph with
onnxruntime's FusedConv) and refuses any other by name;
tests check every output against onnxruntime. Batch size is free (the files fix batch 1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class UnsupportedGraph(ValueError):
    """The graph uses an operator or attribute this interpreter does not implement."""


def _attrs(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _pads(pads: list[int]) -> tuple[int, int]:
    """ONNX [top, left, bottom, right] -> torch's symmetric (h, w) padding; asymmetric is refused."""
    if not pads:
        return 0, 0
    top, left, bottom, right = pads
    if top != bottom or left != right:
        raise UnsupportedGraph(f"asymmetric padding {pads}")
    return top, left


class OnnxModule(nn.Module):
    """The graph's initializers as buffers, its nodes run in order. `forward(x)` returns the graph's
    outputs; `run(x, names)` returns any intermediate tensors by name."""

    OPS = {"Conv", "Relu", "Add", "Mul", "Sigmoid", "BatchNormalization", "ReduceMean", "Gemm", "Concat",
           "MaxPool", "AveragePool", "Resize", "Transpose", "Reshape", "Shape", "Gather", "Unsqueeze", "Slice",
           "Clip", "Div", "GlobalAveragePool", "FusedConv"}

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        graph = model.graph
        self._names: dict[str, str] = {}
        for i, init in enumerate(graph.initializer):
            self.register_buffer(f"w{i}", torch.from_numpy(numpy_helper.to_array(init).copy()))
            self._names[init.name] = f"w{i}"
        unknown = sorted({n.op_type for n in graph.node} - self.OPS)
        if unknown:
            raise UnsupportedGraph(f"{path}: operators {unknown} are not implemented")
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        self.input_name = next(i.name for i in graph.input if i.name not in self._names)
        self.output_names = [o.name for o in graph.output]

    def forward(self, x: Tensor) -> list[Tensor]:
        values = self.run(x, self.output_names)
        return [values[n] for n in self.output_names]

    def run(self, x: Tensor, wanted: list[str]) -> dict[str, object]:
        env: dict[str, object] = {self.input_name: x}
        missing = set(wanted)
        for op, inputs, outputs, attrs in self.nodes:
            if not missing:
                break
            args = [self._get(env, name) for name in inputs]
            env[outputs[0]] = self._op(op, args, attrs)
            missing.discard(outputs[0])
        return {n: env[n] for n in wanted}

    def _get(self, env: dict, name: str):
        if name == "":
            return None
        if name in env:
            return env[name]
        return getattr(self, self._names[name])

    @staticmethod
    def _op(op: str, a: list, at: dict):
        if op in ("Conv", "FusedConv"):
            if at.get("dilations", [1, 1]) != [1, 1] or at.get("auto_pad", "NOTSET") != "NOTSET":
                raise UnsupportedGraph(f"{op} {at}")
            y = F.conv2d(a[0], a[1], a[2] if len(a) > 2 else None, stride=tuple(at.get("strides", [1, 1])),
                         padding=_pads(at.get("pads", [])), groups=at.get("group", 1))
            return y if op == "Conv" else _activation(y, at.get("activation"), at.get("activation_params", []))
        if op == "Clip":
            return torch.clamp(a[0], min=a[1] if len(a) > 1 else None, max=a[2] if len(a) > 2 else None)
        if op == "Div":
            return a[0] / a[1]
        if op == "GlobalAveragePool":
            return a[0].mean(dim=(2, 3), keepdim=True)
        if op == "Relu":
            return F.relu(a[0])
        if op == "Sigmoid":
            return torch.sigmoid(a[0])
        if op == "Add":
            return a[0] + a[1]
        if op == "Mul":
            return a[0] * a[1]
        if op == "BatchNormalization":
            return F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0, at.get("epsilon", 1e-5))
        if op == "ReduceMean":
            return a[0].mean(dim=tuple(at["axes"]), keepdim=bool(at.get("keepdims", 1)))
        if op == "Gemm":
            x, w = a[0], a[1]
            w = w.t() if at.get("transB", 0) else w
            x = x.t() if at.get("transA", 0) else x
            return at.get("alpha", 1.0) * (x @ w) + (at.get("beta", 1.0) * a[2] if len(a) > 2 else 0)
        if op == "Concat":
            if any(isinstance(t, (list, tuple)) for t in a):  # shape arithmetic (constant parts are int tensors)
                return [int(v) for t in a for v in (t if isinstance(t, (list, tuple)) else t.tolist())]
            return torch.cat(a, dim=at["axis"])
        if op in ("MaxPool", "AveragePool"):
            kernel, stride = tuple(at["kernel_shape"]), tuple(at.get("strides", at["kernel_shape"]))
            pad = _pads(at.get("pads", []))
            if op == "MaxPool":
                return F.max_pool2d(a[0], kernel, stride, pad, ceil_mode=bool(at.get("ceil_mode", 0)))
            return F.avg_pool2d(a[0], kernel, stride, pad, ceil_mode=bool(at.get("ceil_mode", 0)),
                                count_include_pad=bool(at.get("count_include_pad", 0)))
        if op == "Resize" and at.get("mode") == "linear" and at.get("coordinate_transformation_mode") == "align_corners":
            sizes = a[3] if len(a) > 3 and a[3] is not None else None
            if sizes is None:
                raise UnsupportedGraph(f"Resize by scales {at}")
            return F.interpolate(a[0], size=[int(v) for v in list(sizes)[2:]], mode="bilinear", align_corners=True)
        if op == "Resize":
            if at.get("mode") != "nearest" or at.get("coordinate_transformation_mode") != "asymmetric" \
                    or at.get("nearest_mode", "round_prefer_floor") != "floor":
                raise UnsupportedGraph(f"Resize {at}")
            sizes = a[3] if len(a) > 3 and a[3] is not None else None
            if sizes is not None:
                return F.interpolate(a[0], size=[int(v) for v in list(sizes)[2:]], mode="nearest")
            scales = a[2].tolist()
            return F.interpolate(a[0], scale_factor=scales[2:], mode="nearest")
        if op == "Transpose":
            return a[0].permute(*at["perm"])
        if op == "Reshape":
            return a[0].reshape([int(v) for v in a[1].tolist()])
        # Shape arithmetic (SCRFD computes its upsampling sizes): plain Python lists of ints.
        if op == "Shape":
            return list(a[0].shape)
        if op == "Gather":
            index = int(a[1]) if not isinstance(a[1], Tensor) else int(a[1].item())
            return a[0][index]
        if op == "Unsqueeze":
            return [a[0]]
        if op == "Slice":
            start, end = int(a[1][0]), int(a[2][0])
            return list(a[0])[start:min(end, len(a[0]))]
        raise UnsupportedGraph(op)


def _activation(x: Tensor, name: str | None, params: list[float]) -> Tensor:
    """onnxruntime's FusedConv activations."""
    if name == "Relu":
        return F.relu(x)
    if name == "Clip":
        return torch.clamp(x, min=params[0], max=params[1])
    if name == "Sigmoid":
        return torch.sigmoid(x)
    if name == "HardSigmoid":
        return torch.clamp(params[0] * x + params[1], 0.0, 1.0)
    raise UnsupportedGraph(f"FusedConv activation {name!r}")


def head_tensors(module: OnnxModule) -> list[tuple[str, bool]]:
    """For each graph output, the tensor before its trailing Transpose/Reshape (/Sigmoid) chain, and
    whether a Sigmoid was on that chain: per-image [N, C, H, W] even with a batch (those reshapes
    fold the batch into rows); the caller applies the Sigmoid itself when flagged."""
    producer = {outputs[0]: (op, inputs) for op, inputs, outputs, _ in module.nodes}
    heads = []
    for name in module.output_names:
        sigmoid = False
        while name in producer and producer[name][0] in ("Transpose", "Reshape", "Sigmoid"):
            sigmoid |= producer[name][0] == "Sigmoid"
            name = producer[name][1][0]
        heads.append((name, sigmoid))
    return heads
