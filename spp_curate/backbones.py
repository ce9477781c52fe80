"""Backbones: torchvision ResNets (with the small-image stem when inputs are 64 px or less) and a small CNN."""

from __future__ import annotations

import torch
from torch import nn

BACKBONES = ("small-cnn", "small-cnn-grid", "resnet18", "resnet50")
SMALL_IMAGE = 64


class SmallCNN(nn.Module):
    """Four conv blocks and global pooling: fast CPU runs on 28-40 px images."""

    def __init__(self, width: int = 32, out_dim: int = 128, grid: int = 1) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(3, width, 1), block(width, 2 * width, 2),
                                      block(2 * width, 4 * width, 2), block(4 * width, out_dim, 1),
                                      nn.AdaptiveAvgPool2d(grid), nn.Flatten())
        self.out_dim = out_dim * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_backbone(name: str, image_size: int) -> tuple[nn.Module, int]:
    """The backbone ``name`` without its classifier, and its feature size."""
    if name in ("small-cnn", "small-cnn-grid"):
        # -grid: pooled to 2 x 2 cells, not to one: where a small centred picture's parts are stays in the
        # features (raw pixels keep it whole; a single global average throws it away)
        model = SmallCNN(grid=2 if name == "small-cnn-grid" else 1)
        return model, model.out_dim
    if name in ("resnet18", "resnet50"):
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        if image_size <= SMALL_IMAGE:
            # The CIFAR stem: a 3x3 stride-1 first conv and no max-pool, or a 32 px
            # input is 1x1 before the last stage.
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(BACKBONES)}")
