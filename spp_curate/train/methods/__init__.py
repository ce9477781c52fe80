"""One SSL method per file over a small shared base (solo-learn's layout, kept small).

A new method is one file here: a :class:`Method` subclass that sets ``name`` registers itself, and every
module of this package is imported below, so ``--method`` takes it with nothing else edited.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from .base import Method, Views
from .moco import MoCo  # noqa: F401 - the built-in methods first, in this order
from .simclr import SimCLR  # noqa: F401
from .simsiam import SimSiam  # noqa: F401
from .byol import BYOL  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

METHODS: dict[str, type[Method]] = Method.registry


def build_method(name: str, backbone: nn.Module, feat_dim: int, use_partner: bool, positive_loss: str = "out",
                 support: int = 0) -> Method:
    return METHODS[name](backbone, feat_dim, use_partner, positive_loss=positive_loss, support=support)


__all__ = ["METHODS", "Method", "Views", "build_method"]
