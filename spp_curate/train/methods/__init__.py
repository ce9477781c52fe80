"""One SSL method per file over a small shared base (solo-learn's layout, kept small)."""

from __future__ import annotations

from torch import nn

from .base import Method, Views
from .byol import BYOL
from .moco import MoCo
from .simclr import SimCLR
from .simsiam import SimSiam

METHODS: dict[str, type[Method]] = {"moco": MoCo, "simclr": SimCLR, "simsiam": SimSiam, "byol": BYOL}


def build_method(name: str, backbone: nn.Module, feat_dim: int, use_partner: bool) -> Method:
    return METHODS[name](backbone, feat_dim, use_partner)


__all__ = ["METHODS", "Method", "Views", "build_method"]
