"""onnxruntime sessions for the detectors: CUDA when the device asks for it and ORT has it, quiet logs."""

from __future__ import annotations

import torch


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


def session(model: bytes | str, device: torch.device):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's per-initializer warnings would drown the progress output
    return ort.InferenceSession(model, sess_options=opts, providers=providers_for(device))
