"""False-negative discovery metrics and threshold error against the exact data-set quantile.

Definitions follow the paper's evaluation:

* flagged fraction: the share of the in-batch negatives flagged (:func:`flagged_fraction`);
* precision and recall per anchor over its in-batch negatives, labels as ground truth (same label
  = true false negative), pooled over the anchor's rows and averaged over anchors; an anchor with
  no prediction counts precision 1, one with no true false negative counts recall 1;
* F1 from the *averaged* precision and recall: ``2PR / (P + R)``;
* threshold error: distance of each learned threshold to the exact ``(1 - alpha)``-quantile of the
  item's scores against the whole data set (brute force), summarised as MAE and RMSE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_SMOOTH = 1e-9


def per_anchor_precision_recall(
    flagged: torch.Tensor, true_false_negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor precision and recall of the flagged negatives, pooled over the anchor's rows.

    Args:
        flagged: ``(V, b, C)`` bool predictions (only negatives may be True).
        true_false_negatives: ``(b, C)`` or ``(V, b, C)`` bool ground truth (negatives sharing
            the anchor's label).

    Returns:
        Two ``(b,)`` float32 tensors. An anchor with no prediction has precision 1, one with no
        true false negative recall 1.
    """
    truth = true_false_negatives.expand_as(flagged)
    # Per-anchor counts are exact in float32 (far below 2**24); no float64, which MPS lacks.
    true_positives = (flagged & truth).sum(dim=(0, 2)).to(torch.float32)
    predicted = flagged.sum(dim=(0, 2)).to(torch.float32)
    actual = truth.sum(dim=(0, 2)).to(torch.float32)
    return (true_positives + _SMOOTH) / (predicted + _SMOOTH), (true_positives + _SMOOTH) / (actual + _SMOOTH)


def batch_precision_recall(
    flagged: torch.Tensor, true_false_negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-anchor precision and recall of the flagged negatives (tensors, no host sync).

    Args:
        flagged: ``(V, b, C)`` bool predictions (only negatives may be True).
        true_false_negatives: ``(b, C)`` or ``(V, b, C)`` bool ground truth.

    Returns:
        Two 0-d float32 tensors: mean precision and mean recall over the ``b`` anchors
        (:func:`per_anchor_precision_recall`).
    """
    precision, recall = per_anchor_precision_recall(flagged, true_false_negatives)
    return precision.mean(), recall.mean()


def flagged_fraction(flagged: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Fraction of the negatives flagged as false negatives, pooled over every row (no host sync).

    The paper's "% of negatives predicted FN"; GloFND's converges to ``alpha``. Every anchor has
    the same number of negatives in a batch, so this is also the mean of the per-anchor fractions.
    The losses report it per step as ``last_stats["flagged_fraction"]`` (from counts they keep).

    Args:
        flagged: ``(V, b, C)`` mask (bool or 0/1) of the flagged entries (only negatives).
        negatives: ``(b, C)`` or ``(V, b, C)`` mask of the negatives.

    Returns:
        0-d float32 tensor.

    Examples:
        >>> import torch
        >>> negatives = torch.tensor([[False, True, True, True, True]])
        >>> flagged = torch.tensor([[[False, True, False, False, False]]])
        >>> flagged_fraction(flagged, negatives)
        tensor(0.2500)
    """
    negative_count = negatives.expand_as(flagged).sum(dtype=torch.float32)
    return flagged.sum(dtype=torch.float32) / negative_count


def f1_score(precision: float, recall: float) -> float:
    """``2PR / (P + R)`` from averaged precision and recall (0 when both are 0)."""
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def quantile_rank(num_scores: int, alpha: float) -> int:
    """``k = ceil(alpha * n)``: the minimiser of the quantile objective is the k-th largest score."""
    return max(1, math.ceil(alpha * num_scores - 1e-9))


@torch.no_grad()
def exact_quantile_interval(
    anchor_views: Sequence[torch.Tensor],
    candidate_views: Sequence[torch.Tensor],
    alpha: float,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact minimisers of each item's quantile objective over the whole data set (brute force).

    Item ``i``'s scores are ``<x_i, y_j>`` for every anchor view ``x`` of ``i``, every candidate
    view ``y`` and every other item ``j != i`` (unimodal: anchor and candidate views are both
    ``[view_a, view_b]``, 4(N-1) scores; image anchors: ``[images]`` against ``[texts]``).
    With ``k = ceil(alpha * n)``, the objective ``alpha*lam + mean (s - lam)_+`` is minimised by
    every value between the (k+1)-th and the k-th largest score when ``alpha * n`` is an integer,
    and by the k-th largest otherwise (the paper's Lemma 3.1).

    Args:
        anchor_views: Views of the anchors, each ``(N, d)`` (normalised here).
        candidate_views: Views of the candidates, each ``(N, d)``.
        alpha: Upper tail fraction.
        chunk_size: Anchors per chunk (memory ``chunk_size * len(views) * N`` floats).

    Returns:
        ``(lower, upper)``, each ``(N,)`` float32: the interval of minimisers per item.
    """
    anchors = [torch.nn.functional.normalize(view.float(), dim=1) for view in anchor_views]
    candidates = [torch.nn.functional.normalize(view.float(), dim=1) for view in candidate_views]
    num_items = anchors[0].shape[0]
    num_scores = len(anchors) * len(candidates) * (num_items - 1)
    rank_k = quantile_rank(num_scores, alpha)
    exact_integer = abs(alpha * num_scores - round(alpha * num_scores)) < 1e-9
    lowers, uppers = [], []
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        rows = torch.arange(start, stop)
        blocks = []
        for anchor in anchors:
            for candidate in candidates:
                block = anchor[start:stop] @ candidate.T
                block[torch.arange(stop - start), rows] = float("-inf")
                blocks.append(block)
        top = torch.cat(blocks, dim=1).topk(rank_k + 1, dim=1).values
        upper = top[:, rank_k - 1]
        lowers.append(top[:, rank_k] if exact_integer else upper)
        uppers.append(upper)
    return torch.cat(lowers), torch.cat(uppers)


def threshold_error(thresholds: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> dict[str, float]:
    """MAE and RMSE of thresholds against the exact minimiser interval ``[lower, upper]``.

    A threshold inside the interval has error 0 (it minimises the objective exactly). Thresholds
    may have a leading extra dimension (e.g. FNC's per-row thresholds for several batches).

    Returns:
        ``{"mae": ..., "rmse": ...}`` as Python floats.
    """
    values = thresholds.float()
    distance = torch.clamp(lower - values, min=0) + torch.clamp(values - upper, min=0)
    return {"mae": float(distance.abs().mean()), "rmse": float(distance.pow(2).mean().sqrt())}
