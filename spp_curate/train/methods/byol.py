"""BYOL (Grill et al., 2020, arXiv 2006.07733) with a prediction term toward the partner.

The online network predicts the momentum target's projection of every other
positive view: the other augmentation in ``augment`` mode, the partner in
``semantic`` mode, and all other views of the pair in ``both`` mode (SePP-ID,
arXiv 2306.16122).
"""

from __future__ import annotations

import torch
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead

from .base import Method, Views, weighted_mean


class BYOL(Method):
    name = "byol"

    def __init__(self, backbone, feat_dim: int, use_partner: bool, **options) -> None:
        super().__init__(backbone, feat_dim, use_partner, **options)
        self.projector = BYOLProjectionHead(feat_dim, 512, 128)
        self.predictor = BYOLPredictionHead(128, 512, 128)
        self.target_backbone = self.momentum_copy(backbone)
        self.target_projector = self.momentum_copy(self.projector)

    def loss(self, views: Views) -> torch.Tensor:
        p = [self.predictor(self.projector(self.backbone(x))) for x in views.tensors]
        with torch.no_grad():
            t = [self.target_projector(self.target_backbone(x)) for x in views.tensors]
        pairs = views.ordered_pairs(self.use_partner)
        # lightly's NegativeCosineSimilarity, per row, so that each term can count by its pair's weight
        return weighted_mean([-torch.nn.functional.cosine_similarity(p[i], t[j], dim=1) for i, j in pairs],
                             [views.term_weight(i, j) for i, j in pairs])
