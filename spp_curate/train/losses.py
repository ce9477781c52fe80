"""Multi-positive contrastive losses: the part of the trainer that is this project's own.

With semantic pairs a view has more than one positive: the other augmentation
of its own image and the views of its partner image (SePP-ID, arXiv
2306.16122). The partner must then also be kept *out* of the negatives,
including in a MoCo queue, or the loss pushes apart what it pulls together.
"""

from __future__ import annotations

import torch

#: How a row's several positives enter the loss (``--positive-loss``), after SupCon (Khosla et al. 2020):
#: ``out`` averages their log-probabilities (eq. 2), ``in`` takes the log of their averaged probability (eq. 3).
POSITIVE_LOSSES = ("out", "in")


def multi_positive_info_nce(logits: torch.Tensor, positives: torch.Tensor, excluded: torch.Tensor,
                            weights: torch.Tensor | None = None, form: str = "out") -> torch.Tensor:
    """InfoNCE with several positives per row (the "L_out" form of SupCon, Khosla et al. 2020; ``form="in"``
    its "L_in" form).

    Args:
        logits: ``(Q, K)`` similarities already divided by the temperature.
        positives: ``(Q, K)`` bool, True where column k is a positive of row q.
        excluded: ``(Q, K)`` bool, True where column k is neither positive nor negative for row q
            (the row itself, or a view of the partner image that is not used as a positive).
        weights: ``(Q, K)`` optional trust in each positive, in [0, 1] (see :func:`partner_weights`).
            A row's positives are then a soft target in proportion to their weights, and the row
            counts in the mean by its strongest positive's weight: with every weight 1 this is the
            unweighted loss; with the partner's weight 0 a row keeps only its augmented positive (the
            partner's view is then a negative, as any other image's is) and a row whose positives are
            all partners drops out.

        form: ``out`` or ``in`` (:data:`POSITIVE_LOSSES`).

    Returns:
        The mean over rows of ``-mean_p log(exp(l_qp) / sum_{k not excluded} exp(l_qk))``
        (weighted means with ``weights``); with ``form="in"``, of ``-log mean_p (exp(l_qp) / sum_k ...)``,
        which a row satisfies through any of its positives, not each of them.

    Raises:
        ValueError: when a row has no positive.

    With one positive per row and nothing excluded but the row itself this is
    NT-Xent (SimCLR) and MoCo's loss.
    """
    if form not in POSITIVE_LOSSES:
        raise ValueError(f"form {form!r}: accepted {', '.join(POSITIVE_LOSSES)}")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every row needs at least one positive")
    logits = logits.float().masked_fill(excluded, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    w = positives.float() if weights is None else weights.float().masked_fill(~positives, 0.0)
    w_sum = w.sum(dim=1).clamp_min(1e-12)
    if form == "in":  # -log sum_p (w_p / sum w) p_p, in log space
        per_row = -(torch.logsumexp(log_prob.masked_fill(~positives, float("-inf"))
                                    + torch.log(w.clamp_min(1e-30)), dim=1) - torch.log(w_sum))
    else:
        per_row = -(w * log_prob.masked_fill(~positives, 0.0)).sum(dim=1) / w_sum
    if weights is None:
        return per_row.mean()
    row_weight = w.amax(dim=1)
    return (row_weight * per_row).sum() / row_weight.sum().clamp_min(1e-12)


def partner_weights(image: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` weights of column k as a positive of row q: 1 for a view of the row's own image (an
    augmentation), ``row_weight[q]`` (the trust in the row's pair) for a view of another image (the partner)."""
    same_image = image[:, None] == image[None, :]
    return torch.where(same_image, torch.ones_like(row_weight)[:, None], row_weight[:, None].expand_as(same_image))


def view_masks(group: torch.Tensor, image: torch.Tensor, partner: torch.Tensor,
               use_partner: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and excluded masks for in-batch contrast over ``N`` stacked views.

    Args:
        group: ``(N,)`` the pair each view comes from; views of one pair are positives of each other.
        image: ``(N,)`` an id of the image each view shows.
        partner: ``(N,)`` the id of that image's partner in its pair (-1 when none).
        use_partner: whether the partner is used (``semantic``/``both``): its views are then
            positives, and wherever else it appears in the batch it is excluded from the negatives.
            Without it (``augment``, the matched baseline) no semantic information is used.

    Views of the very same image elsewhere in the batch are never negatives.
    """
    same_view = torch.eye(len(group), dtype=torch.bool, device=group.device)
    positives = (group[:, None] == group[None, :]) & ~same_view
    same_image = image[:, None] == image[None, :]
    if use_partner:
        related = same_image | (image[None, :] == partner[:, None])
    else:
        positives &= same_image
        related = same_image
    excluded = same_view | (related & ~positives)
    return positives, excluded
