"""Which torch device a model runs on.

One place decides, so every detector and the trainer agree: CUDA when present, else CPU.
"""

from __future__ import annotations

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu' / 'cuda' / 'cuda:N' are taken as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} requested but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(preference)
