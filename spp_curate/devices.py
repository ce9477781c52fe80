"""The one place that decides where work runs: decode processes, the device, bf16 autocast on CUDA.

torch is imported inside the functions, so stages that never touch a model
(index, export, verify) do not pay for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def auto_workers() -> int:
    """Decode processes to use when the recipe does not say: one per spare core, at most 16."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled autocast (float32) elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
