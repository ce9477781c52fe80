"""SSL augmentations in batches on the training device (kornia), each picture with its own random parameters.

Input is a batch of cached uint8 pictures ``(B, S, S, 3)`` already on the
device; output is a normalised float batch ``(B, 3, size, size)``. Every
operation draws its parameters per picture (``same_on_batch=False``) from
torch's global generator, which the trainer seeds per epoch, so a run and its
resumption see the same views. The recipe is SimCLR's (Chen et al., 2020),
scaled for small pictures: random resized crop (scale 0.3-1), horizontal flip,
colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale with p 0.2, and Gaussian
blur (p 0.5) above :data:`BLUR_FROM` pixels, where SimCLR and BYOL use it and
CIFAR-scale recipes do not.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import MEAN, STD

#: Pictures at least this large are blurred (kernel about a tenth of the side), as on ImageNet.
BLUR_FROM = 96


class DeviceAugment(nn.Module):
    """One view of each picture in a batch: uint8 ``(B, S, S, 3)`` in, normalised ``(B, 3, size, size)`` out
    (channels-last)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.3, 1.0)) -> None:
        super().__init__()
        import kornia.augmentation as K

        ops: list[nn.Module] = [
            # "resample": one batched affine warp; the default "slice" crops picture by picture in Python.
            K.RandomResizedCrop((size, size), scale=scale, cropping_mode="resample"),
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
        ]
        if size >= BLUR_FROM:
            kernel = (size // 10) | 1
            ops.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=0.5))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, pictures: torch.Tensor) -> torch.Tensor:
        return _standardise(self.ops(_unit(pictures)))


def normalise(pictures: torch.Tensor) -> torch.Tensor:
    """Cached uint8 pictures ``(B, S, S, 3)`` to the normalised float input the eval transform gives."""
    return _standardise(_unit(pictures))


def _unit(pictures: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` to float ``(B, 3, S, S)`` in [0, 1]."""
    return pictures.permute(0, 3, 1, 2).float().div_(255.0)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """The trainer's normalisation, in the channels-last layout the models run in."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
