"""Which torch device a model runs on.

One place decides, so every detector and the trainer agree: CUDA when present, else CPU.
"""

from __future__ import annotations

import contextlib

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu' / 'cuda' / 'cuda:N' are taken as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} requested but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(preference)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(option: str, device: torch.device, *, backend: str = "torch") -> str:
    """'auto' -> 'fp16' for PyTorch models on CUDA (half the memory traffic; fp16's 10-bit mantissa
    keeps regressed landmarks closer than bf16's 7 bits, see tests), else 'fp32'; the others are
    taken as given. onnxruntime backends run fp32 only."""
    if option == "auto":
        return "fp16" if device.type == "cuda" and backend == "torch" else "fp32"
    if option not in PRECISIONS:
        raise ValueError(f"precision {option!r} is not one of auto, {', '.join(PRECISIONS)}")
    if backend != "torch" and option != "fp32":
        raise ValueError(f"precision {option!r} needs backend: torch (onnxruntime runs fp32)")
    return option


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for inference at `precision` (a no-op at fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_batch_size(option: int | None, device: torch.device, *, cpu: int, gpu: int) -> int:
    """Crops per forward pass: the catalog's `batch_size` when set, else the model's default for the
    device. On CPU a small batch is faster per crop: its activations stay in the core's cache
    (`bench/batch_sizes.py`, figures in docs/benchmarks.md). A GPU wants large batches to fill it."""
    if option is not None:
        return option
    return gpu if device.type == "cuda" else cpu
