"""A support set of partner embeddings: each view's nearest one is one more positive (after NNCLR).

NNCLR (Dwibedi et al., ICCV 2021, arXiv 2104.14548) keeps a queue of past
projections and takes a view's nearest neighbour in it as the positive, so
that positives come from other images of the same kind. Here the queue holds
the projections of *partner* views (the semantic positives of earlier
batches), and a view's nearest entry joins its positives beside those it
already has: the sampler's pairs say which images go together, and the
support set carries that beyond the partners in the batch. The entry counts
by its row's pair weight (``--partner-weight``), so untrusted pairs bring no
support positives either. Measured in BENCHMARKS.md (``bench/levers.py``).
"""

from __future__ import annotations

import torch
from torch import nn


class SupportSet(nn.Module):
    """A first-in first-out queue of ``size`` projections of ``dim`` numbers (buffers: saved and resumed with the
    model)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def extend(self, z: torch.Tensor, logits: torch.Tensor, positives: torch.Tensor, excluded: torch.Tensor,
               weights: torch.Tensor | None, row_weights: torch.Tensor | None,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One more column: each row's similarity to its nearest entry (a positive, weighted by ``row_weights``).
        Unchanged while the queue is empty."""
        filled = int(self.filled)
        if not filled:
            return logits, positives, excluded, weights
        bank = self.bank[:filled]
        with torch.no_grad():
            nearest = bank[(z.detach().float() @ bank.T).argmax(dim=1)]
        extra = (z.float() * nearest).sum(dim=1, keepdim=True) / temperature
        logits = torch.cat([logits.float(), extra], dim=1)
        positives = torch.cat([positives, torch.ones_like(extra, dtype=torch.bool)], dim=1)
        excluded = torch.cat([excluded, torch.zeros_like(extra, dtype=torch.bool)], dim=1)
        if weights is not None or row_weights is not None:
            base = positives[:, :-1].float() if weights is None else weights.float()
            column = torch.ones_like(extra) if row_weights is None else row_weights.float()[:, None]
            weights = torch.cat([base, column], dim=1)
        return logits, positives, excluded, weights

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> None:
        """Add these projections, the oldest leaving once the queue is full."""
        size = len(self.bank)
        z = z.detach().float()[:size]
        idx = (int(self.ptr) + torch.arange(len(z), device=z.device)) % size
        self.bank[idx] = z
        self.ptr.fill_((int(self.ptr) + len(z)) % size)
        self.filled.fill_(min(size, int(self.filled) + len(z)))
