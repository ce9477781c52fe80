"""SimSiam (Chen & He, 2021, arXiv 2011.10566) with a prediction term toward the partner.

The loss is the mean of ``-cos(p_i, stopgrad(z_j))`` over ordered positive
view pairs (i, j): the two augmentations of one image in ``augment`` mode,
anchor and partner in ``semantic`` mode, and in ``both`` mode every pair of
aug(a), aug'(a), aug(b), which adds the terms toward the partner that
SePP-ID (arXiv 2306.16122) uses for non-contrastive methods.
"""

from __future__ import annotations

import torch
from lightly.models.modules.heads import SimSiamPredictionHead, SimSiamProjectionHead

from .base import Method, Views, weighted_mean


class SimSiam(Method):
    name = "simsiam"

    def __init__(self, backbone, feat_dim: int, use_partner: bool, **options) -> None:
        super().__init__(backbone, feat_dim, use_partner, **options)
        self.projector = SimSiamProjectionHead(feat_dim, 512, 128)
        self.predictor = SimSiamPredictionHead(128, 64, 128)

    def loss(self, views: Views) -> torch.Tensor:
        z = [self.projector(self.backbone(x)) for x in views.tensors]
        p = [self.predictor(zi) for zi in z]
        pairs = views.ordered_pairs(self.use_partner)
        return weighted_mean([-torch.nn.functional.cosine_similarity(p[i], z[j].detach(), dim=1) for i, j in pairs],
                             [views.term_weight(i, j) for i, j in pairs])
