"""MoCo-v2 (He et al., 2020, arXiv 1911.05722; Chen et al., 2020, arXiv 2003.04297) with semantic positives.

A momentum key encoder and a queue of past keys. Each query view's
positives are the keys of the other views of its pair (its own image's other
augmentation in ``augment`` mode, the partner's in ``semantic``, all of them in
``both``); the negatives are the queue. The queue stores the image id of
every key, so entries showing the query's own image, and (when the partner
is used) its partner, are masked out of the negatives (SePP-ID, arXiv 2306.16122).
"""

from __future__ import annotations

import torch
from lightly.models.modules.heads import MoCoProjectionHead

from ..losses import multi_positive_info_nce
from .base import Method, Views


class MoCo(Method):
    name = "moco"
    temperature = 0.2
    queue_size = 4096
    contrastive = True

    def __init__(self, backbone, feat_dim: int, use_partner: bool, **options) -> None:
        super().__init__(backbone, feat_dim, use_partner, **options)
        self.projector = MoCoProjectionHead(feat_dim, 512, 128)
        self.key_backbone = self.momentum_copy(backbone)
        self.key_projector = self.momentum_copy(self.projector)
        self.register_buffer("queue", torch.nn.functional.normalize(torch.randn(self.queue_size, 128), dim=1))
        self.register_buffer("queue_ids", torch.full((self.queue_size,), -2, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.normalize(self.key_projector(self.key_backbone(x)), dim=1)

    def loss(self, views: Views) -> torch.Tensor:
        queries = [torch.nn.functional.normalize(self.projector(self.backbone(x)), dim=1) for x in views.tensors]
        keys = [self._keys(x) for x in views.tensors]
        pairs = views.ordered_pairs(self.use_partner)
        losses, row_weights = [], []
        for i, q in enumerate(queries):
            pos_views = [j for a, j in pairs if a == i]
            if not pos_views:
                continue
            pos = torch.stack([(q * keys[j]).sum(dim=1) for j in pos_views], dim=1)  # (B, P)
            neg = q @ self.queue.clone().T  # (B, K)
            logits = torch.cat([pos, neg], dim=1) / self.temperature
            related = self.queue_ids[None, :] == views.images[i][:, None]
            if self.use_partner:
                related |= self.queue_ids[None, :] == views.partners[i][:, None]
            positives = torch.zeros_like(logits, dtype=torch.bool)
            positives[:, : len(pos_views)] = True
            excluded = torch.zeros_like(positives)
            excluded[:, len(pos_views):] = related
            weights, pair_weights = None, None
            if views.weights is not None and self.use_partner:
                weights = torch.zeros_like(logits)
                weights[:, : len(pos_views)] = torch.stack([views.term_weight(i, j) for j in pos_views], dim=1)
                pair_weights = views.weights.to(q.device)
            if self.support is not None:
                logits, positives, excluded, weights = self.support.extend(q, logits, positives, excluded, weights,
                                                                           pair_weights, self.temperature)
            losses.append(multi_positive_info_nce(logits, positives, excluded, weights, self.positive_loss))
            # kept on the device: a float() here would wait for the device once per view and step
            row_weights.append(torch.ones((), device=q.device) if weights is None else weights.amax(dim=1).mean())
        self._enqueue(keys[0], views.images[0])
        if self.support is not None:
            self.support.push(keys[-1])  # the partner's view is the last (``Views``)
        # each query view's loss counts by its rows' weight, as the rows do within it
        w = torch.stack(row_weights)
        return (torch.stack(losses) * w).sum() / w.sum().clamp_min(1e-12)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        n = min(len(keys), self.queue_size)
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=keys.device)) % self.queue_size
        self.queue[idx] = keys[:n].float()
        self.queue_ids[idx] = ids[:n]
        self.queue_ptr.fill_((ptr + n) % self.queue_size)
