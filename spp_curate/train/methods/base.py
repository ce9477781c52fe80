"""What every method shares: the backbone, the batch of views, and the per-step hook."""

from __future__ import annotations

from dataclasses import dataclass

import copy

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from ..support import SupportSet


@dataclass
class Views:
    """A batch of ``V`` views of ``B`` pairs.

    ``images[v]`` holds the image id each row of ``tensors[v]`` shows and
    ``partners[v]`` the id of that image's pair partner (-1 for single images).
    Views of one pair (same row across ``v``) are positives of each other,
    except that in ``augment`` mode only views of the same image are.
    ``weights`` (``(B,)``, optional) is the trust in each pair, in [0, 1]: a term between views
    of two different images (anchor and partner) counts by it, a term between two views of one
    image by 1 (see ``--partner-weight``). With partners (``semantic``, ``both``) the last view
    shows the partner image.
    """

    tensors: list[torch.Tensor]
    images: list[torch.Tensor]
    partners: list[torch.Tensor]
    weights: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return len(self.tensors[0])

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All views stacked: ``(x, group, image, partner)`` with ``V * B`` rows."""
        group = torch.arange(self.batch, device=self.tensors[0].device).repeat(len(self.tensors))
        return torch.cat(self.tensors), group, torch.cat(self.images), torch.cat(self.partners)

    def ordered_pairs(self, use_partner: bool) -> list[tuple[int, int]]:
        """Ordered positive view pairs (i, j), i != j: views of the same image, and with
        ``use_partner`` also views of the partner image."""
        same_image = [[bool((self.images[i] == self.images[j]).all()) for j in range(len(self.tensors))]
                      for i in range(len(self.tensors))]
        return [(i, j) for i in range(len(self.tensors)) for j in range(len(self.tensors))
                if i != j and (use_partner or same_image[i][j])]

    def term_weight(self, i: int, j: int) -> torch.Tensor:
        """``(B,)`` weights of the terms between view ``i`` and view ``j`` of each row: 1 where both show
        the same image, the pair's weight where they show anchor and partner."""
        same = self.images[i] == self.images[j]
        if self.weights is None:
            return torch.ones(same.shape, device=same.device)
        return torch.where(same, torch.ones_like(self.weights), self.weights.to(same.device))


def weighted_mean(terms: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """The mean of per-row loss terms, each counting by its weight (the plain mean when every weight is 1)."""
    w = torch.cat(weights).float()
    return (torch.cat(terms).float() * w).sum() / w.sum().clamp_min(1e-12)


class Method(nn.Module):
    """An SSL method: a backbone plus heads, a loss over :class:`Views`, and a per-step update.

    Methods with a momentum (target, key) encoder make it with :meth:`momentum_copy`; the base
    then moves every copy toward its online module after each step, with the momentum rising
    from ``momentum`` to 1 on a cosine schedule over training (BYOL's schedule, MoCo-v2 likewise).
    """

    name = "method"
    momentum = 0.99
    #: Whether the loss contrasts positives against negatives (InfoNCE): then ``--positive-loss`` and
    #: ``--support`` apply to it.
    contrastive = False
    #: ``--support auto``: the support set of partner projections the method trains with by default, chosen by
    #: measurement (BENCHMARKS.md, levers: SimCLR gains with one, MoCo-v2 loses).
    default_support = 0
    #: Every method by its ``--method`` name: a subclass that sets ``name`` is one (see ``__init__.py``).
    registry: dict[str, type["Method"]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Method.registry[cls.name] = cls

    def __init__(self, backbone: nn.Module, feat_dim: int, use_partner: bool, positive_loss: str = "out",
                 support: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.use_partner = use_partner
        self.positive_loss = positive_loss
        # a support set of partner projections (contrastive methods with partners; ``support.py``)
        self.support = SupportSet(support, 128) if support and use_partner and self.contrastive else None
        self._momentum_pairs: list[tuple[nn.Module, nn.Module]] = []

    def momentum_copy(self, online: nn.Module) -> nn.Module:
        """A frozen copy of ``online`` that follows it by exponential moving average after each step."""
        target = copy.deepcopy(online)
        deactivate_requires_grad(target)
        self._momentum_pairs.append((online, target))
        return target

    def loss(self, views: Views) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with training progress in [0, 1]: the momentum updates."""
        if self._momentum_pairs:
            m = cosine_schedule(int(progress * 1000), 1000, self.momentum, 1.0)
            for online, target in self._momentum_pairs:
                update_momentum(online, target, m)
