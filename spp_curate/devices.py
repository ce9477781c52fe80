"""The one place that decides how models run on a device: bf16 autocast on CUDA, plain float32 on the CPU."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled autocast (float32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
