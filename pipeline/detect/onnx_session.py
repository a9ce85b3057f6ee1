"""onnxruntime sessions for the detectors: CUDA when the device asks for it and ORT has it, quiet logs."""

from __future__ import annotations

import threading

import torch

# torch.onnx.export keeps its state in process globals (GLOBALS.in_onnx_export): two exports at once,
# as two batch threads loading their chains side by side, fail with "in_onnx_export must be False".
_EXPORT_LOCK = threading.Lock()


def resolve_backend(option: str, device: torch.device) -> str:
    """'auto' -> 'torch' on CUDA (onnxruntime's GPU build is not available), 'onnxruntime' on CPU."""
    if option != "auto":
        return option
    return "torch" if device.type == "cuda" else "onnxruntime"


def providers_for(device: torch.device) -> list[str]:
    import onnxruntime as ort  # here, not at import: the torch backends run without it

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_graph(net: torch.nn.Module, example: torch.Tensor) -> bytes:
    """A torch network as an ONNX graph in memory, its batch axis free: ONNX Runtime runs the small
    convolutional networks of the chain faster on CPU than torch does (docs/benchmarks.md), from the
    same weights. The input is named `x`. TorchScript's exporter: the newer one needs onnxscript."""
    import io
    import warnings

    buffer = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based export"
        torch.onnx.export(net.eval(), example, buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    return buffer.getvalue()


def session(model: bytes | str, device: torch.device):
    import onnxruntime as ort

    return ort.InferenceSession(model, sess_options=session_options(), providers=providers_for(device))


def session_options():
    """Quiet logs, and the intra-op threads the build set for its models (`pipeline.threads`)."""
    import onnxruntime as ort

    from pipeline.threads import onnx_threads

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's per-initializer warnings would drown the progress output
    opts.intra_op_num_threads = onnx_threads()
    return opts


class OnnxRunner:
    """One ONNX landmark network on either backend: `runner(x) -> first output as a host array`.

    `torch`: the graph run in PyTorch on the device at `precision` (the GPU path, batched);
    `onnxruntime`: an InferenceSession over the file, or over `session_model(path)` (a patched copy's
    bytes, made only when this backend is used)."""

    def __init__(self, path, device: torch.device, backend: str, precision: str, session_model=None):
        from pipeline.device import autocast

        self.device, self.backend, self.precision, self._autocast = device, backend, precision, autocast
        if backend == "torch":
            from pipeline.detect.onnx_torch import OnnxModule

            self.net = OnnxModule(path).eval().to(device)
        else:
            self.session = session(session_model(path) if session_model is not None else str(path), device)
            self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        if self.backend == "torch":
            x = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
            with torch.inference_mode(), self._autocast(self.device, self.precision):
                return self.net(x.to(self.device))[0].float().cpu().numpy()
        return self.session.run(None, {self.input_name: x})[0]
