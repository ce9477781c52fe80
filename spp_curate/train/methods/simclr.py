"""SimCLR (Chen et al., 2020, arXiv 2002.05709) with multi-positive NT-Xent.

In ``augment`` mode each view has one positive, the other augmentation of
its image: plain NT-Xent. In ``semantic`` mode the positive is a view of the
partner image (arXiv 2510.08722). In ``both`` mode aug(a), aug'(a) and aug(b)
are all positives of one another (SePP-ID, arXiv 2306.16122), and in every
mode views of a row's partner image are never used as negatives. With pair weights
(``Views.weights``, the trust in each pair) a partner positive counts by its pair's weight.
"""

from __future__ import annotations

import torch
from lightly.models.modules.heads import SimCLRProjectionHead

from ..losses import multi_positive_info_nce, partner_weights, view_masks
from .base import Method, Views


class SimCLR(Method):
    name = "simclr"
    temperature = 0.2
    contrastive = True
    default_support = 2048

    def __init__(self, backbone, feat_dim: int, use_partner: bool, **options) -> None:
        super().__init__(backbone, feat_dim, use_partner, **options)
        self.projector = SimCLRProjectionHead(feat_dim, 512, 128)

    def loss(self, views: Views) -> torch.Tensor:
        x, group, image, partner = views.stacked()
        z = torch.nn.functional.normalize(self.projector(self.backbone(x)), dim=1)
        positives, excluded = view_masks(group, image, partner, self.use_partner)
        row_weights = None if views.weights is None or not self.use_partner else views.weights.to(z.device)[group]
        weights = None if row_weights is None else partner_weights(image, row_weights)
        logits = z @ z.T / self.temperature
        if self.support is not None:
            logits, positives, excluded, weights = self.support.extend(z, logits, positives, excluded, weights,
                                                                       row_weights, self.temperature)
            self.support.push(z[-views.batch:])  # the partner's view is the last (``Views``)
        return multi_positive_info_nce(logits, positives, excluded, weights, self.positive_loss)
